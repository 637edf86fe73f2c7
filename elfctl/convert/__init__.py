"""Checkpoints in and out: official JAX/Flax checkpoints and the T5 pickle to PyTorch, export.

jax          the conversion entry points (`convert_checkpoint`, `convert_t5_encoder`)
param_map    every tensor's JAX and torch name and shape; validation; config from shapes
jax_readers  finding a JAX checkpoint and reading its Orbax/OCDBT or Flax msgpack layout
t5_pickle    the JAX T5 encoder pickle, read safely and mapped onto Hugging Face T5
exporting    our checkpoints out: official layout, Hugging Face folder, the hub
"""

from __future__ import annotations

from elfctl.convert.exporting import FORMATS, export, push_to_hub
from elfctl.convert.jax import convert_checkpoint, convert_t5_encoder
from elfctl.convert.param_map import expected_jax_shapes, parameter_count, torch_name, torch_shapes

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
