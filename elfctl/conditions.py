"""Sources for conditional sampling: reading them, and encoding them as the model saw them.

`read_sources` turns what the user gives `elfctl sample --input` into source texts (and
their references, when known), in input order:

  .jsonl file          one JSON object per non-blank line: `source_field` (required, a
                       string) and `reference_field` (optional, a string or null);
  .txt file            one source per non-blank line, no references;
  save_to_disk folder  `datasets.load_from_disk` (a DatasetDict gives `split`);
  testbed:<name>/<part> the offline test bed's save_to_disk folder;
  anything else        a hub dataset id (or a local folder of data files), through
                       `datasets.load_dataset`, falling back to `load_from_disk` on the
                       snapshot when the repo is stored in save_to_disk layout.

Dataset rows read the same two fields; the official pre-tokenized evaluation sets keep
their raw text in `input` (source) and `target` (reference), and the token ids the model is
conditioned on in `condition_input_ids`. Those ids are what the official evaluation feeds
the model, and re-tokenizing the text need not give them back, so `read_source_rows` keeps
a row's `condition_input_ids` and encoding uses them as they are; only rows without them
(files, datasets without the column) are tokenized from their text.

`encode_conditions` lays sources out exactly like training collation (ELF_SPEC.md section
2: condition first, truncated to `max_input_length`, in a `max_length` sequence) and
encodes them with the per-pair encoder mask (section 1). A condition position attends only
to condition positions, so its latent does not depend on what fills the target positions:
here they are padding, and only the condition positions' latents are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .data import (
    collate,
    dataset_snapshot,
    is_save_to_disk_folder,
    jsonl_objects,
    load_dataset_or_none,
    load_hub_rows,
    read_text,
    save_to_disk_root,
    tokenize,
)
from .errors import UserError
from .sampler import Condition

if TYPE_CHECKING:
    from .encoder import FrozenEncoder

# Splits tried, in order, when a dataset has several and none was named.
PREFERRED_SPLITS = ("validation", "test")

# The column of pre-tokenized conditions in the official datasets (ELF_SPEC.md section 2).
CONDITION_IDS = "condition_input_ids"


@dataclass
class Sources:
    """Sources in input order: their text, references (None where unknown) and, per row,
    the dataset's own condition token ids (None where the row has none)."""

    texts: list[str]
    references: list[str | None]
    token_ids: list[list[int] | None]


# ---------------------------------------------------------------------------
# Reading sources


def read_sources(
    input: str,
    source_field: str = "input",
    reference_field: str = "target",
    split: str | None = None,
    limit: int | None = None,
    option: str = "--input",
) -> tuple[list[str], list[str | None]]:
    """(sources, references) from a file, a dataset folder or a hub dataset, in order.

    References are None where the input has none. `limit` keeps the first rows only.
    `option` is the command-line option named in error messages.
    """
    rows = read_source_rows(input, source_field, reference_field, split, limit, option)
    return rows.texts, rows.references


def check_input_exists(input: str, option: str = "--input") -> None:
    """A local input that does not exist is an error before anything heavy is loaded."""
    if input.startswith("testbed:"):
        return
    if not Path(input).expanduser().exists() and _looks_like_local_path(input):
        raise UserError(f"{option} not found: {input}.")


def read_source_rows(
    input: str,
    source_field: str = "input",
    reference_field: str = "target",
    split: str | None = None,
    limit: int | None = None,
    option: str = "--input",
) -> Sources:
    """`read_sources`, plus each dataset row's `condition_input_ids` where it has them."""
    check_input_exists(input, option)
    if input.startswith("testbed:"):
        from .testbed.assets import resolve_testbed_uri

        path = Path(resolve_testbed_uri(input))
    else:
        path = Path(input).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            pairs = read_jsonl_sources(path, source_field, reference_field, limit)
        elif path.suffix == ".txt":
            pairs = [(line, None) for line in read_txt_sources(path)][:limit]
        else:
            raise UserError(
                f"Unsupported {option} file {path}: expected .jsonl, .txt, a save_to_disk folder "
                "or a hub dataset."
            )
        triples = [(source, reference, None) for source, reference in pairs]
    elif path.is_dir() and is_save_to_disk_folder(path):
        rows = _load_disk(path, split)
        triples = dataset_sources(rows, str(path), source_field, reference_field, limit)
    else:
        rows = _load_hub(input if not path.is_dir() else str(path), split)
        triples = dataset_sources(rows, input, source_field, reference_field, limit)
    if not triples:
        what = "sources" if option == "--input" else "texts"
        raise UserError(f"{option} {input} holds no {what}.")
    texts, references, token_ids = (list(column) for column in zip(*triples, strict=True))
    return Sources(texts, references, token_ids)


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name" without a file extension.
    return (
        name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).suffix != ""
    )


def read_txt_sources(file: Path) -> list[str]:
    """One source per non-blank line (surrounding whitespace stripped)."""
    return [line.strip() for line in read_text(file).splitlines() if line.strip()]


def read_jsonl_sources(
    file: Path, source_field: str, reference_field: str, limit: int | None = None
) -> list[tuple[str, str | None]]:
    """(source, reference or None) per non-blank line; bad lines name file and line."""
    pairs: list[tuple[str, str | None]] = []
    if limit is not None and limit <= 0:
        return pairs
    for where, record in jsonl_objects(file):
        if source_field not in record:
            raise UserError(f"{where}: missing the source field '{source_field}'.")
        source = record[source_field]
        if not isinstance(source, str):
            kind = type(source).__name__
            raise UserError(f"{where}: field '{source_field}' must be a string, not {kind}.")
        reference = record.get(reference_field)
        if reference is not None and not isinstance(reference, str):
            kind = type(reference).__name__
            raise UserError(
                f"{where}: field '{reference_field}' must be a string or null, not {kind}."
            )
        pairs.append((source, reference))
        if limit is not None and len(pairs) >= limit:
            break  # lines past the limit are not read
    return pairs


def dataset_sources(
    rows, where: str, source_field: str, reference_field: str, limit: int | None
) -> list[tuple[str, str | None, list[int] | None]]:
    """(source, reference or None, condition ids or None) per dataset row; the reference
    and `condition_input_ids` columns are optional."""
    columns = rows.column_names
    if source_field not in columns:
        raise UserError(
            f"Dataset {where} has no source column '{source_field}' (its columns: "
            f"{', '.join(columns)}); choose one with --source-field."
        )
    if limit is not None and limit < len(rows):
        rows = rows.select(range(limit))
    sources = rows[source_field]
    references = rows[reference_field] if reference_field in columns else [None] * len(sources)
    token_ids = rows[CONDITION_IDS] if CONDITION_IDS in columns else [None] * len(sources)
    for i, (source, reference, ids) in enumerate(zip(sources, references, token_ids, strict=True)):
        if not isinstance(source, str) or not (reference is None or isinstance(reference, str)):
            raise UserError(
                f"Dataset {where}, row {i}: '{source_field}' and '{reference_field}' must hold "
                "text."
            )
        if ids is not None and not all(isinstance(t, int) and t >= 0 for t in ids):
            raise UserError(
                f"Dataset {where}, row {i}: '{CONDITION_IDS}' must be a list of token ids."
            )
    return list(zip(sources, references, token_ids, strict=True))


def pick_split(data, split: str | None, where: str):
    """A Dataset as is; from a DatasetDict the named split, else validation/test/the only one."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    have = ", ".join(data.keys())
    if split is not None:
        if split not in data:
            raise UserError(f"Dataset {where} has no split '{split}' (it has: {have}).")
        return data[split]
    for name in PREFERRED_SPLITS:
        if name in data:
            return data[name]
    if len(data) == 1:
        return next(iter(data.values()))
    raise UserError(f"Dataset {where} has several splits ({have}); choose one with --split.")


def _load_disk(path: Path, split: str | None):
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load the dataset folder {path}: {e}") from None
    return pick_split(data, split, str(path))


def _load_hub(repo_id: str, split: str | None):
    """A hub dataset's split; a repo in save_to_disk layout loads from its snapshot.

    With a split named, only that split is loaded (the lead's `load_hub_rows`). Without
    one, every split is loaded and `pick_split` chooses.
    """
    if split is not None:
        return load_hub_rows(repo_id, split)
    data = load_dataset_or_none(repo_id)
    if data is not None:
        return pick_split(data, None, repo_id)
    return _load_disk(save_to_disk_root(dataset_snapshot(repo_id)), None)


# ---------------------------------------------------------------------------
# Encoding conditions


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
    from .encoder import encoder_pair_mask

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
