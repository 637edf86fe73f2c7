"""The ELF training loss (docs/method.md section 4), one batch at a time.

All randomness of a step is drawn first, in one place (`draw`), so the loss itself
(`elf_loss`) is a deterministic function of (model, clean latents, masks, draws):
that is what the tests compare against a slow computation.

Per example, either the decoder branch (token cross-entropy from a per-token
corrupted input at t = 1, decode gate on) or the denoiser branch (velocity L2
against an SC-CFG-guided target). One gradient forward covers the mixed batch,
and the loss has a single denominator: the number of loss-mask tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elfctl.config import ObjectiveConfig
from elfctl.model import flow
from elfctl.model.encoder import encoder_pair_mask


@dataclass
class Draws:
    """Every random quantity of one training step, for a batch of B rows."""

    t: torch.Tensor  # (B,) denoiser time
    eps: torch.Tensor  # (B, S, C) denoiser noise
    is_decoder: torch.Tensor  # (B,) bool: decoder branch
    lam: torch.Tensor  # (B, S, 1) per-token clean share of the decoder input
    dec_noise: torch.Tensor  # (B, S, C) decoder noise
    use_self_cond: torch.Tensor  # (B,) bool: x_prev = x_uncond (else zeros)
    sc_scale: torch.Tensor  # (B,) SC-CFG scale w
    drop_condition: torch.Tensor  # (B,) bool: label drop


def draw(B: int, S: int, C: int, cfg: ObjectiveConfig, device, generator=None) -> Draws:
    t = flow.sample_time((B,), cfg.time_schedule, cfg.p_mean, cfg.p_std, generator, device)
    eps = torch.randn((B, S, C), generator=generator, device=device)
    return Draws(t=t, eps=eps, **draw_branches(B, S, C, cfg, device, generator))


def draw_branches(
    B: int, S: int, C: int, cfg: ObjectiveConfig, device, generator=None
) -> dict[str, torch.Tensor]:
    """The draws every ELF objective shares, drawn in this order (the base objective and
    distillation take them after their own time and noise draws): the decoder branch and
    its input, the self-conditioning half, the SC-CFG scale and the label drop."""

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=device)

    def normal(*shape):
        return torch.randn(shape, generator=generator, device=device)

    return {
        "is_decoder": uniform(B) < cfg.decoder_prob,
        "lam": torch.sigmoid(normal(B, S, 1) * cfg.decoder_lam_std + cfg.decoder_lam_mean),
        "dec_noise": normal(B, S, C),
        "use_self_cond": uniform(B) < cfg.self_cond_prob,
        "sc_scale": flow.log_uniform_shifted(uniform(B), cfg.sc_cfg_min, cfg.sc_cfg_max),
        "drop_condition": uniform(B) < cfg.label_drop_prob,
    }


def keep_condition(z: torch.Tensor, x: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """Condition positions carry the clean latent x; other positions keep z."""
    return torch.where(cond_mask[..., None], x, z)


def drop_labels(x: torch.Tensor, cond_mask: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Label drop: zero the condition positions of dropped rows' clean latents."""
    zero = cond_mask & drop[:, None]  # (B, S)
    return x.masked_fill(zero[..., None], 0.0)


def decoder_input(x, noise, lam, scale: float) -> torch.Tensor:
    """z_dec = lam x + (1 - lam) scale n, lam drawn per token, over the WHOLE row.

    Condition positions are corrupted too (not restored to the clean condition), and a
    decoder row's self-conditioning half is zero everywhere: that is how the official code
    trained the released conditional checkpoints (docs/method.md section 4).
    """
    return lam * x + (1 - lam) * scale * noise


def guided_target(v_star, v_cond, v_uncond, w, use_self_cond) -> torch.Tensor:
    """SC-CFG baked into the target: v* + (1 - 1/w)(v_cond - v_uncond) where self-cond is used."""
    guidance = (1 - 1 / w)[:, None, None] * (v_cond - v_uncond)
    return v_star + use_self_cond[:, None, None] * guidance


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar: (sum CE + sum L2) / denominator
    ce_sum: torch.Tensor  # summed over decoder-row loss tokens
    l2_sum: torch.Tensor  # summed over denoiser-row loss tokens
    ce_tokens: torch.Tensor
    l2_tokens: torch.Tensor


def elf_loss(
    model,
    x: torch.Tensor,
    input_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    draws: Draws,
    cfg: ObjectiveConfig,
    t_eps: float,
    denominator: torch.Tensor | float | None = None,
    no_grad_model=None,
) -> LossParts:
    """The loss for clean latents x (B, S, C) (before label drop) and token ids (B, S).

    `model` takes the gradient forward (it may be a DDP wrapper); `no_grad_model`
    (default: `model`) takes the two no-grad self-conditioning forwards.
    `denominator` defaults to this batch's loss-mask token count; the trainer passes
    the global count so that accumulation and data parallelism keep one denominator.
    """
    no_grad_model = no_grad_model or model
    s = cfg.noise_scale
    cond_mask = cond_mask.bool()
    loss_mask = loss_mask.bool()
    x = drop_labels(x, cond_mask, draws.drop_condition)
    t = draws.t
    w = draws.sc_scale

    # Denoiser branch input and target.
    z_t = keep_condition(flow.add_noise(x, draws.eps, t, s), x, cond_mask)
    v_star = flow.velocity(x, z_t, t, t_eps)

    # Self-conditioning: x_uncond from a zero self-condition, then SC-CFG's v_cond.
    zeros = keep_condition(torch.zeros_like(x), x, cond_mask)
    self_cond = model_config(no_grad_model).self_cond
    if self_cond:
        with torch.no_grad():
            x_uncond, _ = no_grad_model(torch.cat([z_t, zeros], -1), t, sc_scale=w)
            x_uncond = keep_condition(x_uncond.float(), x, cond_mask)
            x_sc, _ = no_grad_model(torch.cat([z_t, x_uncond], -1), t, sc_scale=w)
            v_uncond = flow.velocity(x_uncond, z_t, t, t_eps)
            v_cond = flow.velocity(x_sc.float(), z_t, t, t_eps)
        use_sc = draws.use_self_cond
        x_prev = torch.where(use_sc[:, None, None], x_uncond, zeros)
        v_target = guided_target(v_star, v_cond, v_uncond, w, use_sc.float())
    else:
        x_prev, v_target = zeros, v_star

    # One gradient forward over the mixed batch.
    is_dec = draws.is_decoder
    rows = is_dec[:, None, None]
    z_dec = decoder_input(x, draws.dec_noise, draws.lam, cfg.decoder_noise_scale)
    z_in = torch.where(rows, z_dec, z_t)
    x_prev_in = torch.where(rows, torch.zeros_like(x), x_prev)  # no condition in decoder rows
    t_in = torch.where(is_dec, torch.ones_like(t), t)
    inputs = torch.cat([z_in, x_prev_in], -1) if self_cond else z_in
    x_hat, logits = model(inputs, t_in, sc_scale=w, decode=is_dec.float())

    v_pred = flow.velocity(x_hat.float(), z_in, t_in, t_eps)
    l2 = (v_pred - v_target).pow(2).mean(-1)  # (B, S)
    ce = F.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")  # (B, S)
    dec_tokens = loss_mask & is_dec[:, None]
    den_tokens = loss_mask & ~is_dec[:, None]
    ce_sum = (ce * dec_tokens).sum()
    l2_sum = (l2 * den_tokens).sum()
    if denominator is None:
        denominator = loss_mask.sum().clamp_min(1)
    return LossParts(
        loss=(ce_sum + l2_sum) / denominator,
        ce_sum=ce_sum.detach(),
        l2_sum=l2_sum.detach(),
        ce_tokens=dec_tokens.sum(),
        l2_tokens=den_tokens.sum(),
    )


def model_config(model):
    """The ModelConfig of a model, through DDP / compile wrappers."""
    while not hasattr(model, "cfg") and hasattr(model, "module"):
        model = model.module
    return model.cfg


def encode_batch(encoder, batch: dict[str, torch.Tensor], drop: torch.Tensor, conditional: bool):
    """Clean latents (B, S, C) for a collated batch; label drop shapes the encoder mask."""

    with torch.autocast(batch["input_ids"].device.type, enabled=False):
        if not conditional:
            return encoder.encode(batch["input_ids"], attention_mask_2d=batch["attention_mask"])
        pair = encoder_pair_mask(batch["attention_mask"], batch["cond_seq_mask"], drop)
        return encoder.encode(batch["input_ids"], pair_mask=pair)
