"""Conditions for sampling: sources laid out as in training and encoded as the model saw them.

`encode_conditions` lays sources out exactly like training collation (docs/method.md,
"Data layout": condition first, truncated to `max_input_length`, in a `max_length` sequence)
and encodes them with the per-pair encoder mask. A condition position attends only to
condition positions, so its latent does not depend on what fills the target positions: here
they are padding, and only the condition positions' latents are kept.

Where the condition ids come from: a dataset row's own `condition_input_ids` are used as
they are (they are what the official evaluation feeds the model, and re-tokenizing the text
need not give them back); rows without them are tokenized from their text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elfctl.data.inputs import CONDITION_IDS
from elfctl.data.rows import collate, tokenize
from elfctl.errors import UserError
from elfctl.model.encoder import FrozenEncoder, encoder_pair_mask


@dataclass
class Condition:
    """Encoded conditions for a batch: latents at condition positions, zero elsewhere."""

    latents: torch.Tensor  # (B, S, C) clean latents (only condition positions are used)
    mask: torch.Tensor  # (B, S) bool, True at condition positions
    lengths: torch.Tensor  # (B,) kept condition length per row
    max_input_length: int  # the condition budget; outputs have max_length - this tokens

    def select(self, index: torch.Tensor) -> Condition:
        """The conditions of rows `index` only."""
        return Condition(
            self.latents[index], self.mask[index], self.lengths[index], self.max_input_length
        )


def condition_token_ids(
    tokenizer, sources: list[str], token_ids: list[list[int] | None] | None = None
) -> list[list[int]]:
    """Each source's condition ids: the dataset's own (`token_ids[i]`) where given, as they
    are; else its text tokenized without special tokens (the rows' convention)."""
    given = token_ids if token_ids is not None else [None] * len(sources)
    missing = [i for i, ids in enumerate(given) if ids is None]
    tokenized = dict(zip(missing, tokenize(tokenizer, [sources[i] for i in missing]), strict=True))
    out = [list(ids) if ids is not None else tokenized[i] for i, ids in enumerate(given)]
    vocab = len(tokenizer)
    for i, ids in enumerate(given):
        if ids is not None and ids and max(ids) >= vocab:
            raise UserError(
                f"Source {i}'s {CONDITION_IDS} hold the id {max(ids)}, outside the tokenizer's "
                f"{vocab} entries: the dataset was tokenized for another model."
            )
    return out


def condition_ids_used(token_ids: list[list[int] | None] | None, n: int) -> dict:
    """What run.json records about where n sources' condition ids came from."""
    from_dataset = sum(ids is not None for ids in (token_ids or [])[:n])
    kind = "dataset" if from_dataset == n else "tokenized" if from_dataset == 0 else "mixed"
    return {
        "condition_ids": kind,  # dataset: its condition_input_ids; tokenized: from the text
        "condition_ids_from_dataset": from_dataset,
        "condition_ids_tokenized": n - from_dataset,
    }


def count_truncated(
    tokenizer,
    sources: list[str],
    max_input_length: int,
    token_ids: list[list[int] | None] | None = None,
) -> int:
    """How many sources have more than `max_input_length` tokens (they will be cut)."""
    ids = condition_token_ids(tokenizer, sources, token_ids)
    return sum(len(row) > max_input_length for row in ids)


def condition_batch(
    tokenizer,
    sources: list[str],
    max_length: int,
    max_input_length: int,
    pad_token: str = "eos",
    token_ids: list[list[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """The training layout of sources with an empty target: `data.collate`'s batch.

    input_ids (B, S): condition (cut to max_input_length), then padding; attention_mask
    and cond_seq_mask (B, S) are both True exactly at the condition positions.
    `token_ids` are the dataset's own condition ids per source (see `condition_token_ids`).
    """
    ids = condition_token_ids(tokenizer, sources, token_ids)
    rows = [{"condition_input_ids": row, "input_ids": []} for row in ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1
    return collate(rows, max_length, max_input_length, pad_token, pad_id, eos_id)


@torch.no_grad()
def encode_conditions(
    encoder: FrozenEncoder,
    tokenizer,
    sources: list[str],
    max_length: int,
    max_input_length: int,
    device: str | torch.device = "cpu",
    pad_token: str = "eos",
    token_ids: list[list[int] | None] | None = None,
) -> tuple[Condition, int]:
    """(Condition for `sources`, number of sources cut to max_input_length).

    `token_ids`: the dataset's own condition ids per source, used as they are (a None entry,
    or no list, tokenizes that source's text).

    Latents (B, S, C) hold the encoder's normalised output at condition positions and 0
    elsewhere; mask (B, S) marks condition positions; lengths (B,) the kept lengths.
    """

    if not 0 < max_input_length < max_length:
        raise UserError(
            f"Conditional sampling needs 0 < max_input_length < max_length, got "
            f"{max_input_length} and {max_length}."
        )
    batch = condition_batch(tokenizer, sources, max_length, max_input_length, pad_token, token_ids)
    input_ids = batch["input_ids"].to(device)  # (B, S)
    cond_mask = batch["cond_seq_mask"].to(device)  # (B, S)
    pair = encoder_pair_mask(batch["attention_mask"].to(device), cond_mask)  # (B, S, S)
    with torch.autocast(torch.device(device).type, enabled=False):
        latents = encoder.encode(input_ids, pair_mask=pair)  # (B, S, C)
    latents = latents * cond_mask[..., None]
    condition = Condition(
        latents=latents,
        mask=cond_mask,
        lengths=batch["cond_len"].to(device),
        max_input_length=max_input_length,
    )
    return condition, int(batch["condition_truncated"].sum())
