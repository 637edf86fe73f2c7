"""Fine-tuning: start a training run from the weights of an existing checkpoint.

`elfctl train --init SOURCE` (config `train.init`) takes any checkpoint `elfctl sample --repo`
accepts: a hub id or sub-path, an official `checkpoint_<step>` file or folder, a converted
JAX checkpoint, one of our `step_<n>/` checkpoints or a run directory (its newest
checkpoint). The EMA weights are used by default (`train.init_weights: raw` takes the raw
training weights: the official `params`, or our `training_state/model_raw.pt`). Only the
weights carry over: optimiser, step count, schedule and EMA start fresh.

The architecture is the checkpoint's: every model setting the checkpoint determines must equal
the config's, or the run stops with an error that names each mismatch (a preset or
`--set` that contradicts the checkpoint is a mistake, not something to fix silently).
Where the weights came from (path, format, step, sha256 of the weights file, which
weights) is recorded in the run's config as `train.init_from`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from elfctl.config import Config, ModelConfig
from elfctl.errors import UserError
from elfctl.model.checkpoints import build_model, load_checkpoint

# Model settings an official checkpoint's tensors determine (t_eps is not stored in them).
SHAPE_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "bottleneck",
    "latent_dim",
    "vocab_size",
    "num_time_tokens",
    "num_sc_tokens",
    "num_mode_tokens",
    "self_cond",
)


@dataclass
class InitWeights:
    state_dict: dict[str, torch.Tensor]
    provenance: dict  # path, format, step, sha256, weights
    model_config: ModelConfig  # the checkpoint's architecture
    config: Config | None  # the checkpoint's full config, when it records one


def load_init_weights(checkpoint: str, weights: str = "ema") -> InitWeights:
    """The weights to start from and where they came from (through checkpoints.py)."""

    if weights not in ("ema", "raw"):
        raise UserError(f"--init-weights must be ema or raw, got '{weights}'.")
    ckpt = load_checkpoint(checkpoint, weights="ema" if weights == "ema" else "params")
    provenance = {
        "source": checkpoint,
        "path": ckpt.path,
        "format": ckpt.format,
        "step": ckpt.step,
        "sha256": ckpt.sha256(),
        "weights": weights,
    }
    return InitWeights(ckpt.state_dict, provenance, ckpt.model_config, ckpt.config)


def architecture_mismatches(config: ModelConfig, init: InitWeights) -> list[str]:
    """'model.KEY=CHECKPOINT_VALUE (config: VALUE)' for every setting that differs."""
    # Our own checkpoints record every model setting; official ones only what shapes show.
    names = [f.name for f in fields(ModelConfig)] if init.config is not None else SHAPE_FIELDS
    out = []
    for name in names:
        theirs, ours = getattr(init.model_config, name), getattr(config, name)
        if theirs != ours:
            out.append(f"model.{name}={theirs!r} (config: {ours!r})")
    return out


def check_architecture(config: ModelConfig, init: InitWeights) -> None:
    mismatches = architecture_mismatches(config, init)
    if mismatches:
        raise UserError(
            f"The --init checkpoint {init.provenance['source']} has "
            f"{', '.join(mismatches)}; use a preset that matches it or drop the contradicting "
            "--set."
        )


def init_model(cfg: Config, init: InitWeights):
    """An ELF with the checkpoint's weights, after checking the architecture against `cfg`."""

    check_architecture(cfg.model, init)
    label = f"The --init checkpoint {init.provenance['source']}"
    model = build_model(init.state_dict, cfg.model, label)
    return model.float().train().requires_grad_(True)
