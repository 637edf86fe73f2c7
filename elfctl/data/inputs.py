"""Conditioning inputs: the sources of conditional sampling, read from files or datasets.

`read_condition_inputs` turns what the user gives `elfctl sample --input` into source texts (and
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
the model, and re-tokenizing the text need not give them back, so `read_condition_rows` keeps
a row's `condition_input_ids` and encoding uses them as they are; only rows without them
(files, datasets without the column) are tokenized from their text.
Encoding them for the model is `elfctl.sampling.conditions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from elfctl.data.jsonl import jsonl_objects, read_text
from elfctl.data.rows import (
    dataset_snapshot,
    is_save_to_disk_folder,
    load_dataset_or_none,
    load_hub_rows,
    save_to_disk_root,
)
from elfctl.errors import UserError
from elfctl.testbed.assets import resolve_testbed_uri

# Splits tried, in order, when a dataset has several and none was named.
PREFERRED_SPLITS = ("validation", "test")

# The column of pre-tokenized conditions in the official datasets (docs/method.md section 2).
CONDITION_IDS = "condition_input_ids"


@dataclass
class ConditionInputs:
    """Sources in input order: their text, references (None where unknown) and, per row,
    the dataset's own condition token ids (None where the row has none)."""

    texts: list[str]
    references: list[str | None]
    token_ids: list[list[int] | None]


# ---------------------------------------------------------------------------
# Reading sources


def read_condition_inputs(
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
    rows = read_condition_rows(input, source_field, reference_field, split, limit, option)
    return rows.texts, rows.references


def check_input_exists(input: str, option: str = "--input") -> None:
    """A local input that does not exist is an error before anything heavy is loaded."""
    if input.startswith("testbed:"):
        return
    if not Path(input).expanduser().exists() and _looks_like_local_path(input):
        raise UserError(f"{option} not found: {input}.")


def read_condition_rows(
    input: str,
    source_field: str = "input",
    reference_field: str = "target",
    split: str | None = None,
    limit: int | None = None,
    option: str = "--input",
) -> ConditionInputs:
    """`read_condition_inputs`, plus each dataset row's `condition_input_ids` where it has them."""
    check_input_exists(input, option)
    if input.startswith("testbed:"):
        path = Path(resolve_testbed_uri(input))
    else:
        path = Path(input).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            pairs = read_jsonl_inputs(path, source_field, reference_field, limit)
        elif path.suffix == ".txt":
            pairs = [(line, None) for line in read_txt_inputs(path)][:limit]
        else:
            raise UserError(
                f"Unsupported {option} file {path}: expected .jsonl, .txt, a save_to_disk folder "
                "or a hub dataset."
            )
        triples = [(source, reference, None) for source, reference in pairs]
    elif path.is_dir() and is_save_to_disk_folder(path):
        rows = _load_disk(path, split)
        triples = dataset_inputs(rows, str(path), source_field, reference_field, limit)
    else:
        rows = _load_hub(input if not path.is_dir() else str(path), split)
        triples = dataset_inputs(rows, input, source_field, reference_field, limit)
    if not triples:
        what = "sources" if option == "--input" else "texts"
        raise UserError(f"{option} {input} holds no {what}.")
    texts, references, token_ids = (list(column) for column in zip(*triples, strict=True))
    return ConditionInputs(texts, references, token_ids)


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name" without a file extension.
    return (
        name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).suffix != ""
    )


def read_txt_inputs(file: Path) -> list[str]:
    """One source per non-blank line (surrounding whitespace stripped)."""
    return [line.strip() for line in read_text(file).splitlines() if line.strip()]


def read_jsonl_inputs(
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


def dataset_inputs(
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
