"""A checkpoint's training_state/ folder: everything exact resume needs beyond the EMA weights.

    model_raw.pt       the raw (not averaged) weights          written by the main process
    optimizer.pt       optimiser state
    scheduler.pt       learning-rate schedule state
    ema_updates.pt     how many updates the EMA has taken
    trainer.json       where in the data order training stands, and the number of processes
    rng_rank<R>.pt     process R's training generator and torch RNG   written by every process
    stream_rank<R>.json  process R's position in its stream (data.streaming)

Everything loads onto the process's own device; a CPU process's is plain "cpu"
(`distributed.local_device`), which is what lets a multi-process CPU run resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from elfctl import records
from elfctl.distributed import local_device
from elfctl.errors import UserError
from elfctl.model.checkpoints import WEIGHTS_FILE

STATE_DIR = "training_state"


@dataclass
class TrainingState:
    """What one process reads back from a checkpoint's training_state/ folder."""

    step: int
    epoch: int
    position: int
    raw_weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor]  # the checkpoint's model.safetensors
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema_updates: Any
    rng: dict[str, torch.Tensor]  # {"generator": ..., "torch": ...} of this process
    stream: dict | None  # this process's stream position (data.streaming), else None


def write_process_state(folder: Path, rank: int, generator, stream=None) -> None:
    """Every process's own part: its RNG states and, when streaming, its stream position."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    records.atomic_torch_save(folder / f"rng_rank{rank}.pt", state)
    if stream is not None:
        records.atomic_write_text(
            folder / f"stream_rank{rank}.json", json.dumps(stream.state_dict())
        )


def write_shared_state(
    folder: Path, raw_model, optimizer, scheduler, ema_updates, data_position: dict
) -> None:
    """The main process's part. `folder` is a staging folder renamed into place whole, so
    these files need no atomic writes of their own."""
    raw = {k: v.detach().cpu() for k, v in raw_model.state_dict().items()}
    torch.save(raw, folder / "model_raw.pt")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save(ema_updates, folder / "ema_updates.pt")
    (folder / "trainer.json").write_text(json.dumps(data_position))


def read_training_state(checkpoint: Path, rank: int, world_size: int, device) -> TrainingState:
    """Process `rank`'s view of `checkpoint`'s training state (and its EMA weights), on
    `device`. A checkpoint written by another number of processes is a UserError: the data
    order would differ."""
    folder = checkpoint / STATE_DIR
    fix = (
        f"delete {checkpoint} to resume from the checkpoint before it, or pass --resume never "
        "to start over."
    )
    trainer = records.read_json_state(folder / "trainer.json", fix)
    if trainer["world_size"] != world_size:
        raise UserError(
            f"{checkpoint} was written by {trainer['world_size']} processes; resume it with "
            f"the same number (this run has {world_size})."
        )
    device = local_device(device)

    def load(name: str, location=None):
        with records.reading_state(folder / name, fix):
            return torch.load(folder / name, map_location=location, weights_only=True)

    def load_ema():
        with records.reading_state(checkpoint / WEIGHTS_FILE, fix):
            return load_file(str(checkpoint / WEIGHTS_FILE), device=str(device))

    stream_file = folder / f"stream_rank{rank}.json"
    meta = records.read_json_state(checkpoint / "meta.json", fix)
    return TrainingState(
        step=meta["step"],
        epoch=trainer["epoch"],
        position=trainer["position"],
        raw_weights=load("model_raw.pt", device),
        ema_weights=load_ema(),
        optimizer=load("optimizer.pt", device),
        scheduler=load("scheduler.pt", "cpu"),
        ema_updates=load("ema_updates.pt", "cpu"),
        rng=load(f"rng_rank{rank}.pt", "cpu"),  # RNG states are CPU byte tensors
        stream=records.read_json_state(stream_file, fix) if stream_file.exists() else None,
    )
