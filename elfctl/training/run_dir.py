"""The run directory of a training run: what is in it, and whether a new start may use it.

    config.yaml            the resolved config
    train_log.jsonl        one line per logged step
    checkpoints/step_N/    model.safetensors (EMA weights), config.yaml, meta.json,
                           training_state/ (raw weights, optimiser, scheduler, RNG)
    samples/step_N.jsonl   periodic samples from the EMA weights (previews.py)

A run directory belongs to one run: starting again in it resumes that run, and a config that
differs in anything but the settings listed in RESUMABLE_CHANGES is refused, never mixed in.
Only the main process writes here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from elfctl import records
from elfctl.config import Config, dump_yaml, to_dict
from elfctl.errors import UserError
from elfctl.model.checkpoints import list_step_dirs, read_config_state

CONFIG_FILE = "config.yaml"
LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"

# Config sections that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.max_minutes",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.sample_count",
    "train.epochs",
    "train.compile",
    "train.gpu_precision",  # a resumed run may move to other hardware
    "data.num_proc",  # how the rows are prepared, not what they are
    "data.cache_dir",
    "description",
}


def step_name(step: int) -> str:
    """The name of step N's checkpoint folder and samples file: step_00000042."""
    return f"step_{step:08d}"


def prepare_run_dir(run_dir: Path, cfg: Config, resume: str) -> Path | None:
    """Check the run directory against the config; return the checkpoint to resume from."""
    checkpoints = list_step_dirs(run_dir / CHECKPOINTS)
    saved_config = run_dir / CONFIG_FILE
    saved = read_saved_config(run_dir)
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "meta.json").is_file() or not (path / "training_state").is_dir():
            raise UserError(f"--resume {resume} is not a complete training checkpoint directory.")
        return path
    if resume == "never" and (checkpoints or saved_config.exists()):
        raise UserError(
            f"{run_dir} already holds a run; resume it with --resume auto or choose a new "
            "--run-dir."
        )
    if saved is not None:
        check_same_run(saved, cfg, run_dir)
    return checkpoints[-1] if checkpoints else None


def read_saved_config(run_dir: Path) -> Config | None:
    """The resolved config a run directory was started with, if any."""
    path = Path(run_dir) / CONFIG_FILE
    fix = f"restore it (it records how {run_dir} was started), or use another --run-dir."
    return read_config_state(path, fix) if path.exists() else None


def check_same_run(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A UserError naming the first setting, outside RESUMABLE_CHANGES, that differs."""
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or key.startswith(("sampling", "train.init_from")):
            continue
        if old.get(key) != new.get(key):
            raise UserError(
                f"{run_dir} was trained with {key}={old.get(key)!r}, not {new.get(key)!r}; "
                "use a new --run-dir or the original settings."
            )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "paper":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start_run(run_dir: Path, cfg: Config, step: int) -> None:
    """Before the first step of a (resumed) run: save the config, and drop log lines past
    `step`, whose steps will be trained again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records.atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg))
    trim_log(run_dir, step)


def append_log(run_dir: Path, record: dict) -> None:
    records.append_jsonl(run_dir / LOG_FILE, record)


def trim_log(run_dir: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (and none cut short by a kill)."""
    log = run_dir / LOG_FILE
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
    records.atomic_write_text(log, "".join(kept))


def apply_retention(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (at least one is always kept)."""
    for old in list_step_dirs(run_dir / CHECKPOINTS)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
