"""Streamed training rows (`data.streaming: true`) that resume exactly after a kill.

For hub datasets too big to download: `load_dataset(source, split=..., streaming=True)`,
which also streams a local folder of data files. A local .txt / .jsonl file or a glob of
them streams through datasets' own `json` / `text` readers, file by file in name order,
without tokenizing everything first. A `save_to_disk` folder cannot be streamed. Split
across processes with `datasets.distributed.split_dataset_by_node`, read in the
source's order (no shuffle buffer: `datasets` cannot restore a buffer's content, so a
resumed run would skip examples). Each process keeps its own position: the stream's
`state_dict()` after the last example it consumed, plus the tokens a packed row has
not used yet. A checkpoint stores both; `load_state_dict` continues from the next
example, so a killed and resumed run sees exactly the rows a straight run sees.

Rows are the stream's `input_ids` (and `condition_input_ids`) when it has them, else its
text fields (`data.text_field`, or `data.source_field` / `data.target_field`) tokenized
here without special tokens. With `data.packing`, documents are joined and cut exactly
by `pipeline.Packer`, the rule cached rows are packed by. At the end of the stream the next
epoch reads it again (`set_epoch`), in the order datasets gives that epoch (a function
of the epoch only).

Before training, `check_exact_resume` saves the position after 3 and after 300
examples, restores each in a fresh copy of the stream and compares the examples that
follow: a source that `datasets` cannot resume exactly is refused with a clear error
instead of resuming inexactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from elfctl import hub
from elfctl.config import DataConfig
from elfctl.data.pipeline import Packer, check_data_settings, is_glob, text_files
from elfctl.errors import UserError

PROBE_OFFSETS = (3, 300)  # positions saved, restored in a fresh stream, and compared
PROBE_EXAMPLES = 3  # examples compared after each restored position


def open_stream(source: str, cfg: DataConfig, split: str, rank: int = 0, world_size: int = 1):
    """This process's share of the streamed dataset `source` (an IterableDataset)."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    if is_local_text(source):
        stream = _local_text_stream(source, cfg)
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        return stream
    local = Path(source).exists()
    try:
        with nullcontext() if local else hub.access(source, "the dataset"):
            try:
                stream = load_dataset(source, split=split, streaming=True)
            except ValueError as e:
                if "save_to_disk" in str(e):
                    raise UserError(_save_to_disk_message(source)) from None
                raise
    except (OSError, ValueError) as e:  # a local folder: hub errors are UserErrors already
        raise UserError(f"Could not stream dataset '{source}': {e}") from None
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream


def is_local_text(source: str) -> bool:
    """A glob or a local file: what `load_dataset(source)` would take for a hub id. (A local
    folder of data files is streamed by `load_dataset(folder)` itself.)"""
    return is_glob(source) or Path(source).expanduser().is_file()


def _local_text_stream(source: str, cfg: DataConfig):
    """Local .txt / .jsonl files streamed by datasets' readers: a .jsonl row per line; a
    .txt example per non-empty line (text_mode line) or per file (text_mode file)."""
    from datasets import load_dataset

    files = text_files(source)
    suffixes = sorted({f.suffix for f in files})
    if len(suffixes) > 1:
        raise UserError(
            f"{source} mixes {' and '.join(suffixes)} files; a stream reads one kind, so name "
            "one of them."
        )
    data_files = [str(f) for f in files]
    if suffixes[0] == ".jsonl":
        return load_dataset("json", data_files=data_files, split="train", streaming=True)
    by = "document" if cfg.text_mode == "file" else "line"
    stream = load_dataset(
        "text", data_files=data_files, split="train", streaming=True, sample_by=by
    )
    field = cfg.text_field
    stream = stream.filter(lambda example: bool(example["text"].strip()))
    if field != "text":
        stream = stream.rename_column("text", field)
    return stream


def _save_to_disk_message(source: str) -> str:
    return (
        f"{source} is stored in save_to_disk layout, which datasets can only load whole, "
        "not stream; set data.streaming=false (it is then downloaded once and memory-mapped)."
    )


def check_stream_columns(first: dict, source: str, cfg: DataConfig) -> None:
    """The first example must carry token ids or the text fields the config reads."""
    columns = set(first)
    if columns and all(c.startswith("_") for c in columns):  # save_to_disk bookkeeping
        raise UserError(_save_to_disk_message(source))
    tokens = ["input_ids"] + (["condition_input_ids"] if cfg.conditional else [])
    texts = [cfg.source_field, cfg.target_field] if cfg.conditional else [cfg.text_field]
    if not (set(tokens) <= columns or set(texts) <= columns):
        have = ", ".join(sorted(columns)) or "none"
        want = " and ".join(tokens)
        raise UserError(
            f"Streamed dataset {source} has neither {want} nor the text field(s) "
            f"{', '.join(texts)} (its columns: {have})."
        )


def check_exact_resume(make_stream: Callable[[], object], source: str) -> None:
    """Refuse a stream whose restored position does not continue with the same examples.

    Probed at a few positions, near the start and past datasets' first internal chunks
    (a shuffle buffer, for one, is restored exactly only inside the first chunk).
    """
    for offset in PROBE_OFFSETS:
        stream = make_stream()
        examples = iter(stream)
        if len(_take(examples, offset)) < offset:
            return  # a stream this short was probed at every position it has
        try:
            state = stream.state_dict()
        except (NotImplementedError, RuntimeError) as e:
            raise UserError(_inexact_message(source, str(e))) from None
        expected = _take(examples, PROBE_EXAMPLES)
        restored = make_stream()
        try:
            restored.load_state_dict(state)
        except (NotImplementedError, RuntimeError, KeyError, ValueError) as e:
            raise UserError(_inexact_message(source, str(e))) from None
        if _take(iter(restored), PROBE_EXAMPLES) != expected:
            raise UserError(_inexact_message(source, "a restored position gives other examples"))


def _inexact_message(source: str, why: str) -> str:
    return (
        f"datasets cannot resume the stream of {source} exactly after a kill ({why}), so "
        "elfctl will not stream it; set data.streaming=false to download it instead."
    )


def _take(examples, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(examples))
        except StopIteration:
            break
    return out


class RowStream:
    """Training rows from a stream, in order, with an exactly resumable position."""

    def __init__(self, source: str, cfg: DataConfig, tokenizer, split: str, rank=0, world=1):
        check_data_settings(cfg)
        self.source, self.cfg, self.tokenizer = source, cfg, tokenizer
        self.eos_id = 1 if tokenizer.eos_token_id is None else tokenizer.eos_token_id
        self.stream = open_stream(source, cfg, split, rank, world)
        first = _take(iter(self.stream), 1)
        if not first:
            raise UserError(f"Streamed dataset {source} holds no examples.")
        check_stream_columns(first[0], source, cfg)
        check_exact_resume(lambda: open_stream(source, cfg, split, rank, world), source)
        self.stream = open_stream(source, cfg, split, rank, world)
        self.epoch = 0
        self.packer = Packer(cfg.max_length, self.eos_id)  # the same rule as cached rows
        self.pending: list[list[int]] = []  # packed rows made but not yet given out
        self._examples = None

    # -- reading --------------------------------------------------------------------------

    def _next_example(self) -> dict:
        while True:
            if self._examples is None:
                self._examples = iter(self.stream)
            try:
                return next(self._examples)
            except StopIteration:
                # the next epoch, from its start (datasets applies a loaded position only
                # within the epoch it was saved in)
                self.epoch += 1
                self.stream.set_epoch(self.epoch)
                self._examples = None

    def _row_of(self, example: dict) -> dict:
        cfg = self.cfg
        if "input_ids" in example and (not cfg.conditional or "condition_input_ids" in example):
            row = {"input_ids": list(example["input_ids"])}
            if cfg.conditional:
                row["condition_input_ids"] = list(example["condition_input_ids"])
            return row
        fields = [cfg.source_field, cfg.target_field] if cfg.conditional else [cfg.text_field]
        texts = [example.get(name) for name in fields]
        if any(not isinstance(t, str) for t in texts):
            raise UserError(f"Streamed dataset {self.source} has an example without text fields.")
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if cfg.conditional:
            return {"condition_input_ids": ids[0], "input_ids": ids[1]}
        return {"input_ids": ids[0]}

    def take(self, n: int) -> list[dict]:
        """The next n rows."""
        if not self.cfg.packing:
            return [self._row_of(self._next_example()) for _ in range(n)]
        import pyarrow as pa

        while len(self.pending) < n:
            doc = self._row_of(self._next_example())["input_ids"]
            self.pending += self.packer.add(pa.array([doc], pa.list_(pa.int32()))).tolist()
        rows, self.pending = self.pending[:n], self.pending[n:]
        return [{"input_ids": row} for row in rows]

    # -- position -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """JSON-ready: where this process's stream stands after the rows it gave out."""
        return {
            "source": self.source,
            "epoch": self.epoch,
            "stream": self.stream.state_dict(),
            "carry": self.packer.carry.tolist(),
            "started": self.packer.started,
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.packer = Packer(self.cfg.max_length, self.eos_id, state["carry"], state["started"])
        self.pending = [list(row) for row in state["pending"]]
        self.stream.load_state_dict(copy.deepcopy(state["stream"]))
        self.stream.set_epoch(state["stream"]["epoch"])  # where that position applies
        self._examples = None
