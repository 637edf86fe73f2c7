"""`elfctl sample` end to end on a tiny checkpoint and a local tokenizer folder."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from elfctl.cli import app
from tests.conftest import build_word_tokenizer
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()


def setup_checkpoint(tmp_path):
    tok_dir = tmp_path / "tok"
    tok = build_word_tokenizer(tok_dir)
    ckpt = write_official(
        tmp_path / "checkpoint_300", official_state(0, scale=1.0, V=len(tok)), step=300
    )
    return ckpt, tok_dir


def sample(*args):
    result = runner.invoke(app, ["sample", *map(str, args)])
    return result


def test_sample_writes_samples_and_run_json_and_is_reproducible(tmp_path):
    ckpt, tok = setup_checkpoint(tmp_path)
    common = [
        "--repo",
        ckpt,
        "--tokenizer",
        tok,
        "--num-samples",
        5,
        "--batch-size",
        2,
        "--length",
        8,
        "--steps",
        4,
        "--seed",
        3,
    ]
    first = sample(*common, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        assert set(row) >= {"id", "text", "tokens", "condition", "reference", "seed", "meta"}
        assert row["seed"] == 3 and row["condition"] is None and len(row["tokens"]) <= 8
    info = json.loads((tmp_path / "a" / "run.json").read_text())
    assert info["checkpoint"]["step"] == 300 and len(info["checkpoint"]["sha256"]) == 64
    assert info["sampler"] == {
        "method": "sde",
        "steps": 4,
        "gamma": 1.5,
        "cfg": 1.0,
        "sc_cfg": 3.0,
        "time_schedule": "logit_normal",
        "noise_scale": 2.0,
        "setting": "sde-32",
    }
    assert info["num_samples"] == 5 and info["seed"] == 3 and info["samples_per_s"] > 0

    second = sample(*common, "--out", tmp_path / "b")
    assert second.exit_code == 0, second.output
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (
        tmp_path / "b" / "samples.jsonl"
    ).read_text()
    texts = [r["text"] for r in rows]
    assert len(set(texts)) > 1  # the weights are random enough for samples to differ

    other = sample(*common[:-1], 4, "--out", tmp_path / "c")
    assert other.exit_code == 0, other.output
    assert (tmp_path / "c" / "samples.jsonl").read_text() != (
        tmp_path / "a" / "samples.jsonl"
    ).read_text()


def test_sample_refuses_to_overwrite_without_force(tmp_path):
    ckpt, tok = setup_checkpoint(tmp_path)
    args = [
        "--repo",
        ckpt,
        "--tokenizer",
        tok,
        "--num-samples",
        2,
        "--length",
        4,
        "--steps",
        2,
        "--out",
        tmp_path / "a",
    ]
    assert sample(*args).exit_code == 0
    before = (tmp_path / "a" / "samples.jsonl").read_text()
    again = sample(*args, "--seed", 9)
    assert again.exit_code == 2 and "--force" in again.output
    assert (tmp_path / "a" / "samples.jsonl").read_text() == before
    assert sample(*args, "--seed", 9, "--force").exit_code == 0


def test_sample_flags_override_the_preset_settings(tmp_path):
    ckpt, tok = setup_checkpoint(tmp_path)
    result = sample(
        "--repo",
        ckpt,
        "--tokenizer",
        tok,
        "--num-samples",
        2,
        "--length",
        4,
        "--steps",
        3,
        "--sampler",
        "ode",
        "--time-schedule",
        "uniform",
        "--sc-cfg",
        1.5,
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "o" / "run.json").read_text())
    assert info["sampler"]["method"] == "ode" and info["sampler"]["time_schedule"] == "uniform"
    assert info["sampler"]["sc_cfg"] == 1.5 and info["sampler"]["steps"] == 3


def test_sample_bad_input_is_one_sentence_and_exit_2(tmp_path):
    ckpt, tok = setup_checkpoint(tmp_path)
    missing = sample("--repo", tmp_path / "nothing", "--tokenizer", tok, "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "not found" in missing.output
    assert "Traceback" not in missing.output
    other_tok = build_word_tokenizer(tmp_path / "tok2", words=["only", "three", "words"])
    mismatch = sample("--repo", ckpt, "--tokenizer", tmp_path / "tok2", "--out", tmp_path / "y")
    assert mismatch.exit_code == 2 and "vocabulary" in mismatch.output
    assert len(other_tok) == 6
    bad_preset = sample("--repo", ckpt, "--preset", "owt-q", "--out", tmp_path / "z")
    assert bad_preset.exit_code == 2 and "Unknown preset 'owt-q'" in bad_preset.output
    bad_sampler = sample("--repo", ckpt, "--sampler", "euler", "--out", tmp_path / "w")
    assert bad_sampler.exit_code == 2
