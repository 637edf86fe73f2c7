"""Find, load and save ELF checkpoints (docs/method.md section 7).

Two formats are read:

* official PyTorch: a `torch.save` dict in a file `checkpoint_<step>` with
  `params` and `ema_params1` state dicts (we sample with `ema_params1`);
* ours: a directory `step_<n>/` holding `model.safetensors` (EMA weights),
  `config.yaml` (the resolved config) and `meta.json`, written last, so a
  directory without `meta.json` is an unfinished write and is ignored.

A source is a local file or directory, a run directory (its newest complete
checkpoint), a hub repo id (its highest-step `checkpoint_*`) or a hub sub-path
`org/repo/checkpoint_7000`. Local paths never touch the network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from elfctl import hub, records
from elfctl.config import Config, ModelConfig, dump_yaml, from_dict, resolve
from elfctl.errors import UserError
from elfctl.model.network import ELF, infer_model_config
from elfctl.version import __version__

OFFICIAL_PATTERN = re.compile(r"^checkpoint_(\d+)$")
STEP_DIR_PATTERN = re.compile(r"^step_(\d+)$")
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights plus whatever is known about how they were made."""

    state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig
    config: Config | None  # the full training config, for our own format
    step: int | None
    path: str
    format: str  # "official" | "elfctl"

    def sha256(self) -> str:
        file = Path(self.path)  # the file the weights were read from
        if file.is_dir():
            file = file / WEIGHTS_FILE
        return file_sha256(file)


# ---------------------------------------------------------------------------
# Resolving a source string to a file


def resolve_checkpoint(source: str) -> tuple[Path, str]:
    """-> (local path, format). Downloads from the hub only for non-local sources."""
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(path)
    if source.startswith((".", "/", "~")) or "/" not in source:
        raise UserError(f"Checkpoint not found: {source} (no such file or directory).")
    return _resolve_hub(source)


def _resolve_local(path: Path) -> tuple[Path, str]:
    if path.is_file():
        if path.suffix == ".safetensors":
            return path.parent, "elfctl"
        return path, "official"
    if (path / "meta.json").is_file() and (path / WEIGHTS_FILE).is_file():
        return path, "elfctl"
    ours = _newest(path / "checkpoints", STEP_DIR_PATTERN, complete=True)
    if ours is None:
        ours = _newest(path, STEP_DIR_PATTERN, complete=True)
    if ours is not None:
        return ours, "elfctl"
    official = _newest(path, OFFICIAL_PATTERN)
    if official is not None:
        if official.is_dir():
            raise UserError(
                f"{official} is an Orbax (JAX) checkpoint directory; convert it first with "
                f"`elfctl convert-jax {official} OUT`."
            )
        return official, "official"
    raise UserError(
        f"No checkpoint found in {path}: expected checkpoint_<step> files, a run directory "
        "with checkpoints/step_<n>/, or a step_<n>/ directory with model.safetensors."
    )


def _newest(folder: Path, pattern: re.Pattern, complete: bool = False) -> Path | None:
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = pattern.match(child.name)
        if match and (not complete or (child / "meta.json").is_file()):
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def list_step_dirs(folder: Path) -> list[Path]:
    """Complete step_<n> checkpoint directories, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STEP_DIR_PATTERN.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def _resolve_hub(source: str) -> tuple[Path, str]:
    from huggingface_hub import hf_hub_download

    parts = source.strip("/").split("/")
    repo_id, sub_path = "/".join(parts[:2]), "/".join(parts[2:])
    with hub.access(repo_id, "the checkpoint") as offline:
        if not sub_path:
            names = [n for n in _repo_files(repo_id, offline) if OFFICIAL_PATTERN.match(n)]
            if not names:
                raise UserError(f"Hub repo {repo_id} holds no checkpoint_<step> file.")
            sub_path = max(names, key=lambda n: int(OFFICIAL_PATTERN.match(n).group(1)))
        path = Path(hf_hub_download(repo_id, sub_path))
    _download_config_beside(repo_id, sub_path)
    return path, "official"


def _repo_files(repo_id: str, offline: bool) -> list[str]:
    """The files of a hub model repo: listed by the hub, or offline those in the cache."""
    from huggingface_hub import list_repo_files, snapshot_download

    if not offline:
        return list_repo_files(repo_id)
    folder = Path(snapshot_download(repo_id, allow_patterns=["checkpoint_*"]))
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _download_config_beside(repo_id: str, sub_path: str) -> None:
    """Fetch the config.yaml an `elfctl export` upload keeps next to its checkpoint."""
    from huggingface_hub import hf_hub_download

    folder = "/".join(sub_path.split("/")[:-1])
    try:
        with hub.access(repo_id, "the checkpoint's config.yaml"):
            hf_hub_download(repo_id, f"{folder}/config.yaml" if folder else "config.yaml")
    except UserError:
        pass  # an official upload (no config beside the checkpoint), or offline and not cached


# ---------------------------------------------------------------------------
# Loading


def load_checkpoint(source: str, *, weights: str = "ema") -> Checkpoint:
    """Read a checkpoint's weights (EMA by default) and what is known about it."""
    path, fmt = resolve_checkpoint(source)
    if fmt == "elfctl":
        return _load_ours(path, weights)
    return _load_official(path, weights)


def _load_official(path: Path, weights: str) -> Checkpoint:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing
        raise UserError(
            f"{path} is not a PyTorch checkpoint that loads safely with weights_only=True "
            f"({type(e).__name__})."
        ) from None
    key = {"ema": "ema_params1", "params": "params"}[weights]
    if not isinstance(blob, dict) or key not in blob:
        keys = ", ".join(sorted(blob)) if isinstance(blob, dict) else type(blob).__name__
        raise UserError(f"{path} is not an ELF checkpoint: no '{key}' entry (found: {keys}).")
    state_dict = {k: v.float() for k, v in blob[key].items()}
    step = blob.get("step")
    step = int(step) if step is not None else _step_from_name(path.name)
    model_config = _infer(state_dict, path)
    # `elfctl export --format official` puts the run's config beside the file: it brings
    # the latent space (tokenizer, encoder, statistics) and the sampling settings.
    config = _config_beside(path)
    if config is not None:
        model_config = config.model
    return Checkpoint(state_dict, model_config, config, step, str(path), "official")


def _config_beside(path: Path) -> Config | None:
    """Our config.yaml next to an official checkpoint file, if there is one.

    A config.yaml in another schema (some other tool's) is not ours and is left alone.
    """
    import yaml

    beside = path.parent / "config.yaml"
    if not beside.is_file():
        return None
    try:
        data = yaml.safe_load(beside.read_text())
        return from_dict(data) if isinstance(data, dict) and "model" in data else None
    except (yaml.YAMLError, UserError):
        return None


RAW_WEIGHTS_FILE = Path("training_state") / "model_raw.pt"


def _load_ours(path: Path, weights: str = "ema") -> Checkpoint:
    from safetensors.torch import load_file

    fix = f"delete {path} to fall back to the checkpoint before it, or pass another checkpoint."
    meta = records.read_json_state(path / "meta.json", fix)
    config = read_config_state(path / "config.yaml", fix)
    if weights == "params":
        raw = path / RAW_WEIGHTS_FILE
        if not raw.is_file():
            raise UserError(
                f"{path} holds only EMA weights (no {RAW_WEIGHTS_FILE}); use the EMA weights."
            )
        with records.reading_state(raw, fix):
            state_dict = torch.load(raw, map_location="cpu", weights_only=True)
        return Checkpoint(state_dict, config.model, config, meta.get("step"), str(raw), "elfctl")
    with records.reading_state(path / WEIGHTS_FILE, fix):
        state_dict = load_file(str(path / WEIGHTS_FILE))
    return Checkpoint(state_dict, config.model, config, meta.get("step"), str(path), "elfctl")


def read_config_state(path: Path, fix: str) -> Config:
    """A config.yaml we wrote (in a checkpoint or run directory); damage is named with `fix`."""
    import yaml

    with records.reading_state(path, fix):
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (not a YAML mapping); {fix}")
    return from_dict(data)


def _infer(state_dict: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    try:
        return infer_model_config(state_dict)
    except KeyError as e:
        raise UserError(f"{path} is not an ELF checkpoint: {e.args[0]}.") from None


def _step_from_name(name: str) -> int | None:
    match = OFFICIAL_PATTERN.match(name)
    return int(match.group(1)) if match else None


def build_model(
    state_dict: dict[str, torch.Tensor], model_config: ModelConfig, source: str = "checkpoint"
) -> ELF:
    """An ELF with exactly these weights; every missing, extra or misshapen tensor is named."""
    with torch.device("meta"):
        model = ELF(model_config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing:
        raise UserError(f"{source} is missing tensor(s) {', '.join(missing[:5])}.")
    if extra:
        raise UserError(f"{source} has unexpected tensor(s) {', '.join(extra[:5])}.")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != tuple(shape):
            what = " (vocabulary size)" if name in ("unembed_kernel", "unembed_bias") else ""
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, "
                f"the model expects {tuple(shape)}{what}."
            )
    model.load_state_dict(state_dict, strict=True, assign=True)
    model._rope_cache.clear()
    return model


def load_model(
    source: str, *, config: Config | ModelConfig | None = None, device: str = "cpu"
) -> ELF:
    """The network from `source` with its EMA weights, in eval mode, on `device`.

    `config` (a full Config or a ModelConfig) fixes the architecture; without it
    the sizes are read off the tensors' shapes. `model.config` is the full Config that
    describes the checkpoint (`checkpoint_config`), `model.cfg` its network's sizes.
    """
    ckpt = load_checkpoint(source)
    model_config = ckpt.model_config
    if isinstance(config, Config):
        model_config = config.model
    elif isinstance(config, ModelConfig):
        model_config = config
    model = build_model(ckpt.state_dict, model_config, source)
    # What describes it (tokenizer, encoder, latent statistics, sampling settings), as
    # `elfctl sample` reads it: the README points Python users at `model.config`.
    model.config = config if isinstance(config, Config) else checkpoint_config(ckpt, None)
    model.config.model = model_config
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------
# Saving


def save_official_checkpoint(
    path: str | Path,
    params: dict[str, torch.Tensor],
    ema_params: dict[str, torch.Tensor],
    step: int,
    epoch: int = 0,
) -> Path:
    """Write the official PyTorch format (readable by the official port and by us)."""
    blob = {
        "params": {k: v.detach().cpu().float().contiguous() for k, v in params.items()},
        "ema_params1": {k: v.detach().cpu().float().contiguous() for k, v in ema_params.items()},
        "opt_state": {},
        "lr_scheduler": {},
        "step": int(step),
        "epoch": int(epoch),
        "dropout_rng": None,
        "grad_accum_buffers": None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def save_model_checkpoint(
    directory: str | Path,
    ema_state_dict: dict[str, torch.Tensor],
    config: Config,
    step: int,
    extra_meta: dict | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write our format atomically: build in a temp dir, then rename into place.

    `extra_files` maps names inside the checkpoint to existing files or folders to
    move in (the training state for resume).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in ema_state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / "config.yaml").write_text(dump_yaml(config))
        for name, src in (extra_files or {}).items():
            shutil.move(str(src), str(tmp / name))
        meta = {"format": "elfctl-checkpoint", "step": int(step), "elfctl_version": __version__}
        meta.update(extra_meta or {})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # written last
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_config(ckpt: Checkpoint, preset: str | Config | None) -> Config:
    """The config that describes a checkpoint.

    The network always comes from the checkpoint (our own checkpoints also bring the
    latent space they were trained in: tokenizer, encoder, latent statistics). A preset
    supplies everything else (data layout, sampling settings); without one, our own
    checkpoints use the config they were trained with and official ones the built-in
    defaults (T5-small and the official unconditional sampling settings).
    """
    if preset is None:
        if ckpt.config is not None:
            return ckpt.config
        config = Config()
    else:
        config = copy.deepcopy(resolve(preset) if isinstance(preset, str) else preset)
    if ckpt.config is not None:
        config.model, config.encoder = ckpt.config.model, ckpt.config.encoder
    else:
        config.model = ckpt.model_config
    return config
