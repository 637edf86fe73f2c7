"""Settings a new corpus needs, found for the user: `auto` values in a training config.

* `model.vocab_size: auto` is the tokenizer's length (docs/method.md section 1: V is the
  tokenizer's length, not the padded embedding table).
* `encoder.latent_mean / latent_std: auto` are measured with the frozen encoder on a fixed
  number of training rows (`encoder.latent_stats_rows`), drawn without replacement with
  `train.seed`, laid out exactly as training collates them (condition first, cut and padded
  to `max_length`). The statistics are over every value of every real (non-padding)
  position: mean = E[h], std = sqrt(E[(h - mean)^2]); a fixed mean with an `auto` std
  measures the spread about that fixed mean. So a run never normalises its latents with
  the statistics of another encoder.

The trainer writes the resolved numbers into the run's config.yaml; a resumed run takes
them from there instead of measuring again. Official presets keep their fixed 0.0 / 0.2.
"""

from __future__ import annotations

import math

import torch

from elfctl.config import Config
from elfctl.errors import UserError
from elfctl.training.objective import encode_batch

AUTO = "auto"


def is_auto(value) -> bool:
    return isinstance(value, str) and value == AUTO


def inherit_resolved(cfg: Config, saved: Config) -> None:
    """On resume: every `auto` in `cfg` takes the number the run was started with."""
    if is_auto(cfg.model.vocab_size):
        cfg.model.vocab_size = saved.model.vocab_size
    for name in ("latent_mean", "latent_std"):
        if is_auto(getattr(cfg.encoder, name)):
            setattr(cfg.encoder, name, getattr(saved.encoder, name))


def resolve_vocab_size(cfg: Config, tokenizer) -> dict[str, int]:
    """`model.vocab_size: auto` -> len(tokenizer); returns what was resolved."""
    if not is_auto(cfg.model.vocab_size):
        return {}
    cfg.model.vocab_size = len(tokenizer)
    return {"model.vocab_size": cfg.model.vocab_size}


def needs_latent_stats(cfg: Config) -> bool:
    return is_auto(cfg.encoder.latent_mean) or is_auto(cfg.encoder.latent_std)


def stats_row_indices(n_rows: int, n: int, seed: int) -> list[int]:
    """The rows the statistics are measured on: min(n, n_rows) distinct rows, a pure
    function of (n_rows, n, seed), in increasing order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_rows, generator=generator)[: min(n, n_rows)]
    return sorted(chosen.tolist())


@torch.no_grad()
def measure_latent_moments(
    encoder, rows, indices: list[int], collate, conditional: bool, device, batch_size: int = 256
) -> tuple[float, float, int]:
    """(E[h], E[h^2], number of values) of the raw encoder output over the valid positions of
    `rows[indices]`. `encoder` must normalise with mean 0 and std 1 (raw hidden states)."""

    total = total_sq = 0.0
    count = 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        columns = rows[chunk]
        as_rows = [{name: columns[name][i] for name in columns} for i in range(len(chunk))]
        batch = {k: v.to(device) for k, v in collate(as_rows).items()}
        no_drop = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        hidden = encode_batch(encoder, batch, no_drop, conditional)  # (B, S, C)
        valid = hidden[batch["attention_mask"]].double()  # (positions, C)
        total += valid.sum().item()
        total_sq += valid.pow(2).sum().item()
        count += valid.numel()
    if count == 0:
        raise UserError(
            "encoder.latent_mean/latent_std are auto, but the sampled training rows hold no "
            "tokens to measure them on."
        )
    return total / count, total_sq / count, count


def resolve_latent_stats(cfg: Config, encoder, rows, collate, device) -> dict[str, float]:
    """Measure the `auto` latent statistics, set them on `encoder` and `cfg`; returns them
    (with the number of rows they were measured on)."""
    if not needs_latent_stats(cfg):
        return {}
    enc = cfg.encoder
    indices = stats_row_indices(len(rows), enc.latent_stats_rows, cfg.train.seed)
    encoder.latent_mean, encoder.latent_std = 0.0, 1.0  # raw hidden states
    mean_h, mean_h2, _ = measure_latent_moments(
        encoder, rows, indices, collate, cfg.data.conditional, device
    )
    mean = mean_h if is_auto(enc.latent_mean) else float(enc.latent_mean)
    if is_auto(enc.latent_std):
        # E[(h - m)^2] = E[h^2] - 2 m E[h] + m^2
        std = math.sqrt(max(mean_h2 - 2 * mean * mean_h + mean * mean, 0.0))
    else:
        std = float(enc.latent_std)
    if std <= 0:
        raise UserError("The measured latent std is 0: the encoder's output is constant.")
    resolved = {}
    if is_auto(enc.latent_mean):
        resolved["encoder.latent_mean"] = mean
    if is_auto(enc.latent_std):
        resolved["encoder.latent_std"] = std
    enc.latent_mean, enc.latent_std = mean, std
    encoder.latent_mean, encoder.latent_std = mean, std
    resolved["rows"] = len(indices)
    return resolved
