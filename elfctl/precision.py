"""Which precision a run uses, and why: one rule for train, distill, sample and eval.

The official recipe trains and samples under bf16 autocast (docs/method.md sections 4-5), so a
plain `elfctl train --preset owt-b` on a GPU must not fall back to fp32 at a third of the
speed. The choice, first match wins:

  training (`--mixed-precision`, Accelerate)      sampling (`--precision`)
  1. --mixed-precision no|bf16                    1. --precision bf16|fp32
  2. Accelerate's choice: ACCELERATE_MIXED_PRECISION   (auto: go on)
     bf16 or fp16 (`accelerate launch
     --mixed_precision`, `accelerate config`)
  3. on a CUDA GPU with bf16: the config's        2. on a CUDA GPU with bf16: the config's
     `train.gpu_precision` (bf16 in every            `train.gpu_precision`
     official preset)
  4. otherwise fp32 (the CPU, or a GPU            3. otherwise fp32
     without bf16)

`accelerate launch` exports ACCELERATE_MIXED_PRECISION=no whenever neither its flag nor
its config names a precision, so "no" from Accelerate cannot be told from "nothing
chosen" and does not override the preset; ask for fp32 with `--mixed-precision no` or
`--set train.gpu_precision=fp32`. The rules are pure functions of their arguments, so they
are tested without a GPU; `training_precision` / `sampling_precision` read the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from elfctl.errors import UserError

# fp16 comes only from Accelerate (its own loss scaling); the flag offers what we test.
TRAINING_FLAGS = ("no", "bf16")
SAMPLING_FLAGS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: `mode` is Accelerate's name (no, bf16, fp16); `reason` says
    which rule chose it, for the start-up line and the run's records."""

    mode: str
    reason: str

    @property
    def name(self) -> str:
        """What run records call it: fp32, bf16-autocast or fp16-autocast."""
        return "fp32" if self.mode == "no" else f"{self.mode}-autocast"

    @property
    def sampling(self) -> str:
        """The sampler's name for it (`sampler.autocast_context`): fp32 or bf16."""
        return "fp32" if self.mode == "no" else self.mode

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def _gpu_default(gpu_precision: str, device_type: str, bf16_supported: bool) -> Precision:
    if device_type != "cuda":
        return Precision("no", f"fp32 on {device_type}")
    if gpu_precision == "fp32":
        return Precision("no", "the config's train.gpu_precision")
    if not bf16_supported:
        return Precision("no", "this GPU has no bf16")
    return Precision("bf16", "the config's GPU default, train.gpu_precision")


def resolve_training(
    flag: str | None,
    accelerate_env: str | None,
    gpu_precision: str,
    device_type: str,
    bf16_supported: bool,
) -> Precision:
    """The training rule (module docstring) from its inputs: the --mixed-precision flag,
    the ACCELERATE_MIXED_PRECISION value, the config's train.gpu_precision, the device
    type Accelerate will use and whether it has bf16."""
    if flag is not None:
        if flag not in TRAINING_FLAGS:
            raise UserError(f"--mixed-precision must be no or bf16, got '{flag}'.")
        return Precision(flag, "--mixed-precision")
    if accelerate_env and accelerate_env.lower() != "no":
        return Precision(accelerate_env.lower(), "Accelerate's mixed_precision")
    return _gpu_default(gpu_precision, device_type, bf16_supported)


def resolve_sampling(
    flag: str, gpu_precision: str, device_type: str, bf16_supported: bool
) -> Precision:
    """The sampling rule (module docstring): --precision, else the config's GPU default."""
    if flag not in SAMPLING_FLAGS:
        raise UserError(f"--precision must be auto, bf16 or fp32, got '{flag}'.")
    if flag != "auto":
        return Precision("no" if flag == "fp32" else "bf16", "--precision")
    return _gpu_default(gpu_precision, device_type, bf16_supported)


def _bf16_supported(device_type: str) -> bool:
    import torch

    return device_type == "cuda" and torch.cuda.is_bf16_supported()


def training_precision(cpu: bool, flag: str | None, gpu_precision: str) -> Precision:
    """`resolve_training` on this machine: the device Accelerate picks (`--cpu` or not)."""
    from accelerate import PartialState

    device_type = PartialState(cpu=cpu).device.type
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    return resolve_training(flag, env, gpu_precision, device_type, _bf16_supported(device_type))


def sampling_precision(flag: str, gpu_precision: str, device) -> Precision:
    """`resolve_sampling` for a torch device."""
    import torch

    device_type = torch.device(device).type
    return resolve_sampling(flag, gpu_precision, device_type, _bf16_supported(device_type))
