"""The ELF network: an x-prediction transformer with a shared decoder head.

Read top to bottom with docs/method.md section 3 beside it. Parameter names match
the official checkpoints exactly (section 7), so `load_state_dict(strict=True)`
takes an official `ema_params1` as it is.

Notation: B batch, S sequence length, C latent (encoder) width, H model width,
V decoder vocabulary. The network input is `[z, x_prev]` on the feature axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from elfctl.config import ModelConfig

# ---------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def timestep_features(value: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features of a raw scalar per row: (B,) -> (B, dim) = [cos, sin].

    The scalar is used as it is (t in [0, 1], or an SC-CFG scale), not scaled by 1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=value.device) / half)
    args = value.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar -> (B, H): sinusoidal features, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_0 = nn.Linear(freq_dim, hidden_size)
        self.mlp_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        features = timestep_features(value, self.freq_dim)
        return self.mlp_2(F.silu(self.mlp_0(features)))


class BottleneckProj(nn.Module):
    """C -> bottleneck (no bias) -> H (bias)."""

    def __init__(self, in_dim: int, hidden_size: int, bottleneck: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, bottleneck, bias=False)
        self.proj2 = nn.Linear(bottleneck, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x))


def rope_tables(seq_len: int, head_dim: int, num_prefix: int, device=None):
    """cos/sin tables (num_prefix + S, head_dim) for interleaved RoPE.

    Frequency j (0 <= j < head_dim/2) is 10000^(-2j/head_dim) and drives the adjacent
    pair (2j, 2j+1). Sequence positions are 0..S-1; the prefix tokens are not rotated
    (cos 1, sin 0), which is why they are prepended to the table.
    """
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.arange(seq_len, device=device).float()[:, None] * inv_freq[None, :]
    angles = angles.repeat_interleave(2, dim=-1)  # (S, head_dim): f0 f0 f1 f1 ...
    cos = torch.cat([torch.ones(num_prefix, head_dim, device=device), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix, head_dim, device=device), angles.sin()])
    return cos, sin


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) for each adjacent pair (2j, 2j+1) of the last axis."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([-b, a], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, L, d); cos/sin (L, d)
    return x * cos.to(x.dtype) + rotate_pairs(x) * sin.to(x.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head attention with qk-norm and RoPE."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        # qkv outputs are laid out (3, heads, head_dim): all q, then all k, then all v.
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d), no mask
        return self.proj(y.transpose(1, 2).reshape(B, L, H))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio * 2 / 3)  # 2048 for H = 768
        self.w12 = nn.Linear(hidden_size, 2 * inner)
        self.w3 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Flow head: RMSNorm then H -> C, zero-initialised so x_hat starts at 0."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


# ---------------------------------------------------------------------------
# The model


class ELF(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, C, V = cfg.hidden_size, cfg.latent_dim, cfg.vocab_size
        if H % cfg.num_heads or (H // cfg.num_heads) % 2:
            raise ValueError(f"hidden_size {H} must split into {cfg.num_heads} even-width heads")
        if cfg.self_cond:
            self.self_cond_proj = nn.Linear(2 * C, C)
        self.text_proj = BottleneckProj(C, H, cfg.bottleneck)
        self.t_embedder = TimestepEmbedder(H)
        self.t_emb_tokens = nn.Parameter(torch.zeros(1, cfg.num_time_tokens, H))
        if cfg.num_sc_tokens:
            self.self_cond_cfg_embedder = TimestepEmbedder(H)
            self.self_cond_cfg_tokens = nn.Parameter(torch.zeros(1, cfg.num_sc_tokens, H))
        if cfg.num_mode_tokens:
            self.mode_tokens = nn.Parameter(torch.zeros(1, cfg.num_mode_tokens, H))
        self.blocks = nn.ModuleList(
            [Block(H, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(H, C)
        # Decoder head, stored input-major as in the official checkpoints.
        self.proj_kernel = nn.Parameter(torch.zeros(H, C))
        self.proj_bias = nn.Parameter(torch.zeros(C))
        self.unembed_kernel = nn.Parameter(torch.zeros(C, V))
        self.unembed_bias = nn.Parameter(torch.zeros(V))
        self.num_prefix = cfg.num_time_tokens + cfg.num_sc_tokens + cfg.num_mode_tokens
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        embedders = [self.t_embedder] + (
            [self.self_cond_cfg_embedder] if self.cfg.num_sc_tokens else []
        )
        for embedder in embedders:
            nn.init.normal_(embedder.mlp_0.weight, std=0.02)
            nn.init.normal_(embedder.mlp_2.weight, std=0.02)
        for name in ("t_emb_tokens", "self_cond_cfg_tokens", "mode_tokens"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.xavier_uniform_(self.proj_kernel)
        nn.init.xavier_uniform_(self.unembed_kernel)
        nn.init.zeros_(self.proj_bias)
        nn.init.zeros_(self.unembed_bias)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            head_dim = self.cfg.hidden_size // self.cfg.num_heads
            self._rope_cache[key] = rope_tables(seq_len, head_dim, self.num_prefix, device)
        return self._rope_cache[key]

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        sc_scale: torch.Tensor | float | None = None,
        decode: bool | torch.Tensor = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (B, S, 2C) = [z_t, x_prev] (or (B, S, C) without self-conditioning), t (B,).

        `decode` is a bool (inference) or a per-row 0/1 gate (training): it switches the
        mode tokens on and, when truthy anywhere, computes the decoder logits.
        Returns x_hat (B, S, C) in fp32 and logits (B, S, V) in fp32 or None.
        """
        B, S, _ = z.shape
        device = z.device
        t = _per_row(t, B, device)
        # Input projections, embedders and heads stay fp32 even under bf16 autocast.
        with torch.autocast(device.type, enabled=False):
            z = z.float()
            if self.cfg.self_cond:
                z = self.self_cond_proj(z)
            x = self.text_proj(z)  # (B, S, H)
            prefix = [self.t_emb_tokens + self.t_embedder(t)[:, None, :]]
            if self.cfg.num_sc_tokens:
                sc = _per_row(1.0 if sc_scale is None else sc_scale, B, device)
                prefix.append(self.self_cond_cfg_tokens + self.self_cond_cfg_embedder(sc)[:, None])
            if self.cfg.num_mode_tokens:
                gate = _per_row(decode, B, device).to(x.dtype)[:, None, None]
                prefix.append(self.mode_tokens * gate)
            h = torch.cat([p.expand(B, -1, -1) for p in prefix] + [x], dim=1)

        cos, sin = self.rope(S, device)
        for block in self.blocks:  # the body runs in bf16 when autocast is on
            h = block(h, cos, sin)
        h = h[:, self.num_prefix :]  # drop the prefix tokens

        with torch.autocast(device.type, enabled=False):
            h = h.float()
            x_hat = self.final_layer(h)
            logits = self.decode_logits(h) if _any_true(decode) else None
        return x_hat, logits

    def decode_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, S, H) -> (B, S, V): gelu_tanh(h @ proj_kernel + proj_bias) @ unembed + bias."""
        hidden = F.gelu(h @ self.proj_kernel + self.proj_bias, approximate="tanh")
        return hidden @ self.unembed_kernel + self.unembed_bias


def _per_row(value, batch: int, device: torch.device) -> torch.Tensor:
    """A python scalar, 0-d or (B,) tensor -> a float (B,) tensor on device."""
    if not torch.is_tensor(value):
        return torch.full((batch,), float(value), device=device)
    value = value.to(device=device, dtype=torch.float32)
    return value.expand(batch) if value.dim() == 0 else value.reshape(batch)


def _any_true(decode: bool | torch.Tensor) -> bool:
    # A per-row gate in training always asks for logits; rows with gate 0 are ignored by
    # the loss. Checking its values would cost a host sync.
    return bool(decode) if not torch.is_tensor(decode) else True


# ---------------------------------------------------------------------------
# Architecture from a state dict


def infer_model_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Read every size off the tensors' shapes (works for ELF-B/M/L and custom sizes)."""
    try:
        H = state_dict["t_emb_tokens"].shape[-1]
        C, V = state_dict["unembed_kernel"].shape
        head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        inner = state_dict["blocks.0.mlp.w3.weight"].shape[1]
        bottleneck = state_dict["text_proj.proj1.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"not an ELF state dict: tensor {e.args[0]} is missing") from None
    # SwiGLU width is int(H * ratio * 2/3); prefer the round ratio that reproduces it.
    exact = inner * 3 / (2 * H)
    candidates = [round(exact, 1), round(exact, 2), exact, (inner + 0.5) * 3 / (2 * H)]
    mlp_ratio = next(r for r in candidates if int(H * r * 2 / 3) == inner)
    sc_tokens = state_dict.get("self_cond_cfg_tokens")
    mode_tokens = state_dict.get("mode_tokens")
    return ModelConfig(
        hidden_size=H,
        depth=depth,
        num_heads=H // head_dim,
        mlp_ratio=mlp_ratio,
        bottleneck=bottleneck,
        latent_dim=C,
        vocab_size=V,
        num_time_tokens=state_dict["t_emb_tokens"].shape[1],
        num_sc_tokens=0 if sc_tokens is None else sc_tokens.shape[1],
        num_mode_tokens=0 if mode_tokens is None else mode_tokens.shape[1],
        self_cond="self_cond_proj.weight" in state_dict,
    )


OFFICIAL_SIZES = {768: "ELF-B", 1056: "ELF-M", 1280: "ELF-L"}


def size_name(cfg: ModelConfig) -> str:
    return OFFICIAL_SIZES.get(cfg.hidden_size, f"custom H{cfg.hidden_size} x{cfg.depth}")
