"""Independent NumPy forwards that read parameters in the JAX layout (`x @ kernel`).

Written from docs/method.md section 3 (ELF) and the T5 paper's encoder (T5), in float64,
without torch: the converted PyTorch models must reproduce these outputs. Because every
Dense layer here is `x @ kernel` with `kernel` (in, out), a missing or extra transpose in
the converter changes the result even for square matrices.

Parameters come as flat dicts of '/'-joined JAX names, e.g. `blocks_0/attn/qkv/kernel`.
Also here: random parameter trees in the JAX naming, for the converter tests.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------- ELF


def random_elf_tree(cfg, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Every ELF tensor in JAX names/layout, random (no zeros: the final layer is 'trained')."""
    from elfctl.convert import expected_jax_shapes

    rng = np.random.default_rng(seed)
    tree = {}
    for name, shape in expected_jax_shapes(cfg).items():
        if name.endswith("/weight"):  # norm scales near 1
            tree[name] = (1.0 + scale * rng.standard_normal(shape)).astype(np.float32)
        else:
            tree[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return tree


def nest(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}} (the nested tree JAX tools write)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rms_norm(x, weight, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _dense(p, name, x, bias=True):
    y = x @ p[f"{name}/kernel"]
    return y + p[f"{name}/bias"] if bias else y


def _timestep_embed(p, name, value):
    """value (B,) -> (B, H): [cos, sin] of value * 10000^(-i/128), Dense, SiLU, Dense."""
    i = np.arange(128)
    args = value[:, None] * np.exp(-math.log(10000.0) * i / 128)[None, :]
    features = np.concatenate([np.cos(args), np.sin(args)], axis=-1)  # (B, 256)
    return _dense(p, f"{name}/mlp_2", _silu(_dense(p, f"{name}/mlp_0", features)))


def _rope(x, positions, num_prefix):
    """Interleaved RoPE on x (B, L, heads, d): pairs (2j, 2j+1) turn by pos * 10000^(-2j/d).

    The first num_prefix tokens are not rotated; sequence position p is at L-index
    num_prefix + p.
    """
    d = x.shape[-1]
    out = x.copy()
    for p in range(positions):
        for j in range(d // 2):
            angle = p * 10000.0 ** (-2 * j / d)
            c, s = math.cos(angle), math.sin(angle)
            a = x[:, num_prefix + p, :, 2 * j]
            b = x[:, num_prefix + p, :, 2 * j + 1]
            out[:, num_prefix + p, :, 2 * j] = a * c - b * s
            out[:, num_prefix + p, :, 2 * j + 1] = b * c + a * s
    return out


def elf_forward(p, z, t, sc_scale, decode, cfg):
    """x_hat (B, S, C) and logits (B, S, V) or None, from JAX-layout parameters `p`.

    z (B, S, 2C) = [z_t, x_prev]; t and sc_scale (B,); decode a bool.
    """
    p = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
    z = np.asarray(z, np.float64)
    t = np.asarray(t, np.float64)
    sc_scale = np.asarray(sc_scale, np.float64)
    B, S, _ = z.shape
    H, heads = cfg.hidden_size, cfg.num_heads
    d = H // heads

    x = _dense(p, "self_cond_proj", z)  # (B, S, C)
    x = _dense(p, "text_proj/proj2", _dense(p, "text_proj/proj1", x, bias=False))  # (B, S, H)
    time_tokens = p["t_emb_tokens"] + _timestep_embed(p, "t_embedder", t)[:, None, :]
    sc_tokens = (
        p["self_cond_cfg_tokens"]
        + _timestep_embed(p, "self_cond_cfg_embedder", sc_scale)[:, None, :]
    )
    mode_tokens = p["mode_tokens"] * (1.0 if decode else 0.0)
    prefix = [np.broadcast_to(tok, (B, tok.shape[1], H)) for tok in (time_tokens, sc_tokens)]
    prefix.append(np.broadcast_to(mode_tokens, (B, mode_tokens.shape[1], H)))
    num_prefix = sum(tok.shape[1] for tok in prefix)
    h = np.concatenate(prefix + [x], axis=1)  # (B, L, H)
    L = h.shape[1]

    for i in range(cfg.depth):
        blk = f"blocks_{i}"
        n = _rms_norm(h, p[f"{blk}/norm1/weight"])
        qkv = _dense(p, f"{blk}/attn/qkv", n).reshape(B, L, 3, heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, heads, d)
        q = _rope(_rms_norm(q, p[f"{blk}/attn/q_norm/weight"]), S, num_prefix)
        k = _rope(_rms_norm(k, p[f"{blk}/attn/k_norm/weight"]), S, num_prefix)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        y = np.einsum("bhqk,bkhd->bqhd", _softmax(scores), v).reshape(B, L, H)
        h = h + _dense(p, f"{blk}/attn/proj", y)
        n = _rms_norm(h, p[f"{blk}/norm2/weight"])
        ab = _dense(p, f"{blk}/mlp/w12", n)
        a, b = np.split(ab, 2, axis=-1)
        h = h + _dense(p, f"{blk}/mlp/w3", _silu(a) * b)

    h = h[:, num_prefix:]
    x_hat = _dense(p, "final_layer/linear", _rms_norm(h, p["final_layer/norm_final/weight"]))
    logits = None
    if decode:
        hidden = _gelu_tanh(h @ p["proj_kernel"] + p["proj_bias"])
        logits = hidden @ p["unembed_kernel"] + p["unembed_bias"]
    return x_hat, logits


# ----------------------------------------------------------------------------- T5 encoder


def random_t5_tree(
    vocab=40, d_model=16, d_kv=4, heads=4, d_ff=24, layers=2, buckets=32, seed=0
) -> dict[str, np.ndarray]:
    """A random T5 encoder in the JAX pickle's naming (kernels (in, out))."""
    rng = np.random.default_rng(seed)
    inner = d_kv * heads

    def r(*shape, s=0.3):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    tree = {"shared/embedding": r(vocab, d_model, s=1.0)}
    for i in range(layers):
        blk = f"encoder/block_{i}"
        tree[f"{blk}/layer_0/layer_norm/weight"] = 1 + r(d_model, s=0.1)
        for proj in "qkv":
            tree[f"{blk}/layer_0/SelfAttention/{proj}/kernel"] = r(d_model, inner)
        tree[f"{blk}/layer_0/SelfAttention/o/kernel"] = r(inner, d_model)
        if i == 0:
            rel = f"{blk}/layer_0/SelfAttention/relative_attention_bias/rel_embedding"
            tree[rel] = r(buckets, heads, s=1.0)
        tree[f"{blk}/layer_1/layer_norm/weight"] = 1 + r(d_model, s=0.1)
        tree[f"{blk}/layer_1/DenseReluDense/wi/kernel"] = r(d_model, d_ff)
        tree[f"{blk}/layer_1/DenseReluDense/wo/kernel"] = r(d_ff, d_model)
    tree["encoder/final_layer_norm/weight"] = 1 + r(d_model, s=0.1)
    return tree


def _t5_bucket(relative, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of (key position - query position)."""
    half = num_buckets // 2
    bucket = (relative > 0).astype(np.int64) * half
    n = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(n, 1) / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return bucket + np.where(n < max_exact, n, large)


def t5_forward(p, ids, eps=1e-6):
    """Last hidden state (B, S, d_model) of the T5 encoder, no padding."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
    h = p["shared/embedding"][ids]  # (B, S, d)
    B, S, _ = h.shape
    rel = p["encoder/block_0/layer_0/SelfAttention/relative_attention_bias/rel_embedding"]
    heads = rel.shape[1]
    positions = np.arange(S)
    buckets = _t5_bucket(positions[None, :] - positions[:, None], rel.shape[0])  # (q, k)
    bias = rel[buckets].transpose(2, 0, 1)[None]  # (1, heads, q, k)
    layers = 1 + max(int(k.split("/")[1][6:]) for k in p if k.startswith("encoder/block_"))
    for i in range(layers):
        blk = f"encoder/block_{i}"
        n = _rms_norm(h, p[f"{blk}/layer_0/layer_norm/weight"], eps)
        att = f"{blk}/layer_0/SelfAttention"

        def split(x):
            return x.reshape(B, S, heads, -1)

        q = split(n @ p[f"{att}/q/kernel"])
        k = split(n @ p[f"{att}/k/kernel"])
        v = split(n @ p[f"{att}/v/kernel"])
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) + bias  # T5: no 1/sqrt(d) scaling
        y = np.einsum("bhqk,bkhd->bqhd", _softmax(scores), v).reshape(B, S, -1)
        h = h + y @ p[f"{att}/o/kernel"]
        n = _rms_norm(h, p[f"{blk}/layer_1/layer_norm/weight"], eps)
        ff = f"{blk}/layer_1/DenseReluDense"
        h = h + np.maximum(n @ p[f"{ff}/wi/kernel"], 0.0) @ p[f"{ff}/wo/kernel"]
    return _rms_norm(h, p["encoder/final_layer_norm/weight"], eps)
