"""Collation masks, corpora and the resumable sampler (docs/method.md section 2).

Every source is loaded through the real code path (`load_from_disk`,
`load_dataset`, `AutoTokenizer.from_pretrained`) on folders built here.
"""

from __future__ import annotations

import json

import pytest
import torch

from elfctl.config import DataConfig
from elfctl.data import (
    Collator,
    EpochShuffler,
    collate,
    is_save_to_disk_metadata,
    load_dataset_or_none,
    load_hub_rows,
    load_rows,
)
from elfctl.errors import UserError
from tests.conftest import build_word_tokenizer

# build_word_tokenizer's ids: <pad> 0, </s> 1, <unk> 2, the 3, a 4, cat 5, dog 6, bird 7,
# sees 8, chases 9, sleeps 10, runs 11, big 12, small 13, red 14, . 15, , 16, and 17


def bits(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


# ---------------------------------------------------------------------------
# Collation

MIXED_ROWS = [
    {"condition_input_ids": [11, 12], "input_ids": [21, 22]},
    {"condition_input_ids": [11, 12, 13, 14], "input_ids": [21, 22, 23, 24]},  # cut twice
    {"input_ids": [21]},  # no condition at all
]


def test_collate_pad_style_builds_masks_by_hand():
    batch = collate(MIXED_ROWS, max_length=6, max_input_length=3, pad_token="pad")
    expected_ids = [[11, 12, 21, 22, 0, 0], [11, 12, 13, 21, 22, 23], [21, 0, 0, 0, 0, 0]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids))
    assert torch.equal(batch["attention_mask"], bits("111100", "111111", "100000"))
    assert torch.equal(batch["cond_seq_mask"], bits("110000", "111000", "000000"))
    # pad style: the loss covers target tokens only
    assert torch.equal(batch["loss_mask"], bits("001100", "000111", "100000"))
    assert torch.equal(batch["cond_len"], torch.tensor([2, 3, 0]))
    assert torch.equal(batch["condition_truncated"], torch.tensor([False, True, False]))


def test_collate_eos_style_pads_with_eos_and_counts_padding_in_the_loss():
    batch = collate(MIXED_ROWS, max_length=6, max_input_length=3, pad_token="eos")
    expected_ids = [[11, 12, 21, 22, 1, 1], [11, 12, 13, 21, 22, 23], [21, 1, 1, 1, 1, 1]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids))
    # masks of real tokens are the same as with pad style...
    assert torch.equal(batch["attention_mask"], bits("111100", "111111", "100000"))
    assert torch.equal(batch["cond_seq_mask"], bits("110000", "111000", "000000"))
    # ...but the loss covers everything after the condition, padding included
    assert torch.equal(batch["loss_mask"], bits("001111", "000111", "111111"))


def test_collate_masks_are_bool_and_ids_long():
    batch = collate(MIXED_ROWS, max_length=6, max_input_length=3)
    assert batch["input_ids"].dtype == torch.long and batch["cond_len"].dtype == torch.long
    for name in ("attention_mask", "cond_seq_mask", "loss_mask", "condition_truncated"):
        assert batch[name].dtype == torch.bool


def test_collate_cuts_a_condition_longer_than_the_whole_sequence():
    rows = [{"condition_input_ids": [5, 6, 7], "input_ids": [8]}, {"input_ids": []}]
    batch = collate(rows, max_length=2, max_input_length=3, pad_token="eos")
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6], [1, 1]]))
    assert torch.equal(batch["cond_len"], torch.tensor([2, 0]))
    assert torch.equal(batch["attention_mask"], bits("11", "00"))
    assert torch.equal(batch["loss_mask"], bits("00", "11"))


def test_collator_takes_pad_and_eos_ids_from_the_tokenizer(tmp_path):
    tokenizer = build_word_tokenizer(tmp_path / "tok")
    cfg = DataConfig(max_length=4, max_input_length=0, pad_token="eos")
    batch = Collator.for_tokenizer(cfg, tokenizer)([{"input_ids": [5, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, tokenizer.eos_token_id, tokenizer.eos_token_id]]
    assert tokenizer.eos_token_id == 1


# ---------------------------------------------------------------------------
# Raw text corpora


@pytest.fixture
def tokenizer(tmp_path):
    return build_word_tokenizer(tmp_path / "tokenizer")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_folder_gives_one_example_per_non_empty_line(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("the cat sleeps .\n\n   \na dog runs .\n")
    (folder / "sub" / "c.txt").write_text("big red bird\n")
    (folder / "notes.md").write_text("ignored")
    rows = load_rows(str(folder), DataConfig(), tokenizer)
    # files in sorted path order; no special tokens (no eos 1) appended
    assert rows["input_ids"] == [[3, 5, 10, 15], [4, 6, 11, 15], [12, 14, 7]]
    assert rows["target"] == ["the cat sleeps .", "a dog runs .", "big red bird"]
    assert "condition_input_ids" not in rows.column_names


def test_txt_file_mode_gives_one_example_per_file(tmp_path, tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sleeps .\na dog runs .\n")
    (folder / "b.txt").write_text("big bird\n")
    rows = load_rows(str(folder), DataConfig(), tokenizer, text_mode="file")
    assert rows["input_ids"] == [[3, 5, 10, 15, 4, 6, 11, 15], [12, 7]]


def test_jsonl_text_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "the dog"}, {"body": "cat", "x": 1}])
    rows = load_rows(str(path), DataConfig(text_field="body"), tokenizer)
    assert rows["input_ids"] == [[3, 6], [5]]


def test_jsonl_pairs_become_condition_and_target(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"src": "the cat", "tgt": "a dog ."}, {"src": "big", "tgt": "red bird"}],
    )
    cfg = DataConfig(conditional=True, source_field="src", target_field="tgt")
    rows = load_rows(str(path), cfg, tokenizer)
    assert rows["condition_input_ids"] == [[3, 5], [12]]
    assert rows["input_ids"] == [[4, 6, 15], [14, 7]]
    assert rows["input"] == ["the cat", "big"]
    assert rows["target"] == ["a dog .", "red bird"]


@pytest.mark.parametrize(
    "bad_line, complaint",
    [
        ('{"text": "the cat"', "not valid JSON"),
        ('["the cat"]', "expected a JSON object"),
        ('{"other": "the cat"}', "missing field 'text'"),
        ('{"text": 3}', "field 'text' must be a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer, bad_line, complaint):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the dog"}\n\n' + bad_line + "\n")
    with pytest.raises(UserError, match=rf"bad\.jsonl, line 3: {complaint}"):
        load_rows(str(path), DataConfig(), tokenizer)


def test_plain_text_cannot_be_conditional(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the cat\n")
    with pytest.raises(UserError, match="conditional data needs .jsonl"):
        load_rows(str(tmp_path / "a.txt"), DataConfig(conditional=True), tokenizer)


@pytest.mark.parametrize("corpus", ["./missing.jsonl", "/no/such/folder", "data.txt"])
def test_missing_local_paths_are_not_found(corpus, tokenizer):
    with pytest.raises(UserError, match="not found"):
        load_rows(corpus, DataConfig(), tokenizer)


def test_unusable_local_paths_are_user_errors(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt or .jsonl files"):
        load_rows(str(tmp_path / "empty"), DataConfig(), tokenizer)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="Unsupported data file"):
        load_rows(str(tmp_path / "table.csv"), DataConfig(), tokenizer)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no text examples"):
        load_rows(str(tmp_path / "blank.txt"), DataConfig(), tokenizer)


# ---------------------------------------------------------------------------
# save_to_disk folders, local and from the hub

COLUMNS = {
    "condition_input_ids": [[5, 6], [7]],
    "input_ids": [[8, 9, 10], [11]],
    "input": ["x y", "z"],
    "target": ["a b c", "d"],
}


def test_save_to_disk_folder_loads_a_dataset_or_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    data = Dataset.from_dict(COLUMNS)
    data.save_to_disk(str(tmp_path / "single"))
    rows = load_rows(str(tmp_path / "single"), DataConfig(conditional=True), None, split="any")
    assert rows["input_ids"] == COLUMNS["input_ids"]

    DatasetDict({"train": data, "validation": data.select([1])}).save_to_disk(
        str(tmp_path / "dict")
    )
    rows = load_rows(str(tmp_path / "dict"), DataConfig(), None, split="validation")
    assert rows["input_ids"] == [[11]] and rows["target"] == ["d"]
    with pytest.raises(UserError, match="no split 'test'"):
        load_rows(str(tmp_path / "dict"), DataConfig(), None, split="test")


def test_rows_without_the_needed_columns_are_user_errors(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[1, 2]]}).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(UserError, match="no column 'condition_input_ids'"):
        load_rows(str(tmp_path / "plain"), DataConfig(conditional=True), None)
    Dataset.from_dict({"tokens": [[1, 2]]}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(UserError, match="no column 'input_ids'"):
        load_rows(str(tmp_path / "odd"), DataConfig(), None)


def test_save_to_disk_metadata_row_is_detected(tmp_path):
    from datasets import Dataset, load_dataset

    Dataset.from_dict(COLUMNS).save_to_disk(str(tmp_path / "saved"))
    # `load_dataset` reading a save_to_disk folder's state.json as data: the hub's shape
    metadata = load_dataset("json", data_files=str(tmp_path / "saved" / "state.json"))["train"]
    assert len(metadata) == 1 and "_fingerprint" in metadata.column_names
    assert is_save_to_disk_metadata(metadata)
    assert not is_save_to_disk_metadata(Dataset.from_dict(COLUMNS))
    assert not is_save_to_disk_metadata(Dataset.from_dict({"_id": [1], "text": ["a"]}))


def test_hub_style_folder_of_save_to_disk_metadata_falls_back_to_load_from_disk(tmp_path):
    from datasets import Dataset, load_dataset

    # A repo whose json files make `load_dataset` read save_to_disk bookkeeping as rows.
    repo = tmp_path / "repo"
    Dataset.from_dict(COLUMNS).save_to_disk(str(repo / "saved"))
    (repo / "card.json").write_text((repo / "saved" / "state.json").read_text())
    assert is_save_to_disk_metadata(load_dataset(str(repo), split="train"))
    rows = load_hub_rows(str(repo), "train")
    assert rows["input_ids"] == COLUMNS["input_ids"]
    assert rows["condition_input_ids"] == COLUMNS["condition_input_ids"]


def test_save_to_disk_layouts_are_told_apart_from_real_data_with_or_without_a_split(tmp_path):
    from datasets import Dataset

    # Real data: every split, or the named one. save_to_disk bookkeeping or a refused
    # save_to_disk folder: None, so the caller loads the snapshot with load_from_disk.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a cat"}\n{"text": "a dog"}\n')
    assert load_dataset_or_none(str(data))["train"]["text"] == ["a cat", "a dog"]
    assert load_dataset_or_none(str(data), "train")["text"] == ["a cat", "a dog"]
    repo = tmp_path / "repo"
    Dataset.from_dict(COLUMNS).save_to_disk(str(repo / "saved"))
    (repo / "card.json").write_text((repo / "saved" / "state.json").read_text())
    assert load_dataset_or_none(str(repo)) is None
    assert load_dataset_or_none(str(repo), "train") is None
    assert load_dataset_or_none(str(repo / "saved")) is None


def test_local_save_to_disk_folder_given_as_a_hub_id_loads(tmp_path):
    from datasets import Dataset

    # datasets refuses such a folder with a ValueError naming save_to_disk: same fallback
    Dataset.from_dict(COLUMNS).save_to_disk(str(tmp_path / "saved"))
    assert load_hub_rows(str(tmp_path / "saved"), "train")["target"] == COLUMNS["target"]


@pytest.mark.slow
def test_testbed_uri_loads_the_test_bed_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("ELFCTL_CACHE", str(tmp_path / "cache"))
    cfg = DataConfig(conditional=True)
    rows = load_rows("testbed:translate/validation", cfg, None, split="validation")
    assert len(rows) > 0
    assert {"input_ids", "condition_input_ids"} <= set(rows.column_names)


# ---------------------------------------------------------------------------
# EpochShuffler


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffler(50, seed=7), EpochShuffler(50, seed=7)
    assert a.epoch_indices(3) == b.epoch_indices(3)
    assert sorted(a.epoch_indices(0)) == list(range(50))
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) != EpochShuffler(50, seed=8).epoch_indices(0)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + 3)).tolist()
    assert a.epoch_indices(3) == expected


@pytest.mark.parametrize("n_rows", [12, 14])
def test_shards_are_disjoint_equal_and_cover_the_permutation(n_rows):
    world = 4
    shards = [EpochShuffler(n_rows, seed=1, rank=r, world_size=world) for r in range(world)]
    for epoch in range(3):
        parts = [s.epoch_indices(epoch) for s in shards]
        assert all(len(p) == n_rows // world for p in parts)
        joined = [i for p in parts for i in p]
        assert len(set(joined)) == len(joined)  # disjoint
        permutation = EpochShuffler(n_rows, seed=1).epoch_indices(epoch)
        used = (n_rows // world) * world
        assert set(joined) == set(permutation[:used])  # the whole epoch but the remainder


def test_resuming_batches_continues_the_same_order():
    shuffler = EpochShuffler(10, seed=3, rank=1, world_size=2)  # 5 rows per epoch here
    stream = shuffler.batches(batch_size=3)
    first = [next(stream) for _ in range(6)]  # 18 rows: crosses three epoch boundaries
    flat = [i for batch, _, _ in first for i in batch]
    expected = [i for e in range(4) for i in shuffler.epoch_indices(e)]
    assert flat == expected[:18]
    # resume from the point stored after the second batch
    _, epoch, position = first[1]
    assert (epoch, position) == (1, 1)
    resumed = shuffler.batches(batch_size=3, epoch=epoch, position=position)
    assert [next(resumed)[0] for _ in range(4)] == [batch for batch, _, _ in first[2:]]


def test_fewer_rows_than_processes_is_a_user_error():
    with pytest.raises(UserError, match="fewer than the 4 processes"):
        EpochShuffler(3, seed=0, rank=0, world_size=4)
