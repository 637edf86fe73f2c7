"""Official JAX/Flax checkpoints and the JAX T5 encoder -> PyTorch (docs/method.md section 7).

The entry points behind `elfctl convert-jax`. No JAX is needed: `jax_readers` reads the
Orbax and msgpack layouts, `param_map` names, checks and transposes every tensor,
`t5_pickle` reads the encoder; here they are tied together and the result is written
atomically, never over a destination that exists unless forced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from elfctl import hub
from elfctl.config import Config, ModelConfig, resolve
from elfctl.convert.jax_readers import (
    CHECKPOINT_NAME,
    Progress,
    find_checkpoint,
    read_checkpoint,
    resolve_jax_path,
)
from elfctl.convert.param_map import convert_tree, final_layer_is_zero, infer_config
from elfctl.convert.t5_pickle import convert_t5_state, find_pickle, load_t5_pickle
from elfctl.errors import UserError
from elfctl.model.checkpoints import save_model_checkpoint, save_official_checkpoint
from elfctl.model.encoder import load_pretrained

WEIGHT_SUBTREES = {
    "ema": ("ema_params1",),
    "params": ("params",),
    "both": ("params", "ema_params1"),
}


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
    return dst if CHECKPOINT_NAME.fullmatch(dst.name) else dst / f"checkpoint_{step}"


def _check_destination_free(dst: Path, fmt: str, force: bool) -> None:
    if force or not dst.exists():
        return
    if fmt == "official" and dst.is_dir() and not CHECKPOINT_NAME.fullmatch(dst.name):
        if not any(dst.iterdir()):
            return  # an empty folder is free
    raise UserError(f"Destination {dst} already exists; pass --force to overwrite it.")


def _write_official(dst: Path, params: dict, ema: dict, step: int, force: bool) -> Path:
    target = _official_file(dst, step)
    folder = target.parent
    others = [
        p.name
        for p in (folder.iterdir() if folder.is_dir() else [])
        if (m := CHECKPOINT_NAME.fullmatch(p.name)) and int(m.group(1)) > step
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
    pickle_path = find_pickle(resolve_jax_path(str(src), allow_patterns=["*.pkl"]))
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
