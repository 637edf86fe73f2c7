"""Training rows, where they come from, and how a batch of them is collated.

A row is a mapping with `input_ids` (the target's token ids, no special tokens)
and, for conditional data, `condition_input_ids`; evaluation rows may also carry
raw `input` (source) and `target` text. Rows come from (docs/method.md section 2):

  a) a hub dataset id               -> `datasets.load_dataset`, or its snapshot via
                                       `load_from_disk` when it is stored in
                                       `save_to_disk` layout;
  b) a local `save_to_disk` folder  -> `load_from_disk`;
  c) the user's raw text            -> a `.txt` file, a `.jsonl` file, a folder of
                                       them or a glob, tokenized without special
                                       tokens and cached by `pipeline.py`;
  d) a `testbed:` URI               -> the offline test bed's `save_to_disk` folder.

Raw text rules:
  .txt   text_mode "line" (default): one example per non-empty line;
         text_mode "file": one example per file (the whole file, stripped).
  .jsonl one JSON object per non-blank line; unconditional data reads
         `data.text_field`, conditional data reads `data.source_field` (the
         condition) and `data.target_field`. Raw text is kept as `target`
         (and `input` for the condition).

With `data.packing`, unconditional rows of any source are packed into rows of exactly
`max_length` tokens (pipeline.py says how), cached like tokenized text.

Collation masks are bool tensors (True = yes); see `collate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from elfctl import hub
from elfctl.config import DataConfig
from elfctl.data.pipeline import (
    PreparedRows,
    check_data_settings,
    is_glob,
    prepare_packed_rows,
    prepare_text_rows,
)
from elfctl.errors import UserError
from elfctl.testbed.assets import resolve_testbed_uri

TEXT_MODES = ("line", "file")
_TOKENIZE_CHUNK = 1024  # texts per tokenizer call

# ---------------------------------------------------------------------------
# Collation


def collate(
    rows: Sequence[dict[str, Any]],
    max_length: int,
    max_input_length: int,
    pad_token: str = "pad",
    pad_id: int = 0,
    eos_id: int = 1,
) -> dict[str, torch.Tensor]:
    """Rows -> a padded batch, exactly as docs/method.md section 2.

    sequence = condition[:max_input_length] + target, cut or padded to max_length
    with `pad_id` (pad_token "pad") or `eos_id` (pad_token "eos"). Returns
      input_ids           (B, S) long
      attention_mask      (B, S) bool  p < total_len        (real tokens)
      cond_seq_mask       (B, S) bool  p < cond_len         (condition tokens)
      loss_mask           (B, S) bool  (attention_mask if "pad" else all) and not condition
      cond_len            (B,)   long  condition tokens kept
      condition_truncated (B,)   bool  the condition was longer than max_input_length
    """
    if pad_token not in ("pad", "eos"):
        raise ValueError(f"pad_token must be 'pad' or 'eos', got {pad_token!r}")
    fill_id = pad_id if pad_token == "pad" else eos_id
    batch = len(rows)
    input_ids = torch.full((batch, max_length), fill_id, dtype=torch.long)
    cond_len = torch.zeros(batch, dtype=torch.long)
    total_len = torch.zeros(batch, dtype=torch.long)
    condition_truncated = torch.zeros(batch, dtype=torch.bool)
    for i, row in enumerate(rows):
        condition = list(row.get("condition_input_ids") or [])
        condition_truncated[i] = len(condition) > max_input_length
        condition = condition[:max_input_length]
        sequence = (condition + list(row["input_ids"]))[:max_length]
        if sequence:
            input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        cond_len[i] = min(len(condition), max_length)
        total_len[i] = len(sequence)
    positions = torch.arange(max_length)  # (S,)
    attention_mask = positions[None, :] < total_len[:, None]  # (B, S)
    cond_seq_mask = positions[None, :] < cond_len[:, None]  # (B, S)
    counted = attention_mask if pad_token == "pad" else torch.ones_like(attention_mask)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "cond_seq_mask": cond_seq_mask,
        "loss_mask": counted & ~cond_seq_mask,
        "cond_len": cond_len,
        "condition_truncated": condition_truncated,
    }


class Collator:
    """`collate` bound to a data config and tokenizer ids: a DataLoader `collate_fn`."""

    def __init__(self, cfg: DataConfig, pad_id: int = 0, eos_id: int = 1):
        self.max_length = cfg.max_length
        self.max_input_length = cfg.max_input_length
        self.pad_token = cfg.pad_token
        self.pad_id = pad_id
        self.eos_id = eos_id

    @classmethod
    def for_tokenizer(cls, cfg: DataConfig, tokenizer) -> Collator:
        pad_id = tokenizer.pad_token_id
        eos_id = tokenizer.eos_token_id
        return cls(cfg, 0 if pad_id is None else pad_id, 1 if eos_id is None else eos_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(
            rows, self.max_length, self.max_input_length, self.pad_token, self.pad_id, self.eos_id
        )


# ---------------------------------------------------------------------------
# Row sources


@dataclass
class LoadedRows:
    rows: Any  # datasets.Dataset
    prepared: PreparedRows | None  # set when the rows were built or reused from the cache


def load_rows(
    source: str,
    cfg: DataConfig,
    tokenizer=None,
    split: str = "train",
    text_mode: str | None = None,
):
    """The rows named by `source`, as an indexable dataset (`datasets.Dataset`)."""
    return load_corpus(source, cfg, tokenizer, split, text_mode).rows


def load_corpus(
    source: str,
    cfg: DataConfig,
    tokenizer=None,
    split: str = "train",
    text_mode: str | None = None,
    *,
    may_build: bool = True,
    on_progress=None,
) -> LoadedRows:
    """The rows named by `source`, and (for cached rows) where they live.

    An existing local path or a glob is a `save_to_disk` folder or raw text;
    `testbed:...` is resolved by the test bed; anything else is a hub dataset id.
    `tokenizer` is needed for raw text and packing. text_mode ("line" | "file")
    overrides `cfg.text_mode`. `may_build=False` (non-main processes) only reads the
    cache; see `pipeline.prepare_text_rows`.
    """

    check_data_settings(cfg)
    if text_mode is not None:
        cfg = replace(cfg, text_mode=text_mode)
    if cfg.text_mode not in TEXT_MODES:
        raise UserError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {cfg.text_mode!r}.")
    path = Path(source).expanduser()
    if source.startswith("testbed:"):
        rows = load_disk_rows(Path(resolve_testbed_uri(source)), split)
    elif is_glob(source) or (path.exists() and not is_save_to_disk_folder(path)):
        if tokenizer is None:
            raise ValueError("raw text sources need a tokenizer")
        prepared = prepare_text_rows(
            source, cfg, tokenizer, may_build=may_build, on_progress=on_progress
        )
        return LoadedRows(prepared.rows, prepared)
    elif path.exists():
        rows = load_disk_rows(path, split)
    elif _looks_like_path(source):
        raise UserError(f"Data source not found: {source}.")
    else:
        rows = load_hub_rows(source, split)
    check_columns(rows, source, cfg.conditional)
    if cfg.packing:
        if tokenizer is None:
            raise ValueError("packing needs a tokenizer (its eos id)")
        prepared = prepare_packed_rows(rows, source, cfg, tokenizer, may_build=may_build)
        return LoadedRows(prepared.rows, prepared)
    return LoadedRows(rows, None)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name" and carry no file extension.
    return (
        source.startswith(("/", "./", "../", "~"))
        or source.count("/") > 1
        or Path(source).suffix != ""
    )


def check_columns(rows, source: str, conditional: bool) -> None:
    columns = set(rows.column_names)
    needed = ["input_ids"] + (["condition_input_ids"] if conditional else [])
    missing = [c for c in needed if c not in columns]
    if missing:
        have = ", ".join(sorted(columns)) or "none"
        raise UserError(f"Data source {source} has no column {missing[0]!r} (its columns: {have}).")


def is_save_to_disk_folder(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    )


def load_disk_rows(path: Path, split: str):
    """A `save_to_disk` folder; a DatasetDict gives its `split`."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load the dataset folder {path}: {e}") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            have = ", ".join(data.keys())
            raise UserError(f"Dataset folder {path} has no split '{split}' (it has: {have}).")
        return data[split]
    return data


def is_save_to_disk_metadata(rows) -> bool:
    """True when a hub copy of a `save_to_disk` folder loaded as its own metadata.

    `load_dataset` on such a repo reads `state.json` as data: one row (one per
    split folder) whose columns are all `_`-prefixed bookkeeping (`_data_files`,
    `_fingerprint`, ...). No real dataset has only `_`-prefixed columns.
    """
    columns = rows.column_names
    return len(rows) > 0 and bool(columns) and all(c.startswith("_") for c in columns)


def load_hub_rows(repo_id: str, split: str):
    """A hub dataset, falling back to its snapshot when stored in `save_to_disk` layout.

    `repo_id` may also be a local folder (what `load_dataset` accepts), which is
    then its own snapshot.
    """
    rows = load_dataset_or_none(repo_id, split)
    if rows is not None:
        return rows
    return load_disk_rows(save_to_disk_root(dataset_snapshot(repo_id)), split)


def load_dataset_or_none(repo_id: str, split: str | None = None):
    """`load_dataset(repo_id, split=split)` (every split when None), or None when the repo
    holds a `save_to_disk` folder, which must then be loaded from its snapshot: `datasets`
    either refuses it or reads its metadata as rows."""
    from datasets import load_dataset

    local = Path(repo_id).exists()
    try:
        with nullcontext() if local else hub.access(repo_id, "the dataset"):
            try:
                data = load_dataset(repo_id, split=split)
            except ValueError as e:
                if "save_to_disk" in str(e):
                    return None  # a save_to_disk folder: datasets says so itself
                raise
    except (OSError, ValueError) as e:  # a local folder: hub errors are UserErrors already
        raise UserError(f"Could not load dataset '{repo_id}': {e}") from None
    parts = [data] if split is not None else list(data.values())
    return None if any(is_save_to_disk_metadata(part) for part in parts) else data


def dataset_snapshot(repo_id: str) -> Path:
    """A hub dataset repo's local snapshot; a local folder is its own snapshot."""
    if Path(repo_id).is_dir():
        return Path(repo_id)
    from huggingface_hub import snapshot_download

    with hub.access(repo_id, "the dataset"):
        return Path(snapshot_download(repo_id, repo_type="dataset"))


def save_to_disk_root(folder: Path) -> Path:
    """The `save_to_disk` folder inside a snapshot: the folder itself or its shallowest one."""
    if is_save_to_disk_folder(folder):
        return folder
    for marker in ("dataset_dict.json", "state.json"):
        found = sorted(folder.rglob(marker), key=lambda p: (len(p.parts), str(p)))
        if found:
            return found[0].parent
    raise UserError(f"Dataset snapshot {folder} holds no save_to_disk folder.")


# ---------------------------------------------------------------------------
# Raw text


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the rows' convention)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


# ---------------------------------------------------------------------------
# Deterministic, resumable order


class EpochShuffler:
    """Per-epoch permutations of the rows, sharded across processes, resumable.

    Epoch e's order is `randperm(n_rows)` from a generator seeded with seed + e, so
    it depends on nothing but (seed, epoch). Process `rank` of `world_size` takes
    every world_size-th row of it; the last n_rows % world_size rows of each
    permutation are skipped so every process sees the same number of rows (a
    different few each epoch). Resuming at (epoch, position) -- position counts
    this process's rows already consumed in that epoch -- continues the same order.
    """

    def __init__(self, n_rows: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if n_rows < world_size:
            raise UserError(
                f"The dataset has {n_rows} rows, fewer than the {world_size} processes."
            )
        self.n_rows = n_rows
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        """Rows per process per epoch."""
        return self.n_rows // self.world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's row indices for `epoch`, in order."""
        return self._epoch_order(epoch).tolist()

    def _epoch_order(self, epoch: int):
        """`epoch_indices` as a numpy array, kept for the latest epoch: the permutation is
        drawn once per epoch, not per batch, and a corpus of many millions of rows costs
        8 bytes a row, not a Python int each."""
        cached = getattr(self, "_cached_order", None)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n_rows, generator=generator)
            used = len(self) * self.world_size
            cached = (epoch, order[:used][self.rank :: self.world_size].numpy().copy())
            self._cached_order = cached
        return cached[1]

    def stream(self, epoch: int = 0, position: int = 0) -> Iterator[tuple[int, int, int]]:
        """Endless (epoch, position, row index) from the given point on."""
        while True:
            indices = self._epoch_order(epoch)
            for p in range(position, len(indices)):
                yield epoch, p, int(indices[p])
            epoch, position = epoch + 1, 0

    def batches(
        self, batch_size: int, epoch: int = 0, position: int = 0
    ) -> Iterator[tuple[list[int], int, int]]:
        """Endless (row indices, epoch, position) where (epoch, position) resumes after it.

        A batch may span an epoch boundary; the returned point is where the next
        batch starts, which is what a checkpoint should store.
        """
        rows = self.stream(epoch, position)
        while True:
            batch = []
            for _ in range(batch_size):
                epoch, position, index = next(rows)
                batch.append(index)
            position += 1
            if position == len(self):
                epoch, position = epoch + 1, 0
            yield batch, epoch, position
