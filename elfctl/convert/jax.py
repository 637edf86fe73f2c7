"""Official JAX/Flax checkpoints -> PyTorch (docs/method.md section 7). No JAX needed.

Three source layouts hold the same parameter tree (`params`, `ema_params1`, `opt_state`,
`step`, ...):

* an Orbax directory `checkpoint_<step>/` whose leaves are zarr v2 arrays inside one OCDBT
  key-value store (`manifest.ocdbt`), named by their dotted path
  (`ema_params1.blocks_0.attn.qkv.kernel`); read with `tensorstore` (driver `zarr` over
  kvstore `ocdbt`);
* the same without OCDBT: one folder per leaf, `checkpoint_<step>/<dotted path>/.zarray`;
* a single Flax msgpack file (`flax.serialization.to_bytes`): ExtType 1 arrays, ExtType 3
  numpy scalars, oversized arrays chunked; read with `msgpack` + numpy (+ `ml_dtypes`).

Only the wanted subtrees (`ema_params1` and/or `params`) are read, one leaf at a time and
cast to float32 as it arrives, so peak memory stays near the size of the output.

Names: a JAX leaf is written here as its '/'-joined path inside its subtree
(`blocks_0/attn/qkv/kernel`). Flax Dense layers hold `kernel` (in, out); torch Linear holds
`weight` (out, in), so kernels are transposed. Everything else (biases, norm weights, the
learned tokens and the decoder head's raw `proj_kernel` / `unembed_kernel`) is copied as
it is. The whole tree is validated against the tensor table of the architecture before
anything is converted or written.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elfctl import hub
from elfctl.config import Config, ModelConfig, resolve
from elfctl.errors import UserError
from elfctl.model.checkpoints import save_model_checkpoint, save_official_checkpoint
from elfctl.model.encoder import load_pretrained
from elfctl.model.network import infer_model_config

# progress(done, total, unit): called while reading; unit is "tensors" or "MiB".
Progress = Callable[[int, int, str], None]

WEIGHT_SUBTREES = {
    "ema": ("ema_params1",),
    "params": ("params",),
    "both": ("params", "ema_params1"),
}
FREQ_DIM = 256  # width of the sinusoidal timestep features (section 3.4)
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?")


# ----------------------------------------------------------------------------- tensor table


def expected_jax_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an ELF parameter tree, in JAX names and JAX layout (kernels (in, out))."""
    H, C, V, bn = cfg.hidden_size, cfg.latent_dim, cfg.vocab_size, cfg.bottleneck
    head_dim = H // cfg.num_heads
    inner = int(H * cfg.mlp_ratio * 2 / 3)  # SwiGLU hidden width, 2048 for ELF-B
    shapes: dict[str, tuple[int, ...]] = {}

    def dense(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}/kernel"] = (n_in, n_out)
        if bias:
            shapes[f"{name}/bias"] = (n_out,)

    if cfg.self_cond:
        dense("self_cond_proj", 2 * C, C)
    dense("text_proj/proj1", C, bn, bias=False)
    dense("text_proj/proj2", bn, H)
    dense("t_embedder/mlp_0", FREQ_DIM, H)
    dense("t_embedder/mlp_2", H, H)
    shapes["t_emb_tokens"] = (1, cfg.num_time_tokens, H)
    if cfg.num_sc_tokens:
        dense("self_cond_cfg_embedder/mlp_0", FREQ_DIM, H)
        dense("self_cond_cfg_embedder/mlp_2", H, H)
        shapes["self_cond_cfg_tokens"] = (1, cfg.num_sc_tokens, H)
    if cfg.num_mode_tokens:
        shapes["mode_tokens"] = (1, cfg.num_mode_tokens, H)
    for i in range(cfg.depth):
        block = f"blocks_{i}"
        shapes[f"{block}/norm1/weight"] = (H,)
        dense(f"{block}/attn/qkv", H, 3 * H)
        shapes[f"{block}/attn/q_norm/weight"] = (head_dim,)
        shapes[f"{block}/attn/k_norm/weight"] = (head_dim,)
        dense(f"{block}/attn/proj", H, H)
        shapes[f"{block}/norm2/weight"] = (H,)
        dense(f"{block}/mlp/w12", H, 2 * inner)
        dense(f"{block}/mlp/w3", inner, H)
    shapes["final_layer/norm_final/weight"] = (H,)
    dense("final_layer/linear", H, C)
    shapes["proj_kernel"] = (H, C)  # raw parameters, input-major in both frameworks
    shapes["proj_bias"] = (C,)
    shapes["unembed_kernel"] = (C, V)
    shapes["unembed_bias"] = (V,)
    return shapes


def torch_name(jax_name: str) -> tuple[str, bool]:
    """JAX leaf name -> (torch state-dict name, whether the array is transposed).

    `blocks_3/attn/qkv/kernel` -> (`blocks.3.attn.qkv.weight`, True);
    `proj_kernel` -> (`proj_kernel`, False): only a Dense layer's `kernel` leaf transposes.
    """
    parts = jax_name.split("/")
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", p) for p in parts]
    if len(parts) > 1 and parts[-1] == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    return ".".join(parts), False


def torch_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The torch state-dict table (names and (out, in) shapes) of an ELF model."""
    table = {}
    for jax_name, shape in expected_jax_shapes(cfg).items():
        name, transpose = torch_name(jax_name)
        table[name] = tuple(reversed(shape)) if transpose else shape
    return table


def infer_config(shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """Read the architecture off a JAX tree's shapes; a missing key tensor is a UserError.

    The shapes are mapped to the torch layout and read by `model.infer_model_config`, so
    both formats share one rule.
    """
    import torch

    meta = {}
    for jax_name, shape in shapes.items():
        name, transpose = torch_name(jax_name)
        meta[name] = torch.empty(
            tuple(reversed(shape)) if transpose else tuple(shape), device="meta"
        )
    try:
        return infer_model_config(meta)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"The checkpoint is not an ELF model: {e.args[0]}.") from None


def validate_tree(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, subtree: str) -> None:
    """Every source tensor consumed, every target produced, every shape right, or a UserError."""
    expected = expected_jax_shapes(cfg)
    leftover = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    wrong = [n for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing {_names(subtree, missing)}")
    if leftover:
        problems.append(f"unexpected {_names(subtree, leftover)}")
    if wrong:
        details = [
            f"{subtree}/{n} is {list(shapes[n])}, expected {list(expected[n])}" for n in wrong
        ]
        problems.append("wrong shape: " + _first(details))
    if problems:
        raise UserError(
            f"The checkpoint does not match the ELF architecture (H {cfg.hidden_size}, depth "
            f"{cfg.depth}, C {cfg.latent_dim}, V {cfg.vocab_size}): " + "; ".join(problems) + "."
        )


def _names(subtree: str, names: list[str]) -> str:
    return _first([f"{subtree}/{n}" for n in names])


def _first(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ----------------------------------------------------------------------------- finding SRC


@dataclass
class Source:
    path: Path  # a local Orbax directory or msgpack file
    kind: str  # "orbax" or "msgpack"
    step: int | None  # from the name checkpoint_<step>, when it has one


def resolve_jax_path(src: str, allow_patterns: list[str] | None = None) -> Path:
    """A local path as it is, or a hub repo id (`org/repo[/sub/path]`) downloaded to the cache."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not _REPO_ID.fullmatch(src) or src.startswith((".", "/", "~")):
        raise UserError(f"Source '{src}' does not exist (neither a local path nor a hub repo id).")
    org, repo, *rest = src.split("/")
    sub = "/".join(rest)
    patterns = allow_patterns or ([f"{sub}/*", sub] if sub else None)
    from huggingface_hub import snapshot_download

    with hub.access(f"{org}/{repo}", "the JAX checkpoint"):
        local = Path(snapshot_download(f"{org}/{repo}", allow_patterns=patterns))
    local = local / sub if sub else local
    if not local.exists():
        raise UserError(f"Hub repo '{org}/{repo}' has no '{sub}'.")
    return local


def find_checkpoint(path: Path) -> Source:
    """An Orbax directory, a msgpack file, or a folder of `checkpoint_<step>` (highest step)."""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise UserError(f"{path} is a PyTorch/pickle file, not a JAX checkpoint.")
        if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
            raise UserError(f"{path} is not a Flax msgpack checkpoint (it does not hold a map).")
        return Source(path, "msgpack", _step_from_name(path))
    if not path.is_dir():
        raise UserError(f"Source {path} is neither a file nor a directory.")
    if _is_orbax_item(path):
        return Source(path, "orbax", _step_from_name(path))
    # An Orbax CheckpointManager step folder holds its item one level down (e.g. default/).
    items = [p for p in path.iterdir() if p.is_dir() and _is_orbax_item(p)]
    if len(items) == 1 and not _CHECKPOINT_NAME.fullmatch(items[0].name):
        return Source(items[0], "orbax", _step_from_name(path))
    # Per-leaf arrays without a readable _METADATA.
    if (path / "_CHECKPOINT_METADATA").exists() or any(path.glob("*/.zarray")):
        return Source(path, "orbax", _step_from_name(path))
    # checkpoint_<step> entries (flax), else <step> folders (an Orbax CheckpointManager).
    steps = {
        int(m.group(1)): entry
        for entry in path.iterdir()
        if (m := _CHECKPOINT_NAME.fullmatch(entry.name))
    } or {int(entry.name): entry for entry in path.iterdir() if entry.name.isdigit()}
    if not steps:
        raise UserError(
            f"{path} is neither an Orbax checkpoint (no _METADATA or manifest.ocdbt) nor a "
            "folder of checkpoint_<step> entries."
        )
    return find_checkpoint(steps[max(steps)])


def _is_orbax_item(path: Path) -> bool:
    return any((path / name).exists() for name in ("_METADATA", "manifest.ocdbt"))


def _step_from_name(path: Path) -> int | None:
    m = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- reading


@dataclass
class JaxTree:
    """The wanted subtrees of a JAX checkpoint, as float32 arrays in JAX layout."""

    subtrees: dict[str, dict[str, np.ndarray]]  # "ema_params1" -> {"blocks_0/...": array}
    step: int | None
    source_dtypes: set[str] = field(default_factory=set)
    top_level: list[str] = field(default_factory=list)


def read_checkpoint(
    source: Source, subtrees: tuple[str, ...], progress: Progress | None = None
) -> JaxTree:
    reader = read_orbax if source.kind == "orbax" else read_msgpack
    tree = reader(source.path, subtrees, progress)
    if tree.step is None:
        tree.step = source.step
    return tree


def _to_float32(array: np.ndarray, dtypes: set[str]) -> np.ndarray:
    """Floating arrays (float32, bfloat16, ...) -> float32; anything else is left as it is."""
    array = np.asarray(array)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        dtypes.add(array.dtype.name)
        return array.astype(np.float32)  # a fresh, writable, owned array
    return array


def _unwrap(tree: dict[str, Any]) -> dict[str, Any]:
    # A Flax variables dict nests one more level: {"params": {...}}.
    while isinstance(tree, dict) and list(tree) == ["params"]:
        tree = tree["params"]
    return tree


# Orbax -------------------------------------------------------------------------------------


def orbax_leaf_names(path: Path) -> tuple[list[tuple[str, ...]], str]:
    """Every stored leaf as a key path, and the zarr driver ("zarr" v2 or "zarr3").

    The tree comes from `_METADATA`; without it (or in a format we do not know) the
    stored arrays name themselves, their dotted path being the key path.
    """
    meta_file = path / "_METADATA"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{meta_file} is not valid JSON ({e}).") from None
        tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
        if isinstance(tree, dict):
            leaves = []
            for entry in tree.values():
                value = entry.get("value_metadata", {})
                if value.get("skip_deserialize") or value.get("value_type") == "None":
                    continue  # None / empty leaves have no stored array
                leaves.append(tuple(str(k["key"]) for k in entry["key_metadata"]))
            return leaves, "zarr3" if meta.get("use_zarr3") else "zarr"
    v2, v3 = _stored_arrays(path, ".zarray"), _stored_arrays(path, "zarr.json")
    names, driver = (v3, "zarr3") if v3 and not v2 else (v2, "zarr")
    return [tuple(name.split(".")) for name in names], driver


def _stored_arrays(path: Path, marker: str) -> list[str]:
    """Dotted names of the arrays stored in the OCDBT store or the leaf folders."""
    if (path / "manifest.ocdbt").exists():
        import tensorstore as ts

        kv = ts.KvStore.open({"driver": "ocdbt", "base": _file_url(path)}).result()
        keys = [k.decode() for k in kv.list().result()]
        return sorted(k[: -len(marker) - 1] for k in keys if k.endswith("/" + marker))
    return sorted(p.parent.name for p in path.glob(f"*/{marker}"))


def _file_url(path: Path) -> str:
    return "file://" + str(path.resolve()) + "/"


def _zarr_spec(path: Path, dotted: str, driver: str) -> dict[str, Any]:
    if (path / "manifest.ocdbt").exists():
        kvstore = {"driver": "ocdbt", "base": _file_url(path), "path": dotted + "/"}
    else:
        kvstore = {"driver": "file", "path": str((path / dotted).resolve()) + "/"}
    return {"driver": driver, "kvstore": kvstore}


def read_orbax(path: Path, subtrees: tuple[str, ...], progress: Progress | None = None) -> JaxTree:
    import tensorstore as ts

    leaves, driver = orbax_leaf_names(path)
    top_level = sorted({leaf[0] for leaf in leaves})
    wanted = [leaf for leaf in leaves if leaf[0] in subtrees]
    if ("step",) in leaves:
        wanted.append(("step",))
    context = ts.Context()  # one shared OCDBT cache for every leaf
    out: dict[str, dict[str, np.ndarray]] = {s: {} for s in subtrees if s in top_level}
    dtypes: set[str] = set()
    step = None
    # Keep a few reads in flight: decompression overlaps, memory stays ~ one tensor each.
    window = 8
    pending: list[tuple[tuple[str, ...], Any]] = []

    def submit(leaf: tuple[str, ...]) -> None:
        dotted = ".".join(leaf)
        try:
            store = ts.open(_zarr_spec(path, dotted, driver), context=context, open=True).result()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"Cannot open array '{dotted}' in {path} ({e}).") from None
        pending.append((leaf, store.read()))

    queue = list(wanted)
    done = 0
    while queue or pending:
        while queue and len(pending) < window:
            submit(queue.pop(0))
        leaf, future = pending.pop(0)
        try:
            array = future.result()
        except Exception as e:  # noqa: BLE001
            raise UserError(f"Cannot read array '{'.'.join(leaf)}' in {path} ({e}).") from None
        if leaf == ("step",):
            step = int(np.asarray(array))
        else:
            out[leaf[0]]["/".join(leaf[1:])] = _to_float32(array, dtypes)
        done += 1
        if progress:
            progress(done, len(wanted), "tensors")
    for name in out:
        out[name] = _unwrap_flat(out[name])
    return JaxTree(out, step, dtypes, top_level)


def _unwrap_flat(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    while flat and all(k.startswith("params/") for k in flat):
        flat = {k[len("params/") :]: v for k, v in flat.items()}
    return flat


# Flax msgpack ------------------------------------------------------------------------------


_EXT_NDARRAY, _EXT_NATIVE_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


def _decode_ndarray(data: bytes) -> np.ndarray:
    """Flax's ExtType payload: msgpack (shape, dtype name, raw C-order bytes)."""
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode()
    if name == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(name)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


class _ByteCounter:
    """A file wrapper that reports how far the reader has got (for the progress bar)."""

    def __init__(self, f, total: int, progress: Progress | None):
        self.f, self.total, self.progress, self.pos = f, total, progress, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        if self.progress:
            self.progress(self.pos >> 20, _mib(self.total), "MiB")
        return data


def _mib(n_bytes: int) -> int:
    return max(1, -(-n_bytes // 2**20))


def read_msgpack(
    path: Path, subtrees: tuple[str, ...], progress: Progress | None = None
) -> JaxTree:
    """Stream the top-level map: decode wanted subtrees, skip the rest (opt_state, ...)."""
    import msgpack

    dtypes: set[str] = set()

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_NDARRAY:
            # Cast as each array arrives: the subtree is held in float32 only once.
            return _to_float32(_decode_ndarray(data), dtypes)
        if code == _EXT_NPSCALAR:
            return _decode_ndarray(data)[()]
        if code == _EXT_NATIVE_COMPLEX:
            real, imag = msgpack.unpackb(data)
            return complex(real, imag)
        return msgpack.ExtType(code, data)

    out: dict[str, dict[str, np.ndarray]] = {}
    top_level: list[str] = []
    step = None
    total = path.stat().st_size
    with open(path, "rb") as f:
        reader = _ByteCounter(f, total, progress)
        unpacker = msgpack.Unpacker(
            reader,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=False,
            max_buffer_size=2**31 - 1,  # one Flax chunk is up to 2^30 bytes
            read_size=16 * 2**20,
        )
        try:
            n_entries = unpacker.read_map_header()
            for _ in range(n_entries):
                key = unpacker.unpack()
                top_level.append(str(key))
                if key in subtrees:
                    tree = _unwrap(_unchunk(unpacker.unpack()))
                    out[key] = dict(_flatten(tree, ""))
                elif key == "step":
                    step = int(np.asarray(unpacker.unpack()))
                else:
                    unpacker.skip()  # opt_state, dropout_rng, ...: never decoded
        except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.OutOfData) as e:
            raise UserError(f"{path} is not a valid Flax msgpack checkpoint ({e}).") from None
    if progress:
        progress(_mib(total), _mib(total), "MiB")
    return JaxTree(out, step, dtypes, sorted(top_level))


def _unchunk(tree: Any) -> Any:
    """Undo Flax's splitting of arrays over 2^30 bytes into {'0': part, '1': part, ...}."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(_CHUNKED) is True:
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    for key in list(tree):
        tree[key] = _unchunk(tree[key])
    return tree


def _flatten(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, tree


# ----------------------------------------------------------------------------- converting


def convert_tree(flat: dict[str, np.ndarray], cfg: ModelConfig, subtree: str) -> dict[str, Any]:
    """Validated JAX-layout float32 arrays -> torch state dict (float32, Dense kernels .T).

    Consumes `flat` (each source array is released once converted).
    """
    import torch

    shapes = {name: tuple(np.shape(a)) for name, a in flat.items()}
    for name, array in flat.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            kind = getattr(array, "dtype", type(array).__name__)
            raise UserError(f"Tensor {subtree}/{name} is {kind}, not a floating-point array.")
    validate_tree(shapes, cfg, subtree)
    state = {}
    for jax_name in expected_jax_shapes(cfg):  # model order, which is the official order
        array = flat.pop(jax_name)
        name, transpose = torch_name(jax_name)
        if transpose:
            array = np.ascontiguousarray(array.T)
        state[name] = torch.from_numpy(array)
    return state


def final_layer_is_zero(state: dict[str, Any]) -> bool:
    """The flow head is zero-initialised: all zeros means untrained (or not really loaded)."""
    return not bool(state["final_layer.linear.weight"].any())


@dataclass
class ConversionResult:
    destination: Path
    format: str
    weights: str
    step: int
    tensors: int
    parameters: int
    source: str
    source_kind: str
    source_dtypes: list[str]
    config: ModelConfig
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "destination": str(self.destination),
            "format": self.format,
            "weights": self.weights,
            "step": self.step,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "source": self.source,
            "source_kind": self.source_kind,
            "source_dtype": "+".join(self.source_dtypes),
            "output_dtype": "float32",
            "hidden_size": self.config.hidden_size,
            "depth": self.config.depth,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
        }


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    weights: str = "ema",
    fmt: str = "official",
    preset: str | None = None,
    force: bool = False,
    allow_untrained: bool = False,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert a JAX ELF checkpoint at `src` into a checkpoint at `dst` that `load_model` loads.

    `weights`: "ema" (`ema_params1`, what sampling uses), "params", or "both" (official
    format only). `fmt`: "official" writes `dst/checkpoint_<step>` (a torch.save dict with
    `params` and `ema_params1`; with one set of weights, both keys hold the same tensors,
    stored once); "elfctl" writes our run format into the directory `dst`. A final layer
    that is all zeros is an error unless `allow_untrained`.
    """
    started = time.perf_counter()
    if weights not in WEIGHT_SUBTREES:
        raise UserError(f"--weights must be ema, params or both, got '{weights}'.")
    if fmt not in ("official", "elfctl"):
        raise UserError(f"--format must be official or elfctl, got '{fmt}'.")
    if fmt == "elfctl" and weights == "both":
        raise UserError("--format elfctl stores one set of weights: use --weights ema or params.")
    run_config = None
    if preset:
        run_config = resolve(preset=preset)
    dst_path = Path(dst).expanduser()
    _check_destination_free(dst_path, fmt, force)

    source = find_checkpoint(resolve_jax_path(str(src)))
    wanted = WEIGHT_SUBTREES[weights]
    tree = read_checkpoint(source, wanted, progress)
    for name in wanted:
        if name not in tree.subtrees:
            hint = " (try --weights params)" if name == "ema_params1" else ""
            raise UserError(
                f"{source.path} has no '{name}' subtree{hint}; its top-level entries are: "
                f"{', '.join(tree.top_level) or 'none'}."
            )
    step = int(tree.step) if tree.step is not None else 0

    states: dict[str, dict[str, Any]] = {}
    cfg = None
    for name in wanted:
        flat = tree.subtrees.pop(name)
        shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
        cfg = run_config.model if run_config else infer_config(shapes)
        states[name] = convert_tree(flat, cfg, name)
    assert cfg is not None
    warnings = []
    for name, state in states.items():
        if final_layer_is_zero(state):
            message = (
                f"{name}/final_layer/linear/kernel is all zeros: the checkpoint is untrained "
                "(or its weights were not found)"
            )
            if not allow_untrained:
                raise UserError(message + "; pass --allow-untrained to convert it anyway.")
            warnings.append(message + ".")

    first = states[wanted[0]]
    if fmt == "official":
        params = states.get("params", first)
        ema = states.get("ema_params1", first)
        written = _write_official(dst_path, params, ema, step, force)
    else:
        if run_config is None:
            run_config = Config(name="converted")
            warnings.append(
                "No --preset given: stored the default (OpenWebText) data, encoder and sampling "
                "settings beside the inferred architecture."
            )
        run_config.model = cfg
        meta = {"converted_from": str(source.path), "weights": wanted[0]}
        written = _write_run_format(dst_path, first, run_config, step, force, meta)
    tensors = sum(len(s) for s in states.values())
    return ConversionResult(
        destination=written,
        format=fmt,
        weights=weights,
        step=step,
        tensors=tensors,
        parameters=sum(int(t.numel()) for t in first.values()),
        source=str(source.path),
        source_kind=source.kind,
        source_dtypes=sorted(tree.source_dtypes),
        config=cfg,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------- writing


def _official_file(dst: Path, step: int) -> Path:
    # DST may name the checkpoint file itself (…/checkpoint_7000) or the folder to hold it.
    return dst if _CHECKPOINT_NAME.fullmatch(dst.name) else dst / f"checkpoint_{step}"


def _check_destination_free(dst: Path, fmt: str, force: bool) -> None:
    if force or not dst.exists():
        return
    if fmt == "official" and dst.is_dir() and not _CHECKPOINT_NAME.fullmatch(dst.name):
        if not any(dst.iterdir()):
            return  # an empty folder is free
    raise UserError(f"Destination {dst} already exists; pass --force to overwrite it.")


def _write_official(dst: Path, params: dict, ema: dict, step: int, force: bool) -> Path:
    target = _official_file(dst, step)
    folder = target.parent
    others = [
        p.name
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := _CHECKPOINT_NAME.fullmatch(p.name)) and int(m.group(1)) > step
    ]
    if others:
        # Loaders take the highest step in a folder: the converted file would be ignored.
        raise UserError(
            f"{folder} already holds {', '.join(sorted(others))}, which loaders would pick "
            f"instead of checkpoint_{step}; choose an empty destination."
        )
    if target.exists() and not force:
        raise UserError(f"Destination {target} already exists; pass --force to overwrite it.")

    created = not folder.exists()
    try:
        # Written to a temporary name and renamed. With one set of weights `params` and
        # `ema_params1` hold the same tensor objects, which torch.save stores once.
        save_official_checkpoint(target, params, ema, step)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return target


def _write_run_format(
    dst: Path, state: dict, run_config: Any, step: int, force: bool, meta: dict
) -> Path:

    if dst.exists() and not force:
        raise UserError(f"Destination {dst} already exists; pass --force to overwrite it.")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"Destination {dst} is a file; the elfctl format is a directory.")
    # Atomic: built in a temporary folder, renamed into place.
    return save_model_checkpoint(dst, state, run_config, step, extra_meta=meta)


def _replace_dir(new: Path, dst: Path, force: bool) -> None:
    """Move the finished folder into place; an existing one is replaced only with --force."""
    if dst.exists():
        if not force:
            raise UserError(f"Destination {dst} already exists; pass --force to overwrite it.")
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        os.replace(new, dst)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    else:
        os.replace(new, dst)


# ----------------------------------------------------------------------------- T5 encoder


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy (or JAX) arrays and nothing else.

    JAX arrays pickle as `jax._src.array._reconstruct_array(np._reconstruct, args, state,
    aval_state)`; that is rebuilt here as the numpy array it wraps, so no JAX is needed.
    Any other global (os.system, ...) is refused: the pickle comes from the internet.
    """

    def find_class(self, module: str, name: str) -> Any:
        import collections
        import importlib

        import ml_dtypes

        try:  # numpy 2 moved numpy.core to numpy._core; old pickles name either
            core = importlib.import_module("numpy._core")
        except ImportError:
            core = importlib.import_module("numpy.core")
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy.core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy._core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy.core.numeric", "_frombuffer"): core.numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): core.numeric._frombuffer,
            ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
            ("jax.numpy", "bfloat16"): ml_dtypes.bfloat16,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("flax.core.frozen_dict", "FrozenDict"): _frozen_dict,
            ("jax._src.array", "_reconstruct_array"): _reconstruct_jax_array,
        }
        if (module, name) not in allowed:
            raise UserError(
                f"The encoder pickle refers to {module}.{name}; only arrays and dicts are allowed."
            )
        return allowed[(module, name)]


def _frozen_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


def _reconstruct_jax_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    array = fun(*args)
    array.__setstate__(arr_state)
    return array


def load_t5_pickle(path: Path) -> dict[str, np.ndarray]:
    """The JAX T5 encoder pickle -> {'/'-joined name: array}, unwrapping a top `params`."""
    try:
        with open(path, "rb") as f:
            tree = _SafeUnpickler(f).load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{path} is not a readable encoder pickle ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} does not hold a dict of parameters.")
    tree = _unwrap(tree)
    return dict(_flatten(tree, ""))


def t5_hf_name(jax_name: str) -> tuple[str, bool]:
    """JAX T5 name -> (Hugging Face T5EncoderModel name, transpose)."""
    if jax_name == "shared/embedding":
        return "shared.weight", False
    parts = jax_name.split("/")
    out = []
    for p in parts:
        if m := re.fullmatch(r"(block|layer)_(\d+)", p):
            out += [m.group(1), m.group(2)]
        else:
            out.append(p)
    if out[-1] == "kernel":
        return ".".join(out[:-1] + ["weight"]), True
    if out[-2:] == ["relative_attention_bias", "rel_embedding"]:
        return ".".join(out[:-1] + ["weight"]), False
    return ".".join(out), False


def _t5_config(flat: dict[str, np.ndarray]) -> Any:
    from transformers import T5Config

    def shape(name: str) -> tuple[int, ...]:
        if name not in flat:
            raise UserError(f"The encoder pickle has no '{name}', so it is not a T5 encoder.")
        return tuple(np.shape(flat[name]))

    vocab, d_model = shape("shared/embedding")
    buckets, heads = shape(
        "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding"
    )
    inner = shape("encoder/block_0/layer_0/SelfAttention/q/kernel")[1]
    d_ff = shape("encoder/block_0/layer_1/DenseReluDense/wi/kernel")[1]
    layers = 1 + max(int(m.group(1)) for k in flat if (m := re.match(r"encoder/block_(\d+)/", k)))
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # not stored in the weights; T5's value
        feed_forward_proj="relu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def convert_t5_state(flat: dict[str, np.ndarray]) -> tuple[dict[str, Any], Any]:
    """Validated T5 pickle -> (HF T5EncoderModel state dict, T5Config)."""
    import torch

    config = _t5_config(flat)
    expected = _t5_expected_shapes(config)
    produced = {}
    leftover = []
    for jax_name, array in flat.items():
        name, transpose = t5_hf_name(jax_name)
        if name not in expected:
            leftover.append(jax_name)
            continue
        array = np.asarray(array)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            raise UserError(f"Encoder tensor {jax_name} is {array.dtype}, not floating point.")
        array = array.astype(np.float32)
        produced[name] = (jax_name, np.ascontiguousarray(array.T) if transpose else array)
    missing = sorted(set(expected) - set(produced))
    wrong = [  # reported in the pickle's own (JAX) layout
        f"{src} is {list(np.shape(flat[src]))}, expected "
        f"{list(reversed(expected[n])) if t5_hf_name(src)[1] else list(expected[n])}"
        for n, (src, a) in produced.items()
        if tuple(a.shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append("missing " + _first(missing))
    if leftover:
        problems.append("unexpected " + _first(sorted(leftover)))
    if wrong:
        problems.append("wrong shape: " + _first(wrong))
    if problems:
        raise UserError(
            "The encoder pickle does not match a T5 encoder: " + "; ".join(problems) + "."
        )
    state = {name: torch.from_numpy(array) for name, (_, array) in produced.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied, as in T5
    return state, config


def _t5_expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    d, inner, ff = config.d_model, config.d_kv * config.num_heads, config.d_ff
    shapes = {"shared.weight": (config.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(config.num_layers):
        attn = f"encoder.block.{i}.layer.0"
        shapes[f"{attn}.layer_norm.weight"] = (d,)
        for proj in "qkv":
            shapes[f"{attn}.SelfAttention.{proj}.weight"] = (inner, d)
        shapes[f"{attn}.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            shapes[f"{attn}.SelfAttention.relative_attention_bias.weight"] = (
                config.relative_attention_num_buckets,
                config.num_heads,
            )
        ff_layer = f"encoder.block.{i}.layer.1"
        shapes[f"{ff_layer}.layer_norm.weight"] = (d,)
        shapes[f"{ff_layer}.DenseReluDense.wi.weight"] = (ff, d)
        shapes[f"{ff_layer}.DenseReluDense.wo.weight"] = (d, ff)
    return shapes


def _find_pickle(path: Path) -> Path:
    if path.is_file():
        return path
    pickles = sorted(path.rglob("*.pkl")) if path.is_dir() else []
    if len(pickles) != 1:
        found = ", ".join(p.name for p in pickles) or "none"
        raise UserError(f"{path} must hold exactly one .pkl encoder file (found: {found}).")
    return pickles[0]


def convert_t5_encoder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    compare: str | None = None,
) -> dict[str, Any]:
    """The JAX T5 encoder pickle -> a Hugging Face `T5EncoderModel` folder at `dst`.

    With `compare` (a folder or hub id of a reference T5), also reports the largest absolute
    weight difference and the largest hidden-state difference on a fixed token batch.
    """
    from transformers import T5EncoderModel

    started = time.perf_counter()
    if compare:
        hub.check_local(compare, "the reference T5 encoder")  # before anything is written
    dst_path = Path(dst).expanduser()
    if dst_path.exists() and not force:
        raise UserError(f"Destination {dst_path} already exists; pass --force to overwrite it.")
    pickle_path = _find_pickle(resolve_jax_path(str(src), allow_patterns=["*.pkl"]))
    flat = load_t5_pickle(pickle_path)
    state, config = convert_t5_state(flat)
    model = T5EncoderModel(config)
    model.load_state_dict(state, strict=True)  # raises on any mismatch
    model.eval()
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.", suffix=".tmp", dir=dst_path.parent))
    try:
        model.save_pretrained(tmp)
        _replace_dir(tmp, dst_path, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result: dict[str, Any] = {
        "destination": str(dst_path),
        "source": str(pickle_path),
        "tensors": len(flat),
        "parameters": sum(int(np.size(a)) for a in flat.values()),
        "layers": config.num_layers,
        "d_model": config.d_model,
        "vocab_size": config.vocab_size,
    }
    if compare:
        result.update(compare_t5(model, compare))
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def compare_t5(model: Any, reference: str) -> dict[str, Any]:
    """Largest absolute differences (weights, and hidden states on fixed ids) to a reference."""
    import torch
    from transformers import T5EncoderModel

    # A local folder or a hub id (e.g. t5-small), through the normal HF loading path.
    ref = load_pretrained(T5EncoderModel.from_pretrained, reference, "the reference T5 encoder")
    ref.eval()
    ours, theirs = model.state_dict(), ref.state_dict()
    worst_name, worst = "", 0.0
    for name, tensor in ours.items():
        if name not in theirs or theirs[name].shape != tensor.shape:
            raise UserError(f"The reference T5 '{reference}' differs in tensor {name}.")
        diff = (tensor.float() - theirs[name].float()).abs().max().item()
        if diff >= worst:
            worst_name, worst = name, diff
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        h_ours = model(input_ids=ids).last_hidden_state
        h_ref = ref(input_ids=ids).last_hidden_state
    return {
        "compare": reference,
        "max_weight_diff": worst,
        "max_weight_diff_tensor": worst_name,
        "max_hidden_diff": (h_ours - h_ref).abs().max().item(),
    }


def parameter_count(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in expected_jax_shapes(cfg).values())
