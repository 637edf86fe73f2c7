"""Raw text -> token rows through `datasets`: load, tokenize, pack, cache.

`.txt` / `.jsonl` sources (a file, a folder searched recursively, or a glob) are read
with `load_dataset("text" | "json", data_files=...)`, tokenized by a batched `map`
over `data.num_proc` processes, optionally packed, and saved with `save_to_disk`
under a cache key. Later runs with the same key load that folder (`load_from_disk`,
memory-mapped) and never call the tokenizer. Memory is bounded by the map's batch,
not by the corpus: every stage reads and writes Arrow files on disk.

The cache key is a sha256 over
  * every file: resolved path, size and mtime (ns);
  * the tokenizer: its class and full serialized state (vocabulary, normaliser, ...);
  * every setting that changes the rows: text_mode, the fields read, conditional,
    packing and (with packing) max_length;
  * PIPELINE_VERSION, bumped whenever this code would build different rows.
A cache entry is built in a staging folder and renamed into place when complete,
so an interrupted build leaves nothing that looks finished.

Packing (`data.packing: true`, unconditional data only): the documents, in corpus
order, are concatenated into one token stream with one eos id between consecutive
documents (none before the first or after the last), and the stream is cut into
consecutive rows of exactly `max_length` tokens. The last row holds the remainder
(1..max_length tokens) and is padded at collation like any short row. Every token
of the corpus is in exactly one row, in order; no document boundary resets a row,
so a row may start or end in the middle of a document. Rows are shuffled later by
the training sampler, never inside this stream.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from elfctl import records
from elfctl.config import DataConfig
from elfctl.data.jsonl import jsonl_object
from elfctl.errors import UserError
from elfctl.testbed.assets import cache_root

PIPELINE_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl")
MAP_BATCH = 1000  # texts per tokenizer call
CHUNK_BYTES = 32 * 2**20  # raw text per process per progress update
MANIFEST = "elfctl_rows.json"

# (documents done, documents in all, tokens done) after each chunk
Progress = Callable[[int, int, int], None]


@dataclass
class PreparedRows:
    """Rows ready for training, and where they came from."""

    rows: object  # datasets.Dataset, memory-mapped from `folder`
    folder: Path
    built: bool  # tokenized now (False: loaded from the cache)
    manifest: dict


# ---------------------------------------------------------------------------
# ConditionInputs


def is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def text_files(source: str | Path) -> list[Path]:
    """The .txt / .jsonl files named by a file, a folder (searched recursively) or a glob."""
    if isinstance(source, str) and is_glob(source):
        matched = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matched if p.is_file() and p.suffix in TEXT_SUFFIXES]
        if not files:
            raise UserError(f"The pattern {source} matches no .txt or .jsonl files.")
        return files
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise UserError(
                f"Unsupported data file {path}: expected .txt, .jsonl or a save_to_disk folder."
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(
            f"Data folder {path} holds no .txt or .jsonl files and is not a save_to_disk folder."
        )
    return files


def check_data_settings(cfg: DataConfig) -> None:
    """Setting combinations that can never work, refused before anything is read."""
    if cfg.packing and cfg.conditional:
        raise UserError(
            "data.packing applies to unconditional data only: conditional pairs are never "
            "packed (set data.packing=false)."
        )
    if cfg.num_proc < 1:
        raise UserError(f"data.num_proc must be at least 1, got {cfg.num_proc}.")


# ---------------------------------------------------------------------------
# The cache key


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides the tokenizer's ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:  # a slow (Python) tokenizer: datasets' own deterministic hasher
        from datasets.fingerprint import Hasher

        state = Hasher.hash(tokenizer)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\n{state}".encode())
    return digest.hexdigest()


def row_settings(cfg: DataConfig) -> dict:
    """The settings that change the rows built from a given corpus and tokenizer."""
    fields = (
        {"source_field": cfg.source_field, "target_field": cfg.target_field}
        if cfg.conditional
        else {"text_field": cfg.text_field}
    )
    settings = {"text_mode": cfg.text_mode, "conditional": cfg.conditional, **fields}
    settings["packing"] = cfg.packing
    if cfg.packing:
        settings["max_length"] = cfg.max_length
    return settings


def file_entries(files: list[Path]) -> list[list]:
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return entries


def cache_key(files: list[Path], tokenizer, cfg: DataConfig) -> tuple[str, dict]:
    """(key, the inputs it covers)."""
    inputs = {
        "version": PIPELINE_VERSION,
        "files": file_entries(files),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": row_settings(cfg),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    return key, inputs


def default_cache_dir() -> Path:

    return cache_root() / "data"


# ---------------------------------------------------------------------------
# Preparing (or reusing) the rows


def prepare_text_rows(
    source: str | Path,
    cfg: DataConfig,
    tokenizer,
    *,
    cache_dir: str | Path | None = None,
    may_build: bool = True,
    on_progress: Progress | None = None,
) -> PreparedRows:
    """The token rows of a raw-text source, from the cache or tokenized now.

    `may_build=False` (the non-main processes of a launch) loads the cache only: those
    processes never tokenize; the main process has built the entry before they look.
    """
    check_data_settings(cfg)
    files = text_files(source)
    if cfg.conditional and any(f.suffix == ".txt" for f in files):
        plain = next(f for f in files if f.suffix == ".txt")
        raise UserError(
            f"{plain} is plain text, but conditional data needs .jsonl rows with "
            f"'{cfg.source_field}' and '{cfg.target_field}' fields."
        )
    key, inputs = cache_key(files, tokenizer, cfg)

    def build(staging: Path):
        return build_rows(files, cfg, tokenizer, staging, on_progress, source)

    root = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser()
    return cached_rows(root, key, {"source": str(source), **inputs}, build, may_build)


def prepare_packed_rows(
    rows, source: str, cfg: DataConfig, tokenizer, *, cache_dir=None, may_build: bool = True
) -> PreparedRows:
    """Already tokenized unconditional rows (a save_to_disk folder, a hub dataset), packed.

    The key covers the dataset's own fingerprint (datasets derives it from the files or
    the hub revision), max_length and the eos id.
    """
    check_data_settings(cfg)
    eos_id = _eos_id(tokenizer)
    inputs = {
        "version": PIPELINE_VERSION,
        "source": str(source),
        "fingerprint": rows._fingerprint,
        "settings": {"packing": True, "max_length": cfg.max_length, "eos_id": eos_id},
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]

    def build(staging: Path):
        tokens = _count_tokens(rows)
        packed = pack(rows, cfg.max_length, eos_id, staging)
        return packed, {"documents": len(rows), "tokens": tokens, "rows": len(packed)}

    root = Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser()
    return cached_rows(root, key, inputs, build, may_build)


def cached_rows(root: Path, key: str, inputs: dict, build, may_build: bool) -> PreparedRows:
    """The cache entry `root/key`, built by `build(staging) -> (rows, stats)` if missing."""
    folder = root / key
    if (folder / MANIFEST).is_file():
        return _load_entry(folder, built=False)
    if not may_build:
        raise UserError(
            f"The prepared rows of {inputs['source']} are not in the cache {root} after the "
            "main process built them; every process must see the same data.cache_dir."
        )
    staging = root / f".staging-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _quiet_datasets():
            rows, stats = build(staging)
            rows.save_to_disk(str(staging / "rows"))
        del rows
        manifest = {**inputs, **stats}
        (staging / "rows" / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(staging / "rows", folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # another run finished the same key first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load_entry(folder, built=True)


def _load_entry(folder: Path, built: bool) -> PreparedRows:
    from datasets import load_from_disk

    fix = f"delete {folder} and it is built again from the source."
    manifest = records.read_json_state(folder / MANIFEST, fix)
    with records.reading_state(folder, fix):
        rows = load_from_disk(str(folder))
    return PreparedRows(rows, folder, built, manifest)


def build_rows(files, cfg: DataConfig, tokenizer, staging: Path, on_progress=None, source=None):
    """(rows, stats): load, tokenize (and pack) `files`, writing only under `staging`."""
    from datasets import concatenate_datasets

    groups = list(_file_groups([f for f in files if _has_text(f)]))  # datasets refuses blanks
    if not groups:
        raise UserError(f"Data source {source or files[0]} holds no text examples.")
    parts = [_load_part(group, cfg, staging) for group in groups]
    total = sum(len(part) for part in parts)
    pieces, done, tokens = [], 0, 0
    if on_progress is not None:
        on_progress(0, total, 0)
    for group, part in zip(groups, parts, strict=True):
        strip = group[0].suffix == ".txt"
        for piece in _chunks(part, cfg.num_proc):
            cache_file = staging / f"tok-{len(pieces):05d}.arrow"
            try:
                out = _tokenize(piece, cfg, tokenizer, strip, cache_file)
            except Exception:
                locate_bad_row(group, cfg)  # a missing or non-string JSON value
                raise
            pieces.append(out)
            done += len(piece)
            tokens += _count_tokens(out)
            if on_progress is not None:
                on_progress(done, total, tokens)
    tokenized = concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    if len(tokenized) == 0:
        raise UserError(f"Data source {source or files[0]} holds no text examples.")
    stats = {"documents": len(tokenized), "tokens": tokens}
    if cfg.packing:
        tokenized = pack(tokenized, cfg.max_length, _eos_id(tokenizer), staging)
    stats["rows"] = len(tokenized)
    return tokenized, stats


def _has_text(file: Path, chunk: int = 2**16) -> bool:
    """Whether a file holds anything but whitespace (reads only up to the first text)."""
    with open(file, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def _file_groups(files: list[Path]) -> Iterator[list[Path]]:
    """Consecutive runs of same-kind files, corpus order kept."""
    group: list[Path] = []
    for file in files:
        if group and file.suffix != group[0].suffix:
            yield group
            group = []
        group.append(file)
    if group:
        yield group


def _load_part(files: list[Path], cfg: DataConfig, staging: Path):
    """One group of files as a Dataset with `target` (and `input`) text columns."""
    from datasets import load_dataset

    data_files = [str(f) for f in files]
    cache = str(staging / "raw")
    try:
        if files[0].suffix == ".txt":
            sample_by = "document" if cfg.text_mode == "file" else "line"
            part = load_dataset(
                "text", data_files=data_files, split="train", sample_by=sample_by, cache_dir=cache
            )
            return part.rename_column("text", "target")
        part = load_dataset("json", data_files=data_files, split="train", cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - find the bad line, else report datasets' reason
        locate_bad_row(files, cfg)
        raise UserError(f"Could not read {files[0]}: {e}") from None
    fields = [cfg.source_field, cfg.target_field] if cfg.conditional else [cfg.text_field]
    names = ["input", "target"] if cfg.conditional else ["target"]
    if any(name not in part.column_names for name in fields):
        locate_bad_row(files, cfg)
    renames = {old: new for old, new in zip(fields, names, strict=True) if old != new}
    return part.select_columns(fields).rename_columns(renames)


def _chunks(part, num_proc: int) -> Iterator:
    """Contiguous pieces of about CHUNK_BYTES of text per process (progress granularity)."""
    n = len(part)
    per_row = max(part.data.nbytes / max(n, 1), 1.0)
    size = max(MAP_BATCH * num_proc, int(CHUNK_BYTES * num_proc / per_row))
    for start in range(0, n, size):
        yield part.select(range(start, min(n, start + size)))


def _tokenize(piece, cfg: DataConfig, tokenizer, strip: bool, cache_file: Path):
    from datasets import Features, Sequence, Value

    columns = {"input_ids": Sequence(Value("int32"))}
    if not cfg.packing:  # packed rows keep no text: it would no longer match a row
        columns["target"] = Value("string")
    if cfg.conditional:
        columns.update({"condition_input_ids": Sequence(Value("int32")), "input": Value("string")})
    # a pool only pays for itself on pieces of several batches per process
    procs = cfg.num_proc if len(piece) >= 2 * MAP_BATCH * cfg.num_proc else 1
    return piece.map(
        _tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH,
        num_proc=procs if procs > 1 else None,
        remove_columns=piece.column_names,
        features=Features(columns),
        fn_kwargs={
            "tokenizer": tokenizer,
            "strip": strip,
            "conditional": cfg.conditional,
            "keep_text": not cfg.packing,
        },
        cache_file_name=str(cache_file),
        new_fingerprint=cache_file.stem,
    )


def _tokenize_batch(batch, tokenizer, strip: bool, conditional: bool, keep_text: bool) -> dict:
    targets = batch["target"]
    sources = batch["input"] if conditional else None
    for values in (targets, sources or []):
        if any(not isinstance(v, str) for v in values):
            raise ValueError("a missing or non-string text value")
    if strip:  # .txt: surrounding whitespace goes, blank examples are dropped
        keep = [i for i, t in enumerate(targets) if t.strip()]
        targets = [targets[i].strip() for i in keep]
    out = {"input_ids": _ids(tokenizer, targets)}
    if keep_text:
        out["target"] = targets
    if conditional:
        out["condition_input_ids"] = _ids(tokenizer, sources)
        out["input"] = sources
    return out


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`; for a fast tokenizer
    straight from its Rust backend without offsets (the same ids, several times faster)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _count_tokens(rows) -> int:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(rows.data.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0)


def _eos_id(tokenizer) -> int:
    return 1 if tokenizer.eos_token_id is None else tokenizer.eos_token_id


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own tqdm bars off: the caller's progress callback reports instead."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


# ---------------------------------------------------------------------------
# Packing


class Packer:
    """The packing rule, incrementally: documents in, whole rows out, the rest carried.

    `carry` (tokens not yet in a row) and `started` (whether a document came before, so
    the next one is preceded by eos) are the whole state: restoring them continues the
    same cut, which is what a resumed stream needs.
    """

    def __init__(self, max_length: int, eos_id: int, carry=(), started: bool = False):
        import numpy as np

        self.max_length, self.eos_id = max_length, eos_id
        self.carry = np.asarray(carry, dtype=np.int32)
        self.started = started

    def add(self, docs):
        """Rows (k, max_length) completed by `docs`, a pyarrow list array of token ids."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(docs, pa.ChunkedArray):
            docs = docs.combine_chunks()
        if len(docs) == 0:
            return np.empty((0, self.max_length), dtype=np.int32)
        lengths = pc.list_value_length(docs).to_numpy(zero_copy_only=False)
        values = docs.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if not self.started:
            starts, self.started = starts[1:], True  # nothing before the first document
        stream = np.concatenate([self.carry, np.insert(values, starts, self.eos_id)])
        whole = len(stream) // self.max_length * self.max_length
        self.carry = stream[whole:]
        return stream[:whole].reshape(-1, self.max_length)


def packed_stream(batches: Iterator, max_length: int, eos_id: int) -> Iterator:
    """Blocks of rows (pyarrow list arrays) of exactly max_length tokens; the last row of
    the last block holds the rest. `batches` yields pyarrow list arrays of token ids, in
    corpus order; the tail of each batch carries into the next, so the cut does not
    depend on the batching.
    """
    import numpy as np
    import pyarrow as pa

    packer = Packer(max_length, eos_id)
    for docs in batches:
        rows = packer.add(docs)
        if len(rows):
            offsets = np.arange(len(rows) + 1, dtype=np.int32) * max_length
            yield pa.ListArray.from_arrays(offsets, rows.reshape(-1))
    if len(packer.carry):
        yield pa.array([packer.carry], pa.list_(pa.int32()))


def pack(tokenized, max_length: int, eos_id: int, staging: Path):
    """A Dataset of packed `input_ids` rows (see the module docstring), written to one
    Arrow file block by block and memory-mapped back (`Dataset.from_file`)."""
    import pyarrow as pa
    from datasets import Dataset

    def batches():
        for table in tokenized.select_columns(["input_ids"]).with_format("arrow").iter(4096):
            yield table.column("input_ids")

    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    path = staging / "packed.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for block in packed_stream(batches(), max_length, eos_id):
            writer.write_table(pa.Table.from_arrays([block], schema=schema))
    return Dataset.from_file(str(path))


# ---------------------------------------------------------------------------
# Naming a bad row


def locate_bad_row(files: list[Path], cfg: DataConfig) -> None:
    """Raise a UserError naming the first bad file and line, reading line by line."""

    fields = [cfg.source_field, cfg.target_field] if cfg.conditional else [cfg.text_field]
    for file in files:
        for number, line in _lines(file):
            if file.suffix != ".jsonl" or not line.strip():
                continue
            where = f"{file}, line {number}"
            record = jsonl_object(line, where)
            for name in fields:
                if name not in record or record[name] is None:
                    raise UserError(f"{where}: missing field '{name}'.")
                if not isinstance(record[name], str):
                    kind = type(record[name]).__name__
                    raise UserError(f"{where}: field '{name}' must be a string, not {kind}.")


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    offset = 0
    with open(file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{file} is not UTF-8 text (byte {offset + e.start}).") from None
            offset += len(raw)
