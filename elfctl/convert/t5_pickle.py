"""The official JAX T5 encoder pickle: unpickled safely (arrays and dicts only, no JAX), named
as Hugging Face's `T5EncoderModel`, and validated against the T5 shapes its own sizes imply."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from elfctl.convert.jax_readers import flatten_tree, unwrap_params
from elfctl.convert.param_map import first_few
from elfctl.errors import UserError


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles nested dicts of numpy (or JAX) arrays and nothing else.

    JAX arrays pickle as `jax._src.array._reconstruct_array(np._reconstruct, args, state,
    aval_state)`; that is rebuilt here as the numpy array it wraps, so no JAX is needed.
    Any other global (os.system, ...) is refused: the pickle comes from the internet.
    """

    def find_class(self, module: str, name: str) -> Any:
        import collections
        import importlib

        import ml_dtypes

        try:  # numpy 2 moved numpy.core to numpy._core; old pickles name either
            core = importlib.import_module("numpy._core")
        except ImportError:
            core = importlib.import_module("numpy.core")
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
            ("numpy.core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy._core.multiarray", "scalar"): core.multiarray.scalar,
            ("numpy.core.numeric", "_frombuffer"): core.numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): core.numeric._frombuffer,
            ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
            ("jax.numpy", "bfloat16"): ml_dtypes.bfloat16,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("flax.core.frozen_dict", "FrozenDict"): _frozen_dict,
            ("jax._src.array", "_reconstruct_array"): _reconstruct_jax_array,
        }
        if (module, name) not in allowed:
            raise UserError(
                f"The encoder pickle refers to {module}.{name}; only arrays and dicts are allowed."
            )
        return allowed[(module, name)]


def _frozen_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


def _reconstruct_jax_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    array = fun(*args)
    array.__setstate__(arr_state)
    return array


def load_t5_pickle(path: Path) -> dict[str, np.ndarray]:
    """The JAX T5 encoder pickle -> {'/'-joined name: array}, unwrapping a top `params`."""
    try:
        with open(path, "rb") as f:
            tree = _SafeUnpickler(f).load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{path} is not a readable encoder pickle ({type(e).__name__}: {e})."
        ) from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} does not hold a dict of parameters.")
    tree = unwrap_params(tree)
    return dict(flatten_tree(tree, ""))


def t5_hf_name(jax_name: str) -> tuple[str, bool]:
    """JAX T5 name -> (Hugging Face T5EncoderModel name, transpose)."""
    if jax_name == "shared/embedding":
        return "shared.weight", False
    parts = jax_name.split("/")
    out = []
    for p in parts:
        if m := re.fullmatch(r"(block|layer)_(\d+)", p):
            out += [m.group(1), m.group(2)]
        else:
            out.append(p)
    if out[-1] == "kernel":
        return ".".join(out[:-1] + ["weight"]), True
    if out[-2:] == ["relative_attention_bias", "rel_embedding"]:
        return ".".join(out[:-1] + ["weight"]), False
    return ".".join(out), False


def _t5_config(flat: dict[str, np.ndarray]) -> Any:
    from transformers import T5Config

    def shape(name: str) -> tuple[int, ...]:
        if name not in flat:
            raise UserError(f"The encoder pickle has no '{name}', so it is not a T5 encoder.")
        return tuple(np.shape(flat[name]))

    vocab, d_model = shape("shared/embedding")
    buckets, heads = shape(
        "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding"
    )
    inner = shape("encoder/block_0/layer_0/SelfAttention/q/kernel")[1]
    d_ff = shape("encoder/block_0/layer_1/DenseReluDense/wi/kernel")[1]
    layers = 1 + max(int(m.group(1)) for k in flat if (m := re.match(r"encoder/block_(\d+)/", k)))
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # not stored in the weights; T5's value
        feed_forward_proj="relu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def convert_t5_state(flat: dict[str, np.ndarray]) -> tuple[dict[str, Any], Any]:
    """Validated T5 pickle -> (HF T5EncoderModel state dict, T5Config)."""
    import torch

    config = _t5_config(flat)
    expected = _t5_expected_shapes(config)
    produced = {}
    leftover = []
    for jax_name, array in flat.items():
        name, transpose = t5_hf_name(jax_name)
        if name not in expected:
            leftover.append(jax_name)
            continue
        array = np.asarray(array)
        if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
            raise UserError(f"Encoder tensor {jax_name} is {array.dtype}, not floating point.")
        array = array.astype(np.float32)
        produced[name] = (jax_name, np.ascontiguousarray(array.T) if transpose else array)
    missing = sorted(set(expected) - set(produced))
    wrong = [  # reported in the pickle's own (JAX) layout
        f"{src} is {list(np.shape(flat[src]))}, expected "
        f"{list(reversed(expected[n])) if t5_hf_name(src)[1] else list(expected[n])}"
        for n, (src, a) in produced.items()
        if tuple(a.shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append("missing " + first_few(missing))
    if leftover:
        problems.append("unexpected " + first_few(sorted(leftover)))
    if wrong:
        problems.append("wrong shape: " + first_few(wrong))
    if problems:
        raise UserError(
            "The encoder pickle does not match a T5 encoder: " + "; ".join(problems) + "."
        )
    state = {name: torch.from_numpy(array) for name, (_, array) in produced.items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied, as in T5
    return state, config


def _t5_expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    d, inner, ff = config.d_model, config.d_kv * config.num_heads, config.d_ff
    shapes = {"shared.weight": (config.vocab_size, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(config.num_layers):
        attn = f"encoder.block.{i}.layer.0"
        shapes[f"{attn}.layer_norm.weight"] = (d,)
        for proj in "qkv":
            shapes[f"{attn}.SelfAttention.{proj}.weight"] = (inner, d)
        shapes[f"{attn}.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            shapes[f"{attn}.SelfAttention.relative_attention_bias.weight"] = (
                config.relative_attention_num_buckets,
                config.num_heads,
            )
        ff_layer = f"encoder.block.{i}.layer.1"
        shapes[f"{ff_layer}.layer_norm.weight"] = (d,)
        shapes[f"{ff_layer}.DenseReluDense.wi.weight"] = (ff, d)
        shapes[f"{ff_layer}.DenseReluDense.wo.weight"] = (d, ff)
    return shapes


def find_pickle(path: Path) -> Path:
    if path.is_file():
        return path
    pickles = sorted(path.rglob("*.pkl")) if path.is_dir() else []
    if len(pickles) != 1:
        found = ", ".join(p.name for p in pickles) or "none"
        raise UserError(f"{path} must hold exactly one .pkl encoder file (found: {found}).")
    return pickles[0]
