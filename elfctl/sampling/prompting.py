"""Prompting and infilling: known tokens held fixed while the rest is sampled.

A prompt fixes a prefix; an infill template fixes tokens on both sides of gaps, written
`[gap:N]` for a gap of N tokens (`the dog [gap:3] .`). Each sample row gets one `Layout`
(the known token ids at their positions), and a batch of layouts becomes `KnownTokens`:
ids, mask, and the clean latents of the known positions.

Clean latents. The frozen encoder is bidirectional, so a token's latent depends on its
neighbours, and the unknown neighbours are what we are sampling. Two ways to encode the
known tokens without them (`encoding`):

  masked    the whole layout in one encoder pass, every known position attending to every
            known position (gap positions are masked out as keys). A prefix prompt is then
            exactly the prompt encoded alone, as training encodes a shorter text.
  segments  each run of known tokens encoded on its own (it sees neither the gaps nor the
            other runs). Identical to `masked` for a prefix.

For conditional models the known tokens lie after the condition, and every known position
also attends to the condition (as target positions do in training); the condition's own
latents are unchanged.

Holding them (`hold`), at every step of the sampler:

  clean     known positions are the clean latent itself (z = x_hat = x), as conditions
            are held: the model sees the known tokens in full from the first step on.
  noised    known positions are kept on the noising path of their clean latents,
            z = t x + (1 - t) s eps (eps: the sample's starting noise, so the path is the
            straight line the flow was trained on), and x_hat there is the clean latent.
            Every position is at the same noise level, as in unconditional training.

`bench/tiny_prompting.py` measures both (and both encodings) on the test bed. `clean` is
the default: it keeps 84-100 % of the unconditional acceptance rate where `noised` keeps
50-64 % (README, "Prompting and infilling"). The trajectories show why: the tiny model
settles a text's shape early (t of about 0.1-0.3), when noised known tokens are still
mostly noise, and the shape it settles on then often does not fit them.

Known tokens always come back unchanged: the decoded ids are overwritten with them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elfctl.data.jsonl import jsonl_objects, read_text
from elfctl.errors import UserError
from elfctl.model.encoder import encoder_pair_mask
from elfctl.sampling.conditions import condition_batch

GAP = re.compile(r"\[gap:([^\]]*)\]")
HOLDS = ("noised", "clean")
ENCODINGS = ("masked", "segments")
DEFAULT_HOLD = "clean"  # measured: bench/tiny_prompting.py, README
DEFAULT_ENCODING = "masked"


@dataclass(frozen=True)
class Layout:
    """One row's known tokens: `ids[p]` is the token at position p, or None inside a gap."""

    ids: tuple[int | None, ...]
    text: str  # the prompt or template as the user wrote it
    kind: str  # "prompt" | "infill"

    @property
    def span(self) -> int:
        """Positions the layout covers (known tokens and gaps)."""
        return len(self.ids)

    def record(self) -> dict:
        """What a sample row records about its known tokens."""
        return {self.kind if self.kind == "prompt" else "template": self.text}


def _token_ids(tokenizer, text: str, given: str | None = None) -> list[int]:
    """`text`'s token ids; words the tokenizer does not know are refused, naming them, since
    they would become its unknown token and vanish from the sample's text (`given`: the
    prompt or template as written, for the message)."""
    ids = _raw(tokenizer, text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        words = [w for w in text.split() if unk in _raw(tokenizer, w)]
        raise UserError(
            f"{given or text!r}: the tokenizer does not know "
            f"{', '.join(repr(w) for w in words) or 'part of it'} (it would become "
            f"{tokenizer.unk_token} and vanish from the text); use words it knows."
        )
    return ids


def _raw(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_prompt(tokenizer, prompt: str) -> Layout:
    """A prefix prompt -> its layout (the prompt's tokens at positions 0..n-1)."""
    ids = _token_ids(tokenizer, prompt.strip(), prompt)
    if not ids:
        raise UserError(f"The prompt {prompt!r} has no tokens.")
    return Layout(tuple(ids), prompt, "prompt")


def parse_template(tokenizer, template: str) -> Layout:
    """An infill template -> its layout; `[gap:N]` is a gap of N >= 1 unknown tokens."""
    pieces = GAP.split(template)  # text, gap, text, gap, ..., text
    if len(pieces) == 1:
        raise UserError(f"The infill template {template!r} has no gap; mark one as [gap:N].")
    ids: list[int | None] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            ids.extend(_token_ids(tokenizer, piece.strip(), template) if piece.strip() else [])
            continue
        if not piece.isdigit() or int(piece) < 1:
            raise UserError(
                f"The infill template {template!r} has a gap [gap:{piece}]; N must be a whole "
                "number of at least 1."
            )
        ids.extend([None] * int(piece))
    if all(i is None for i in ids):
        raise UserError(f"The infill template {template!r} has no known tokens.")
    return Layout(tuple(ids), template, "infill")


def layouts_for(
    tokenizer, prompts: Sequence[str] | None = None, templates: Sequence[str] | None = None
) -> list[Layout]:
    """Parsed prompts or templates (one of the two), in order."""
    if prompts and templates:
        raise UserError("Give prompts or infill templates, not both.")
    if prompts:
        return [parse_prompt(tokenizer, p) for p in prompts]
    if templates:
        return [parse_template(tokenizer, t) for t in templates]
    return []


def check_fits(layouts: Sequence[Layout], budget: int) -> None:
    """Every layout must fit in the `budget` tokens a sample has (its output length)."""
    for layout in layouts:
        if layout.span <= budget:
            continue
        if layout.kind == "prompt":
            raise UserError(
                f"The prompt {layout.text!r} has {layout.span} tokens but samples have only "
                f"{budget}."
            )
        raise UserError(
            f"The infill template {layout.text!r} covers {layout.span} tokens (gaps included) "
            f"but samples have only {budget}."
        )


def read_prompts(path) -> list[str]:
    """Prompts from a .txt file (one per non-blank line) or a .jsonl file (field `prompt`)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts file not found: {path}.")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = []
        for where, record in jsonl_objects(path):
            prompt = record.get("prompt")
            if not isinstance(prompt, str):
                raise UserError(f"{where}: needs a string field 'prompt'.")
            prompts.append(prompt)
    else:
        raise UserError(f"Unsupported --prompts file {path}: expected .txt or .jsonl.")
    if not prompts:
        raise UserError(f"--prompts file {path} holds no prompts.")
    return prompts


# ---------------------------------------------------------------------------
# Known tokens of a batch, and the rule that holds them


@dataclass
class KnownTokens:
    """A batch's known tokens, in full-sequence positions (after any condition)."""

    ids: torch.Tensor  # (B, S) long, the known token (pad elsewhere)
    mask: torch.Tensor  # (B, S) bool, True at known positions
    latents: torch.Tensor  # (B, S, C) clean latents of the known tokens (0 elsewhere)
    end: torch.Tensor  # (B,) long, one past the last known position
    hold: str = DEFAULT_HOLD

    def __post_init__(self) -> None:
        if self.hold not in HOLDS:
            raise ValueError(f"hold must be one of {HOLDS}, got {self.hold!r}")

    def apply(self, z: torch.Tensor, t, noise: torch.Tensor, s: float) -> torch.Tensor:
        """z with known positions put where the hold rule keeps them at time t."""
        if self.hold == "noised":
            t = t.reshape(-1, 1, 1) if torch.is_tensor(t) else t  # one time per row
            held = t * self.latents + (1 - t) * s * noise
        else:
            held = self.latents
        return torch.where(self.mask[..., None], held, z)

    def x_hat(self, x_hat: torch.Tensor) -> torch.Tensor:
        """The prediction at known positions is their clean latent."""
        return torch.where(self.mask[..., None], self.latents, x_hat)

    def finish(self, tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
        """Decoded ids (B, S) -> known tokens written back, and eos handled around them.

        An eos the decoder puts inside a gap becomes pad (an empty slot) instead of ending
        the text before the known tokens that follow; from `end` on, the first eos ends
        the text as usual (everything from it becomes pad).
        """
        tokens = torch.where(self.mask, self.ids, tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        tail = positions >= self.end[:, None]
        is_eos = tokens == eos_id
        after = (is_eos & tail).cumsum(dim=-1) > 0
        return tokens.masked_fill(after | (is_eos & ~tail), pad_id)

    def select(self, index: torch.Tensor) -> KnownTokens:
        """The known tokens of rows `index` only."""
        return KnownTokens(
            self.ids[index], self.mask[index], self.latents[index], self.end[index], self.hold
        )

    def slice(self, start: int, stop: int, device=None) -> KnownTokens:
        return KnownTokens(
            ids=self.ids[start:stop].to(device),
            mask=self.mask[start:stop].to(device),
            latents=self.latents[start:stop].to(device),
            end=self.end[start:stop].to(device),
            hold=self.hold,
        )


def lay_out(
    layouts: Sequence[Layout], length: int, offsets: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, S), known mask (B, S), segment number (B, S), -1 off known positions).

    Row b's layout starts at position offsets[b] (its condition length, or 0).
    """
    B = len(layouts)
    ids = torch.full((B, length), pad_id, dtype=torch.long)
    known = torch.zeros(B, length, dtype=torch.bool)
    segment = torch.full((B, length), -1, dtype=torch.long)
    for b, (layout, offset) in enumerate(zip(layouts, offsets, strict=True)):
        if offset + layout.span > length:
            raise ValueError(f"layout of {layout.span} tokens does not fit at {offset}/{length}")
        number, previous_known = -1, False
        for j, token in enumerate(layout.ids):
            if token is None:
                previous_known = False
                continue
            if not previous_known:
                number += 1
            previous_known = True
            ids[b, offset + j] = token
            known[b, offset + j] = True
            segment[b, offset + j] = number
    return ids, known, segment


def known_pair_mask(
    known: torch.Tensor, segment: torch.Tensor, cond: torch.Tensor, encoding: str
) -> torch.Tensor:
    """The encoder's (B, S, S) bool mask [b, query, key] for encoding the known tokens.

    Condition queries see only the condition (as in training). Known queries see the
    condition and the known keys (`masked`) or only their own segment (`segments`).
    Other positions (gaps, the rest) see the same keys as the known ones; their latents
    are not used.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")

    allowed = encoder_pair_mask(cond | known, cond)  # (B, S, S)
    if encoding == "segments":
        same = segment[:, :, None] == segment[:, None, :]  # (B, S, S)
        keep = cond[:, None, :] | same | ~known[:, :, None]
        allowed = allowed & keep
    return allowed


@torch.no_grad()
def known_tokens(
    encoder,
    tokenizer,
    layouts: Sequence[Layout],
    length: int,
    *,
    hold: str = DEFAULT_HOLD,
    encoding: str = DEFAULT_ENCODING,
    sources: Sequence[str] | None = None,
    max_input_length: int = 0,
    pad_token: str = "eos",
    device: str | torch.device = "cpu",
    token_ids: Sequence[list[int] | None] | None = None,
) -> KnownTokens:
    """KnownTokens for one batch: row b holds layouts[b] (after sources[b], when given).

    With `sources`, each row is laid out as conditional training lays it out (the source
    cut to `max_input_length`, then the target), and the known tokens start where the
    target does; `token_ids` are the sources' own condition ids where a dataset has them
    (`conditions.condition_token_ids`).
    """

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    B = len(layouts)
    if sources is not None:
        batch = condition_batch(
            tokenizer, list(sources), length, max_input_length, pad_token, token_ids
        )
        cond, cond_ids = batch["cond_seq_mask"], batch["input_ids"]
        offsets = batch["cond_len"].tolist()
    else:
        cond = torch.zeros(B, length, dtype=torch.bool)
        cond_ids = torch.full((B, length), pad_id, dtype=torch.long)
        offsets = [0] * B
    ids, known, segment = lay_out(layouts, length, offsets, pad_id)
    input_ids = torch.where(known, ids, cond_ids).to(device)
    pair = known_pair_mask(known, segment, cond, encoding).to(device)
    with torch.autocast(torch.device(device).type, enabled=False):
        latents = encoder.encode(input_ids, pair_mask=pair)  # (B, S, C)
    known = known.to(device)
    ends = torch.tensor([o + layout.span for o, layout in zip(offsets, layouts, strict=True)])
    return KnownTokens(
        ids=ids.to(device),
        mask=known,
        latents=latents * known[..., None],
        end=ends.to(device),
        hold=hold,
    )
