"""Every check happens before any work or write, and what the commands print is true.

Each case here was accepted, or refused only after sampling or writing, before these
checks moved to the front: a bad flag is one sentence and exit 2 with nothing written.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.errors import UserError
from elfctl.sampling import parse_prompt, parse_template
from tests.conftest import build_word_tokenizer
from tests.test_cli_prompting import random_checkpoint
from tests.test_eval import scorer_dir, unconditional  # noqa: F401 (fixtures)
from tests.test_streaming import SMALL as STREAM_SMALL

runner = CliRunner()
SMALL = [s for s in STREAM_SMALL if not s.startswith("data.streaming")]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_sentence(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


# ----------------------------------------------------------------------------- eval, sweep


def test_eval_with_a_missing_scorer_fails_before_sampling(tmp_path, unconditional):  # noqa: F811
    ckpt, config_file = unconditional
    out = tmp_path / "o"
    args = ["--config", config_file, "--repo", ckpt, "--scorer", "./missing", "--out", out]
    result = invoke("eval", *args, "--cpu")
    one_sentence(result, "the folder ./missing does not exist")
    assert not out.exists()


def test_eval_with_an_unknown_testbed_scorer_fails_before_sampling(tmp_path, unconditional):  # noqa: F811
    ckpt, config_file = unconditional
    out = tmp_path / "o"
    args = ["--config", config_file, "--repo", ckpt, "--scorer", "testbed:nope/scorer"]
    one_sentence(invoke("eval", *args, "--out", out, "--cpu"), "testbed:grammar/scorer")
    assert not out.exists()


@pytest.mark.parametrize(
    "command, option, text",
    [("sweep", "--steps", "8,,16"), ("eval", "--seeds", "0,,1"), ("sweep", "--seeds", "0,,1")],
)
def test_lists_with_an_empty_entry_are_refused_with_one_message(tmp_path, command, option, text):
    args = ["--repo", tmp_path / "missing", "--out", tmp_path / "o", option, text]
    if command == "eval":
        args += ["--preset", "tiny"]
    result = invoke(command, *args)
    kind = "integers of at least 1" if option == "--steps" else "non-negative integers"
    one_sentence(result, f"{option} must be distinct {kind} separated by commas, got '{text}'.")
    assert not (tmp_path / "o").exists()


def test_eval_without_preset_or_config_uses_the_runs_own_config(tmp_path, tiny_ckpt, monkeypatch):
    from tests.gpt2_fixture import build_tiny_gpt2

    scorer = build_tiny_gpt2(tmp_path / "gpt2")
    # The test bed's scorer is trained on first use; a tiny GPT-2 stands in for it here.
    monkeypatch.setattr("elfctl.scoring.files.ensure_grammar_scorer", lambda: str(scorer))
    out = tmp_path / "eval"
    result = invoke("eval", "--repo", tiny_ckpt, "--cpu", "--num-samples", 2, "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())
    assert summary["preset"] == "tiny" and [r["setting"] for r in summary["rows"]] == ["sde-32"]
    # the embedded default scores itself offline with the test bed's scorer
    assert summary["scorer"] == "testbed:grammar/scorer"
    (record,) = records.read_metrics(out / "sde-32")
    assert record["scorer"] == "testbed:grammar/scorer" and record["values"]["ppl"] > 1


def test_score_ppl_on_testbed_samples_defaults_to_the_testbed_scorer(
    tmp_path, tiny_ckpt, monkeypatch
):
    from tests.gpt2_fixture import build_tiny_gpt2

    scorer = build_tiny_gpt2(tmp_path / "gpt2")
    monkeypatch.setattr("elfctl.scoring.files.ensure_grammar_scorer", lambda: str(scorer))
    out = tmp_path / "s"
    args = ["--repo", tiny_ckpt, "--num-samples", 2, "--steps", 2, "--cpu", "--out", out]
    assert invoke("sample", *args).exit_code == 0
    result = invoke("score-ppl", out, "--cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["scorer"] == "testbed:grammar/scorer"


def test_sweep_of_a_testbed_model_defaults_to_the_testbed_scorer(tmp_path, tiny_ckpt, monkeypatch):
    from tests.gpt2_fixture import build_tiny_gpt2

    scorer = build_tiny_gpt2(tmp_path / "gpt2")
    monkeypatch.setattr("elfctl.scoring.files.ensure_grammar_scorer", lambda: str(scorer))
    out = tmp_path / "sw"
    args = ["--repo", tiny_ckpt, "--steps", 1, "--num-samples", 2, "--cpu", "--out", out]
    result = invoke("sweep", *args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sweep.json").read_text())["scorer"] == "testbed:grammar/scorer"


def test_the_tiny_preset_names_the_testbed_scorer_and_official_presets_keep_gpt2_large():
    from elfctl.config import default_scorer, resolve

    assert default_scorer(resolve("tiny")) == "testbed:grammar/scorer"
    for preset in ("owt-b", "xsum-b", "de-en-b", "owt-m"):
        assert default_scorer(resolve(preset)) == "gpt2-large"


def test_a_config_naming_an_unknown_testbed_scorer_is_refused():
    from elfctl.config import resolve

    with pytest.raises(UserError, match="eval.scorer"):
        resolve("tiny", sets=["eval.scorer=testbed:grammar/nothing"])


# ----------------------------------------------------------------------------- sample


def test_sample_force_drops_the_old_runs_metrics(tmp_path, tiny_ckpt):
    out = tmp_path / "s"
    args = ["--repo", tiny_ckpt, "--num-samples", 2, "--steps", 2, "--cpu", "--out", out]
    assert invoke("sample", *args).exit_code == 0
    records.append_metrics(out, {"metric": "gen_ppl", "values": {"ppl": 1.0}})
    assert invoke("sample", *args, "--seed", 1, "--force").exit_code == 0
    assert not (out / records.METRICS_FILE).exists()


def test_sample_takes_a_local_encoder_beside_the_tokenizer(tmp_path, tiny_ckpt):
    from elfctl.testbed.assets import resolve_testbed_uri

    encoder = resolve_testbed_uri("testbed:grammar/encoder")
    common = ["--repo", tiny_ckpt, "--num-samples", 2, "--steps", 2, "--cpu", "--prompt", "the dog"]
    named = invoke("sample", *common, "--encoder", encoder, "--out", tmp_path / "a")
    plain = invoke("sample", *common, "--out", tmp_path / "b")
    assert named.exit_code == 0 and plain.exit_code == 0, named.output + plain.output
    texts = [[r["text"] for r in records.read_samples(tmp_path / d)] for d in "ab"]
    assert texts[0] == texts[1]
    missing = invoke("sample", *common, "--encoder", tmp_path / "nope", "--out", tmp_path / "c")
    assert missing.exit_code == 2 and "nope" in missing.stderr
    assert not (tmp_path / "c").exists()


def test_prompt_words_the_tokenizer_does_not_know_are_refused_by_name(tmp_path):
    tokenizer = build_word_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="does not know 'zebra', 'okapi'"):
        parse_prompt(tokenizer, "the zebra and okapi")
    with pytest.raises(UserError, match="does not know 'zebra'"):
        parse_template(tokenizer, "the [gap:2] zebra")
    assert parse_prompt(tokenizer, "the dog").ids  # known words pass


def test_sample_refuses_an_unknown_prompt_word_before_writing(tmp_path, tiny_ckpt):
    out = tmp_path / "s"
    args = ["--repo", tiny_ckpt, "--num-samples", 2, "--cpu", "--prompt", "the zebra"]
    one_sentence(invoke("sample", *args, "--out", out), "'zebra'")
    assert not out.exists()


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.max_length=0"], "Config key 'data.max_length' must be at least 2"),
        (["--set", "train.global_batch=0"], "Config key 'train.global_batch' must be at least 1"),
        (["--set", "sampling.0.steps=0"], "Config key 'sampling[0].steps' must be at least 1"),
        (["--init-weights", "raw"], "add --init SOURCE"),
        (["--mixed-precision", "fp16"], "--mixed-precision must be no or bf16, got 'fp16'."),
    ],
)
def test_train_refuses_before_writing_the_run_dir(tmp_path, args, message):
    run = tmp_path / "run"
    result = invoke("train", "--preset", "tiny", "--run-dir", run, "--cpu", *args)
    one_sentence(result, message)
    assert not run.exists()


def test_a_run_the_time_cap_stops_says_so_and_how_to_go_on(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--run-dir", run, "--cpu", "--max-steps", 50]
    sets = [x for s in SMALL for x in ("--set", s)] + ["--set", "train.max_minutes=0.0001"]
    result = invoke(*args, *sets)
    assert result.exit_code == 0, result.output
    assert "stopped at step 1 of 50 in" in result.stderr
    assert "train.max_minutes=0.0001 stopped it: run the same command again" in result.stderr


def test_train_on_a_finished_run_says_so_instead_of_a_zero_loss(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--run-dir", run, "--cpu", "--max-steps", 2]
    sets = [x for s in SMALL for x in ("--set", s)]
    first = invoke(*args, *sets)
    assert first.exit_code == 0, first.output
    assert "done: step 2" in first.stderr and "loss" in first.stderr
    assert "x 1 processes x" in first.stderr  # the start-up line counts the processes
    again = invoke(*args, *sets)
    assert again.exit_code == 0, again.output
    assert "already finished: step 2" in again.stderr and "0.0000" not in again.stderr


# ----------------------------------------------------------------------------- convert


def test_convert_jax_compare_with_a_missing_folder_fails_before_writing(tmp_path):
    src = tmp_path / "t5.pkl"
    src.write_bytes(b"not read: the check comes first")
    dst = tmp_path / "out"
    result = invoke("convert-jax", src, dst, "--encoder", "--compare", "./missing")
    one_sentence(result, "--compare ./missing: no such folder")
    assert not dst.exists()


def test_a_config_file_is_checked_as_the_presets_are(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"hidden_size": 30, "num_heads": 4}}))
    run = tmp_path / "run"
    result = invoke("train", "--config", bad, "--run-dir", run, "--cpu")
    one_sentence(result, "must be a multiple of model.num_heads")
    assert not run.exists()
