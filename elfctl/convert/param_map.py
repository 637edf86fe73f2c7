"""The parameter map of an ELF checkpoint (docs/method.md section 7): every tensor's JAX name
and shape, its torch name and layout, validation of a whole tree, and the architecture read off
its shapes.

Names: a JAX leaf is written here as its '/'-joined path inside its subtree
(`blocks_0/attn/qkv/kernel`). Flax Dense layers hold `kernel` (in, out); torch Linear holds
`weight` (out, in), so kernels are transposed. Everything else (biases, norm weights, the
learned tokens and the decoder head's raw `proj_kernel` / `unembed_kernel`) is copied as
it is. The whole tree is validated against the tensor table of the architecture before
anything is converted or written.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from elfctl.config import ModelConfig
from elfctl.errors import UserError
from elfctl.model.network import infer_model_config

FREQ_DIM = 256  # width of the sinusoidal timestep features (section 3.4)


def expected_jax_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an ELF parameter tree, in JAX names and JAX layout (kernels (in, out))."""
    H, C, V, bn = cfg.hidden_size, cfg.latent_dim, cfg.vocab_size, cfg.bottleneck
    head_dim = H // cfg.num_heads
    inner = int(H * cfg.mlp_ratio * 2 / 3)  # SwiGLU hidden width, 2048 for ELF-B
    shapes: dict[str, tuple[int, ...]] = {}

    def dense(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        shapes[f"{name}/kernel"] = (n_in, n_out)
        if bias:
            shapes[f"{name}/bias"] = (n_out,)

    if cfg.self_cond:
        dense("self_cond_proj", 2 * C, C)
    dense("text_proj/proj1", C, bn, bias=False)
    dense("text_proj/proj2", bn, H)
    dense("t_embedder/mlp_0", FREQ_DIM, H)
    dense("t_embedder/mlp_2", H, H)
    shapes["t_emb_tokens"] = (1, cfg.num_time_tokens, H)
    if cfg.num_sc_tokens:
        dense("self_cond_cfg_embedder/mlp_0", FREQ_DIM, H)
        dense("self_cond_cfg_embedder/mlp_2", H, H)
        shapes["self_cond_cfg_tokens"] = (1, cfg.num_sc_tokens, H)
    if cfg.num_mode_tokens:
        shapes["mode_tokens"] = (1, cfg.num_mode_tokens, H)
    for i in range(cfg.depth):
        block = f"blocks_{i}"
        shapes[f"{block}/norm1/weight"] = (H,)
        dense(f"{block}/attn/qkv", H, 3 * H)
        shapes[f"{block}/attn/q_norm/weight"] = (head_dim,)
        shapes[f"{block}/attn/k_norm/weight"] = (head_dim,)
        dense(f"{block}/attn/proj", H, H)
        shapes[f"{block}/norm2/weight"] = (H,)
        dense(f"{block}/mlp/w12", H, 2 * inner)
        dense(f"{block}/mlp/w3", inner, H)
    shapes["final_layer/norm_final/weight"] = (H,)
    dense("final_layer/linear", H, C)
    shapes["proj_kernel"] = (H, C)  # raw parameters, input-major in both frameworks
    shapes["proj_bias"] = (C,)
    shapes["unembed_kernel"] = (C, V)
    shapes["unembed_bias"] = (V,)
    return shapes


def torch_name(jax_name: str) -> tuple[str, bool]:
    """JAX leaf name -> (torch state-dict name, whether the array is transposed).

    `blocks_3/attn/qkv/kernel` -> (`blocks.3.attn.qkv.weight`, True);
    `proj_kernel` -> (`proj_kernel`, False): only a Dense layer's `kernel` leaf transposes.
    """
    parts = jax_name.split("/")
    parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", p) for p in parts]
    if len(parts) > 1 and parts[-1] == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    return ".".join(parts), False


def torch_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The torch state-dict table (names and (out, in) shapes) of an ELF model."""
    table = {}
    for jax_name, shape in expected_jax_shapes(cfg).items():
        name, transpose = torch_name(jax_name)
        table[name] = tuple(reversed(shape)) if transpose else shape
    return table


def infer_config(shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """Read the architecture off a JAX tree's shapes; a missing key tensor is a UserError.

    The shapes are mapped to the torch layout and read by `model.infer_model_config`, so
    both formats share one rule.
    """
    import torch

    meta = {}
    for jax_name, shape in shapes.items():
        name, transpose = torch_name(jax_name)
        meta[name] = torch.empty(
            tuple(reversed(shape)) if transpose else tuple(shape), device="meta"
        )
    try:
        return infer_model_config(meta)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"The checkpoint is not an ELF model: {e.args[0]}.") from None


def validate_tree(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, subtree: str) -> None:
    """Every source tensor consumed, every target produced, every shape right, or a UserError."""
    expected = expected_jax_shapes(cfg)
    leftover = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    wrong = [n for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing {_names(subtree, missing)}")
    if leftover:
        problems.append(f"unexpected {_names(subtree, leftover)}")
    if wrong:
        details = [
            f"{subtree}/{n} is {list(shapes[n])}, expected {list(expected[n])}" for n in wrong
        ]
        problems.append("wrong shape: " + first_few(details))
    if problems:
        raise UserError(
            f"The checkpoint does not match the ELF architecture (H {cfg.hidden_size}, depth "
            f"{cfg.depth}, C {cfg.latent_dim}, V {cfg.vocab_size}): " + "; ".join(problems) + "."
        )


def parameter_count(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in expected_jax_shapes(cfg).values())


def convert_tree(flat: dict[str, np.ndarray], cfg: ModelConfig, subtree: str) -> dict[str, Any]:
    """Validated JAX-layout float32 arrays -> torch state dict (float32, Dense kernels .T).

    Consumes `flat` (each source array is released once converted).
    """
    import torch

    shapes = {name: tuple(np.shape(a)) for name, a in flat.items()}
    for name, array in flat.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            kind = getattr(array, "dtype", type(array).__name__)
            raise UserError(f"Tensor {subtree}/{name} is {kind}, not a floating-point array.")
    validate_tree(shapes, cfg, subtree)
    state = {}
    for jax_name in expected_jax_shapes(cfg):  # model order, which is the official order
        array = flat.pop(jax_name)
        name, transpose = torch_name(jax_name)
        if transpose:
            array = np.ascontiguousarray(array.T)
        state[name] = torch.from_numpy(array)
    return state


def final_layer_is_zero(state: dict[str, Any]) -> bool:
    """The flow head is zero-initialised: all zeros means untrained (or not really loaded)."""
    return not bool(state["final_layer.linear.weight"].any())


def first_few(items: list[str], limit: int = 6) -> str:
    """The first `limit` items joined with commas, and how many more there are."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _names(subtree: str, names: list[str]) -> str:
    return first_few([f"{subtree}/{n}" for n in names])
