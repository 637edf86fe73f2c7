"""Experiment tracking through Accelerate's trackers (`--log-with tensorboard,wandb,...`).

Each tracker gets, from the main process only:
  * hyper-parameters: the run's resolved config, flattened to dotted keys
    (`optim.blr`, `model.depth`; lists and nulls as JSON text, which every tracker takes);
  * the scalars of train_log.jsonl at every logged step, under the same names
    (loss, l2, ce, lr, grad_norm, tokens_per_s, steps_per_s, epoch), at that step;
  * the periodic samples (`train.sample_every`) as text where the tracker takes text:
    TensorBoard's text tab (`samples`), a W&B table (`samples`, columns id and text).

The run name is the run directory's name. TensorBoard writes under RUN_DIR/logs/<name>/;
W&B into RUN_DIR/wandb/ (project `$WANDB_PROJECT`, default `elfctl`; `WANDB_MODE=offline`
works as usual). A tracker's package is an optional extra; a missing one is an error that
names it before anything runs.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from elfctl.config import Config, to_dict
from elfctl.errors import UserError

# tracker -> (module it needs, what to install)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install 'elfctl[tensorboard]'"),
    "wandb": ("wandb", "pip install 'elfctl[wandb]'"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "aim": ("aim", "pip install aim"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
    "trackio": ("trackio", "pip install trackio"),
}
SCALARS = ("loss", "l2", "ce", "lr", "grad_norm", "tokens_per_s", "steps_per_s", "epoch")
LOG_FOLDER = "logs"


def parse_log_with(value: str | list[str] | None) -> list[str]:
    """'tensorboard,wandb' (or repeated flags) -> ['tensorboard', 'wandb'], each checked:
    known to Accelerate and its package installed."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise UserError(
                f"Unknown tracker '{name}' for --log-with; choose from "
                f"{', '.join(TRACKER_PACKAGES)}."
            )
        module, install = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(
                f"--log-with {name} needs the {module} package, which is not installed: {install}."
            ) from None
    return list(dict.fromkeys(names))


def hyperparameters(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config flattened to dotted keys with scalar values (what every tracker accepts)."""
    out: dict[str, bool | int | float | str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix.rstrip(".")
        if isinstance(node, (bool, int, float, str)):
            out[key] = node
        else:  # lists, empty dicts, None
            out[key] = json.dumps(node)

    walk(to_dict(cfg), "")
    return out


class Tracking:
    """Accelerate trackers for one run directory; every call is a no-op off the main process
    or without trackers."""

    def __init__(self, names: list[str], run_dir: Path, is_main: bool, run_name: str | None = None):
        self.names = names if is_main else []
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.trackers: list = []

    def start(self, cfg: Config) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        for name in self.names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "wandb":
                self.run_dir.mkdir(parents=True, exist_ok=True)
                project = os.environ.get("WANDB_PROJECT", "elfctl")
                tracker = cls(project, name=self.run_name, dir=str(self.run_dir))
            elif cls.requires_logging_directory:
                tracker = cls(self.run_name, str(self.run_dir / LOG_FOLDER))
            else:
                tracker = cls(self.run_name)
            tracker.start()
            tracker.store_init_configuration(hyperparameters(cfg))
            self.trackers.append(tracker)

    def log(self, record: dict) -> None:
        """One train_log.jsonl record's scalars at its step."""
        values = {k: float(record[k]) for k in SCALARS if k in record}
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def log_samples(self, texts: list[str], step: int) -> None:
        if not texts:
            return
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                lines = "\n".join(f"{i}. {_markdown_safe(t)}" for i, t in enumerate(texts))
                tracker.log({"samples": lines}, step=step)
            elif tracker.name == "wandb":
                rows = [[i, t] for i, t in enumerate(texts)]
                tracker.log_table("samples", columns=["id", "text"], data=rows, step=step)
            # Other trackers take no free text through Accelerate's interface.

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _markdown_safe(text: str) -> str:
    # TensorBoard renders text as markdown: keep words like `<unk>` and `*` visible.
    return text.replace("\\", "\\\\").replace("<", "&lt;").replace("*", "\\*") or "(empty)"
