"""Training rows and conditioning inputs: reading, tokenizing, caching, packing, streaming."""

from __future__ import annotations

from elfctl.data.inputs import check_input_exists, read_condition_inputs, read_condition_rows
from elfctl.data.pipeline import MANIFEST, packed_stream
from elfctl.data.rows import (
    Collator,
    EpochShuffler,
    collate,
    is_save_to_disk_metadata,
    load_corpus,
    load_dataset_or_none,
    load_hub_rows,
    load_rows,
)
from elfctl.data.streamed_rows import RowStream, check_exact_resume

__all__ = [
    "Collator",
    "EpochShuffler",
    "MANIFEST",
    "RowStream",
    "check_exact_resume",
    "check_input_exists",
    "collate",
    "is_save_to_disk_metadata",
    "load_dataset_or_none",
    "load_hub_rows",
    "load_rows",
    "load_corpus",
    "packed_stream",
    "read_condition_rows",
    "read_condition_inputs",
]
