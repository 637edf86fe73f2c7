"""Tokenizer, frozen T5 encoder and latent normalisation (docs/method.md section 1).

The clean latent of a token sequence is the frozen encoder's last hidden state,
normalised as `x = (h - latent_mean) / latent_std`. Conditional data needs a
per-pair encoder mask (`encoder_pair_mask`): condition positions see only the
condition, every other position sees the whole valid sequence.

Mask conventions (all masks here are bool, True = may attend / is present):
  attention_mask (B, S)   position holds a real token (not padding)
  cond_seq_mask  (B, S)   position holds a condition token
  pair mask   (B, S, S)   [b, query, key]: query may attend to key

How the pair mask reaches T5 depends on the transformers attention backend,
measured on transformers 5.0 and 5.24 (4.46-4.57 take no per-pair mask at all):
a 3-D mask (B, S, S) is rejected; a 4-D mask (B, 1, S, S) is passed to the
attention function as is, where SDPA reads a bool mask as "may attend" but the
eager path *adds* it to the scores, so a bool mask there is silently wrong.
`t5_attention_mask` therefore sends bool for SDPA and an additive float mask
(0 or the dtype's minimum) for every other backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elfctl import hub
from elfctl.config import EncoderConfig
from elfctl.errors import UserError
from elfctl.testbed.assets import resolve_testbed_uri


def resolve_pretrained_source(name_or_path: str, what: str = "the folder") -> str:
    """A hub id or local folder for `from_pretrained`; `testbed:` URIs become local folders.

    A name that looks like a path must exist: it is never taken for a hub id.
    """
    if name_or_path.startswith("testbed:"):
        return str(resolve_testbed_uri(name_or_path))
    hub.check_local(name_or_path, what)
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def looks_like_local_path(name: str) -> bool:
    return hub.looks_like_local_path(name)


def load_pretrained(loader: Callable[..., Any], name_or_path: str, what: str, **kwargs: Any):
    """`loader(source, **kwargs)` (a `from_pretrained`) for a hub id, local folder or
    `testbed:` URI; every failure is one sentence naming `what` and `name_or_path`.

    Hub ids go through `hub.access`: without a network they fail fast (or load from
    the local cache), never after minutes of retries.
    """
    source = resolve_pretrained_source(name_or_path, what)
    if Path(source).exists():
        try:
            return loader(source, **kwargs)
        except (OSError, ValueError) as e:
            reason = hub.first_line(e)
            raise UserError(f"Could not load {what} '{name_or_path}': {reason}") from None
    with hub.access(source, what):
        return loader(source, **kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "*.model", "vocab.*")


def load_tokenizer(name_or_path: str, what: str = "tokenizer"):
    """The Hugging Face tokenizer (hub id, local folder or `testbed:` URI). V = len(tokenizer)."""
    from transformers import AutoTokenizer

    folder = Path(resolve_pretrained_source(name_or_path, what))
    if folder.is_dir() and not any(any(folder.glob(p)) for p in _TOKENIZER_FILES):
        # Some transformers versions quietly build a default tokenizer from an empty folder.
        raise UserError(
            f"Could not load {what} '{name_or_path}': the folder has no tokenizer files."
        )
    return load_pretrained(AutoTokenizer.from_pretrained, name_or_path, what)


class FrozenEncoder(nn.Module):
    """The frozen T5 encoder: token ids -> normalised clean latents x (B, S, C)."""

    def __init__(self, t5_encoder: nn.Module, latent_mean: float, latent_std: float):
        super().__init__()
        self.t5 = t5_encoder.float().eval()
        self.t5.requires_grad_(False)
        self.latent_mean = float(latent_mean)
        self.latent_std = float(latent_std)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        latent_mean: float = 0.0,
        latent_std: float = 0.2,
        attn_implementation: str | None = None,
    ) -> FrozenEncoder:
        from transformers import T5EncoderModel

        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        t5 = load_pretrained(T5EncoderModel.from_pretrained, name_or_path, "encoder", **kwargs)
        return cls(t5, latent_mean, latent_std)

    @property
    def width(self) -> int:
        """C, the encoder's hidden width (512 for T5-small)."""
        return int(self.t5.config.d_model)

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means frozen: a parent's .train() must not switch on T5's dropout.
        super().train(False)
        return self

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask_2d: torch.Tensor | None = None,
        pair_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Clean latents x = (h - mean) / std, shape (B, S, C).

        input_ids (B, S); attention_mask_2d (B, S) padding mask for unconditional data;
        pair_mask (B, S, S) bool per-pair mask (`encoder_pair_mask`) for conditional data.
        Give at most one of the two masks.
        """
        if attention_mask_2d is not None and pair_mask is not None:
            raise ValueError("give either attention_mask_2d or pair_mask, not both")
        if pair_mask is not None:
            if pair_masks_unsupported():
                raise UserError(
                    f"Conditional data needs transformers >= 5.0 (found {_transformers_version()}):"
                    " earlier T5 encoders take no per-pair attention mask."
                )
            mask = t5_attention_mask(pair_mask, self.t5.config._attn_implementation, self.t5.dtype)
        elif attention_mask_2d is not None:
            mask = attention_mask_2d.long()
        else:
            mask = None
        hidden = self.t5(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, S, C)
        return (hidden.float() - self.latent_mean) / self.latent_std


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def pair_masks_unsupported() -> bool:
    """True for transformers < 5, whose T5 encoder reads only a 2-D padding mask."""
    return int(_transformers_version().split(".")[0]) < 5


def t5_attention_mask(
    pair_mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype
) -> torch.Tensor:
    """(B, S, S) bool pair mask -> the (B, 1, S, S) mask T5 in transformers 5.x applies as is.

    SDPA takes bool (True = may attend). The eager path adds the mask to the scores,
    so it gets 0 where allowed and the dtype's minimum where not.
    """
    allowed = pair_mask.bool()[:, None]  # (B, 1, S, S)
    if attn_implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def load_encoder(
    cfg: EncoderConfig, device: str | torch.device = "cpu", measuring: bool = False
) -> FrozenEncoder:
    """The frozen encoder named by the config, on `device`.

    `auto` latent statistics are only meaningful while training measures them
    (`measuring`, elfctl/autoconfig.py): they load as mean 0 / std 1 (raw hidden states).
    """
    if not measuring and "auto" in (cfg.latent_mean, cfg.latent_std):
        raise UserError(
            "encoder.latent_mean/latent_std are auto, which only training can measure; "
            "give the numbers (a trained run's config.yaml holds them)."
        )
    mean = 0.0 if cfg.latent_mean == "auto" else cfg.latent_mean
    std = 1.0 if cfg.latent_std == "auto" else cfg.latent_std
    encoder = FrozenEncoder.from_pretrained(cfg.encoder, mean, std)
    return encoder.to(device)


def encoder_pair_mask(
    attention_mask: torch.Tensor,
    cond_seq_mask: torch.Tensor,
    drop_condition: torch.Tensor | None = None,
) -> torch.Tensor:
    """The encoder's per-pair mask (B, S, S) bool, [b, query, key] True = may attend.

    attention_mask (B, S) valid positions, cond_seq_mask (B, S) condition positions,
    drop_condition (B,) True where label drop removes this example's condition.

    * A condition query attends only to (valid) condition keys.
    * Every other query -- target and padding alike -- attends to all valid keys.
      Padding queries therefore behave exactly as with T5's 2-D padding mask, and
      their latents (the eos-padding targets of `pad_token: eos`) match the
      unconditional path.
    * Label drop: non-condition queries (target and padding) may not attend to
      condition keys, so the example is encoded as if it had no condition.
    * A query left with no allowed key (an empty row, or a dropped row with no
      target tokens) attends to itself only: an all-masked softmax row would give
      NaN on some backends, and such positions are never valid targets anyway.
    """
    valid = attention_mask.bool()  # (B, S)
    is_cond = cond_seq_mask.bool() & valid  # (B, S)
    query_cond = is_cond[:, :, None]  # (B, S, 1)
    key_cond = is_cond[:, None, :]  # (B, 1, S)
    allowed = valid[:, None, :] & (key_cond | ~query_cond)  # (B, S, S)
    if drop_condition is not None:
        dropped = drop_condition.bool()[:, None, None]  # (B, 1, 1)
        allowed = allowed & ~(dropped & ~query_cond & key_cond)
    no_key = ~allowed.any(dim=-1)  # (B, S)
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return allowed | (no_key[:, :, None] & eye)
