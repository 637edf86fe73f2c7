"""Reading the official JAX/Flax checkpoints without JAX (docs/method.md section 7).

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
cast to float32 as it arrives, so peak memory stays near the size of the output. A source is
a local path or a hub repo id (`org/repo[/sub/path]`), downloaded to the cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elfctl import hub
from elfctl.errors import UserError

# progress(done, total, unit): called while reading; unit is "tensors" or "MiB".
Progress = Callable[[int, int, str], None]

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?")


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
    if len(items) == 1 and not CHECKPOINT_NAME.fullmatch(items[0].name):
        return Source(items[0], "orbax", _step_from_name(path))
    # Per-leaf arrays without a readable _METADATA.
    if (path / "_CHECKPOINT_METADATA").exists() or any(path.glob("*/.zarray")):
        return Source(path, "orbax", _step_from_name(path))
    # checkpoint_<step> entries (flax), else <step> folders (an Orbax CheckpointManager).
    steps = {
        int(m.group(1)): entry
        for entry in path.iterdir()
        if (m := CHECKPOINT_NAME.fullmatch(entry.name))
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
    m = CHECKPOINT_NAME.fullmatch(path.name)
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


def unwrap_params(tree: dict[str, Any]) -> dict[str, Any]:
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
                    tree = unwrap_params(_unchunk(unpacker.unpack()))
                    out[key] = dict(flatten_tree(tree, ""))
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


def flatten_tree(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten_tree(value, f"{prefix}/{key}" if prefix else str(key))
    else:
        yield prefix, tree
