"""Checkpoints in and out: official JAX/Flax checkpoints and the T5 pickle to PyTorch, export."""

from __future__ import annotations

from elfctl.convert.exporting import FORMATS, export, push_to_hub
from elfctl.convert.jax import (
    convert_checkpoint,
    convert_t5_encoder,
    expected_jax_shapes,
    parameter_count,
    torch_name,
    torch_shapes,
)

__all__ = [
    "FORMATS",
    "convert_checkpoint",
    "convert_t5_encoder",
    "expected_jax_shapes",
    "export",
    "parameter_count",
    "push_to_hub",
    "torch_name",
    "torch_shapes",
]
