"""The JSONL layout: samples.jsonl, run.json, metrics.jsonl (docs/evaluation.md)."""

from __future__ import annotations

import json
import os

import pytest

from elfctl import records
from elfctl.errors import UserError


def test_samples_round_trip_keeps_every_field(tmp_path):
    rows = [
        records.sample_row(
            0,
            "the cat sat",
            tokens=[5, 6, 7],
            condition="die Katze",
            reference="the cat sat down",
            seed=11,
            meta={"steps": 32},
        ),
        records.sample_row(1, "", seed=12),
    ]
    path = records.write_samples(tmp_path / "samples.jsonl", rows)
    assert records.read_samples(path) == rows


def test_write_samples_writes_one_json_object_per_line(tmp_path):
    rows = [{"id": 0, "text": "a\nb"}, {"id": 1, "text": "ünïcode"}]
    path = records.write_samples(tmp_path / "s.jsonl", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_a_run_directory_stands_for_its_samples_file(tmp_path):
    records.write_samples(tmp_path, [{"id": 0, "text": "x"}])
    assert (tmp_path / records.SAMPLES_FILE).is_file()
    assert records.read_samples(tmp_path)[0]["text"] == "x"


def test_write_samples_to_a_new_path_without_jsonl_suffix_makes_a_run_directory(tmp_path):
    written = records.write_samples(tmp_path / "new_run", [{"id": 0, "text": "x"}])
    assert written == tmp_path / "new_run" / records.SAMPLES_FILE
    assert records.write_samples(tmp_path / "a.jsonl", []) == tmp_path / "a.jsonl"


def test_official_port_rows_are_read_as_text(tmp_path):
    path = tmp_path / "official.jsonl"
    path.write_text('{"id": 3, "generated": "hello world"}\n{"id": 4, "generated": ""}\n')
    rows = records.read_samples(path)
    assert [(r["id"], r["text"]) for r in rows] == [(3, "hello world"), (4, "")]
    assert rows[0]["reference"] is None and rows[0]["meta"] == {}


def test_missing_fields_are_filled_and_unknown_keys_kept_in_meta(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a", "score": 1.5, "meta": {"k": 1}}\n\n{"text": "b"}\n')
    first, second = records.read_samples(path)
    assert first == {
        "id": 0,
        "text": "a",
        "tokens": None,
        "condition": None,
        "reference": None,
        "seed": None,
        "meta": {"k": 1, "score": 1.5},
    }
    assert second["id"] == 1  # a missing id is the row's position, blank lines skipped


def test_read_samples_with_lines_reports_file_line_numbers(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [line for line, _ in records.read_samples_with_lines(path)] == [1, 3]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "a"', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": 1}', 'no "text"'),
        ('{"text": 5}', "not a string"),
        ('{"text": "a", "reference": 3}', '"reference"'),
        ('{"text": "a", "tokens": ["x"]}', '"tokens"'),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad_line + "\n")
    with pytest.raises(UserError) as err:
        records.read_samples(path)
    assert f"{path}, line 2" in str(err.value)
    assert message in str(err.value)


def test_missing_samples_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such samples file"):
        records.read_samples(tmp_path / "nope.jsonl")


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "out.txt"
    records.atomic_write_text(path, "old")
    records.atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~records._UMASK


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    records.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        records.atomic_write_json(path, {"a": object()})  # not JSON-serialisable
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["run.json"]


def test_run_json_round_trip(tmp_path):
    info = {"checkpoint": {"path": "x", "step": 3}, "sampler": {"steps": 32}}
    records.write_run_json(tmp_path, info)
    assert records.read_run_json(tmp_path) == info


def test_append_metrics_adds_one_line_per_record(tmp_path):
    records.append_metrics(tmp_path, {"metric": "gen_ppl", "value": 24.1})
    records.append_metrics(tmp_path, {"metric": "bleu", "value": 26.4})
    lines = (tmp_path / records.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["metric"] for line in lines] == ["gen_ppl", "bleu"]
    assert [r["value"] for r in records.read_metrics(tmp_path)] == [24.1, 26.4]


def test_append_after_a_crash_mid_line_starts_a_fresh_line(tmp_path):
    (tmp_path / records.METRICS_FILE).write_text('{"metric": "a"}\n{"metric": "tru')
    records.append_metrics(tmp_path, {"metric": "b"})
    assert [r["metric"] for r in records.read_metrics(tmp_path)] == ["a", "b"]
    content = (tmp_path / records.METRICS_FILE).read_text()
    assert content.splitlines()[1] == '{"metric": "tru'


def test_read_metrics_skips_crash_leftovers(tmp_path):
    path = tmp_path / records.METRICS_FILE
    path.write_text('{"metric": "a"}\n{"metric": "tru\n\n[1]\n{"metric": "b"}\n')
    assert records.read_metrics(tmp_path) == [{"metric": "a"}, {"metric": "b"}]
    assert records.read_metrics(tmp_path / "elsewhere") == []
