"""The JSONL layout of a sample run directory (docs/evaluation.md, "Sample run directories").

A sample run directory holds:

* ``samples.jsonl`` - one object per line: ``id``, ``text``, ``tokens`` (optional),
  ``condition``, ``reference``, ``seed``, ``meta``. Readers also accept the official
  PyTorch port's rows ``{"id", "generated"}``.
* ``run.json`` - what produced the samples.
* ``metrics.jsonl`` - one line appended per scoring run.

Every whole file is written to a temporary name in the same directory and renamed
when complete, so a crash never leaves a half-written file that looks finished.
``metrics.jsonl`` is append-only: each record is one ``write`` of one full line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from elfctl.errors import UserError
from elfctl.version import __version__

# The process umask, read once: mkstemp creates files 0600, and we want the permissions
# a plain open() would have given.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"

# The fields of one of our sample rows, in the order we write them.
SAMPLE_FIELDS = ("id", "text", "tokens", "condition", "reference", "seed", "meta")
# Other producers' names for our fields (the official port writes "generated").
_FIELD_ALIASES = {"generated": "text"}


# ----------------------------------------------------------------------------- atomic files


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same directory + os.replace.

    Readers see either the old file or the complete new one, never a partial write.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave the temporary file behind, whatever went wrong.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON (plus a final newline), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """`torch.save(obj)` to `path`, atomically (serialised in memory: meant for small state)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Append `record` as one JSON line to `path` (an append-only log).

    The whole line goes out in a single write() on an O_APPEND descriptor, then fsync,
    so a crash leaves at worst a missing line, never a line mixed with another. If a
    previous crash left a final line without its newline, we start on a fresh line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size > 0:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


# ----------------------------------------------------------------------------- damaged state


@contextmanager
def reading_state(path: str | os.PathLike[str], fix: str) -> Iterator[None]:
    """Read run state from `path` in this block: a file that is missing, cut short or
    malformed becomes one sentence naming it, with `fix` (what the user can do)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - is_damage sorts them; the rest are re-raised
        if not is_damage(e):
            raise
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path} is missing; {fix}") from None
        raise UserError(f"{path} is damaged ({damage_reason(e)}); {fix}") from None


def read_json_state(path: str | os.PathLike[str], fix: str) -> dict[str, Any]:
    """A JSON object the program wrote (job.json, trainer.json, meta.json...), or a
    UserError naming the file and `fix` when it is missing, cut short or not an object."""
    with reading_state(path, fix):
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {fix}")
    return value


def is_damage(error: BaseException) -> bool:
    """An error that means a file is missing, cut short or not in its format.

    Matched by name where the type lives in an optional or heavy package (safetensors,
    yaml, torch), so this module imports none of them.
    """
    if isinstance(error, (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError)):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"SafetensorError", "YAMLError", "UnpicklingError"}:
        return True
    # torch.load of a file cut short: its zip reader finds no central directory.
    return isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)


def damage_reason(error: BaseException) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error.msg} at line {error.lineno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text at byte {error.start}"
    if isinstance(error, EOFError) or "PytorchStreamReader" in str(error):
        return "empty or cut short"
    names = {cls.__name__ for cls in type(error).__mro__}
    if "YAMLError" in names:
        return "not valid YAML"
    first = str(error).strip().splitlines()
    return first[0].rstrip(".") if first else type(error).__name__


# ----------------------------------------------------------------------------- samples


def sample_row(
    id: int,
    text: str,
    *,
    tokens: list[int] | None = None,
    condition: str | None = None,
    reference: str | None = None,
    seed: int | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of samples.jsonl in the standard layout (fields in the standard order)."""
    return {
        "id": id,
        "text": text,
        "tokens": None if tokens is None else [int(t) for t in tokens],
        "condition": condition,
        "reference": reference,
        "seed": seed,
        "meta": dict(meta) if meta else {},
    }


def samples_path(path: str | os.PathLike[str]) -> Path:
    """A samples file, or the samples.jsonl inside a sample run directory."""
    path = Path(path)
    return path / SAMPLES_FILE if path.is_dir() else path


def write_samples(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as JSONL (one JSON object per line), atomically.

    A `path` ending in .jsonl is the file itself; anything else is a sample run directory
    (created if needed) and the rows go to its samples.jsonl.
    """
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"sample row {i} is a {type(row).__name__}, not a dict")
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = Path(path)
    target = path if path.suffix == ".jsonl" and not path.is_dir() else path / SAMPLES_FILE
    return atomic_write_text(target, "".join(lines))


def _normalise_row(raw: dict[str, Any], where: str, position: int) -> dict[str, Any]:
    """Map one raw row (ours or the official port's) onto SAMPLE_FIELDS.

    Unknown keys are kept under `meta` so nothing the producer wrote is lost.
    """
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        name = _FIELD_ALIASES.get(key, key)
        if name in SAMPLE_FIELDS and name not in fields:
            fields[name] = value
        else:
            extra[key] = value

    text = fields.get("text")
    if text is None:
        raise UserError(f'{where}: the row has no "text" (or "generated") field.')
    if not isinstance(text, str):
        raise UserError(f'{where}: the "text" field is a {type(text).__name__}, not a string.')
    for name in ("condition", "reference"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise UserError(
                f'{where}: the "{name}" field is a {type(value).__name__}, not a string or null.'
            )
    tokens = fields.get("tokens")
    if tokens is not None and not (
        isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    ):
        raise UserError(f'{where}: the "tokens" field is not a list of integers.')
    meta = fields.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise UserError(f'{where}: the "meta" field is a {type(meta).__name__}, not an object.')
    meta = {**meta, **extra}

    return {
        "id": fields.get("id", position),
        "text": text,
        "tokens": tokens,
        "condition": fields.get("condition"),
        "reference": fields.get("reference"),
        "seed": fields.get("seed"),
        "meta": meta,
    }


def read_samples(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a samples file (or a run directory's samples.jsonl) into normalised rows.

    Every row gets all of SAMPLE_FIELDS (missing ones are None, `meta` is {}; a missing
    `id` is the row's position). Blank lines are skipped. Malformed JSON, a line that is
    not an object, or a row without text raises UserError naming the file and line.
    """
    return [row for _, row in read_samples_with_lines(path)]


def read_samples_with_lines(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """Like read_samples, but each row comes with its 1-based line number in the file
    (so later checks, e.g. a missing reference, can name the line)."""
    path = samples_path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such samples file.")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    rows = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg}, column {e.colno}).") from None
        if not isinstance(raw, dict):
            raise UserError(f"{where}: expected a JSON object, got a {type(raw).__name__}.")
        rows.append((line_number, _normalise_row(raw, where, position=len(rows))))
    return rows


# ----------------------------------------------------------------------------- run.json


def write_run_json(directory: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write `info` (what produced the samples) as run.json in `directory`, atomically."""
    return atomic_write_json(Path(directory) / RUN_FILE, info)


def read_run_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object.")
    return info


# ----------------------------------------------------------------------------- metrics.jsonl


def append_metrics(directory: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Append `record` as one line to `directory`/metrics.jsonl (see `append_jsonl`)."""
    return append_jsonl(Path(directory) / METRICS_FILE, record)


def read_metrics(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of `directory`/metrics.jsonl (an empty list if there is none).

    The file is an append-only log: a line left unfinished by a crash (not valid JSON,
    or not an object) is skipped rather than making the whole history unreadable.
    """
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metrics_record(
    file: str | os.PathLike[str],
    metric: str,
    values: dict[str, Any],
    *,
    scorer: str,
    n: int,
    **settings: Any,
) -> dict[str, Any]:
    """One metrics.jsonl line: file, metric, values, scorer, n, time, plus scoring settings.

    Non-finite floats (e.g. the perplexity of a file of empty samples) become null so
    the line stays valid JSON.
    """
    from datetime import datetime, timezone

    return {
        "file": str(file),
        "metric": metric,
        "values": _json_safe(values),
        "scorer": scorer,
        "n": n,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elfctl_version": __version__,
        **_json_safe(settings),
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
