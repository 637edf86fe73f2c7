"""`elfctl score-ppl / score-bleu / score-rouge` end to end, with a tiny local GPT-2 scorer."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.scoring import metrics as scoring
from tests.gpt2_fixture import build_tiny_gpt2

runner = CliRunner()

ROWS = [
    {"id": 0, "text": "the cat sat on the mat .", "reference": "the cat sat on a mat ."},
    {"id": 1, "text": "a dog ran", "reference": "a dog ran after the ball"},
    {"id": 2, "text": "", "reference": "numbers like 12 appear"},
    {"id": 3, "text": "She said hello and left", "reference": "she said hello and left"},
]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("gpt2")))


def write_run(directory, rows):
    records.write_samples(directory, rows)
    return directory


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def metrics_files(root):
    return sorted(root.rglob(records.METRICS_FILE))


# ----------------------------------------------------------------------------- score-ppl


def test_score_ppl_json_matches_the_library_and_is_recorded_beside_the_input(tmp_path, scorer_dir):
    samples = write_run(tmp_path / "run", ROWS) / records.SAMPLES_FILE
    result = invoke("score-ppl", samples, "--model", scorer_dir, "--json", "--batch-size", 2)
    assert result.exit_code == 0, result.output

    printed = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert len(printed) == 1
    record = printed[0]
    model, tokenizer = scoring.load_scorer(scorer_dir)
    expected = scoring.score_ppl([r["text"] for r in ROWS], model, tokenizer)
    assert record["metric"] == "gen_ppl"
    assert record["file"] == str(samples.resolve())
    assert record["scorer"] == scorer_dir and record["n"] == 4
    assert record["values"]["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert record["values"]["entropy"] == pytest.approx(expected.entropy, rel=1e-12)
    assert (record["values"]["n_samples"], record["values"]["n_empty"]) == (3, 1)
    assert record["max_length"] == 1024 and record["dtype"] == "fp32"

    assert records.read_metrics(tmp_path / "run") == [record]


def test_score_ppl_table_names_each_file_relative_to_here(tmp_path, scorer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    result = invoke("score-ppl", "run", "--model", scorer_dir)
    assert result.exit_code == 0, result.output
    assert "run/samples.jsonl" in result.stdout
    ppl = records.read_metrics(tmp_path / "run")[0]["values"]["ppl"]
    assert f"{ppl:.2f}" in result.stdout
    assert "Gen PPL" in result.stderr  # the plain progress line, as in a log


def test_globs_and_run_dirs_score_each_file_separately_and_combined(tmp_path, scorer_dir):
    write_run(tmp_path / "run_a", ROWS[:2])
    write_run(tmp_path / "run_b", ROWS[2:])
    result = invoke("score-ppl", tmp_path / "run_*", "--model", scorer_dir, "--combined", "--json")
    assert result.exit_code == 0, result.output
    first, second, combined = json.loads(result.stdout)
    assert first["file"].endswith("run_a/samples.jsonl")
    assert second["file"].endswith("run_b/samples.jsonl")
    assert combined["file"] == "combined" and combined["n"] == 4
    assert combined["files"] == [first["file"], second["file"]]

    model, tokenizer = scoring.load_scorer(scorer_dir)
    together = scoring.score_ppl([r["text"] for r in ROWS], model, tokenizer)
    assert combined["values"]["ppl"] == pytest.approx(together.ppl, rel=1e-6)
    # one record beside each input; the combined record belongs to no single directory
    assert [len(records.read_metrics(tmp_path / d)) for d in ("run_a", "run_b")] == [1, 1]

    # a second glob over the same directories skips our own metrics.jsonl and run.json
    records.write_run_json(tmp_path / "run_a", {"seed": 0})
    again = invoke("score-ppl", tmp_path / "run_a" / "*", "--model", scorer_dir, "--json")
    assert again.exit_code == 0, again.output
    assert [r["file"] for r in json.loads(again.stdout)] == [first["file"]]


def test_eos_mode_official_is_recorded_and_refuses_to_combine_files(tmp_path, scorer_dir):
    write_run(tmp_path / "run_a", ROWS[:2])
    write_run(tmp_path / "run_b", ROWS[2:])
    result = invoke(
        "score-ppl", tmp_path / "run_a", "--model", scorer_dir, "--eos-mode", "official", "--json"
    )
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    model, tokenizer = scoring.load_scorer(scorer_dir)
    texts = [r["text"] for r in ROWS[:2]]
    expected = scoring.score_ppl(texts, model, tokenizer, eos_mode="official")
    assert record["eos_mode"] == "official"
    assert record["values"]["n_tokens"] == expected.n_tokens
    assert record["values"]["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    both = invoke(
        "score-ppl",
        tmp_path / "run_*",
        "--model",
        scorer_dir,
        "--eos-mode",
        "official",
        "--combined",
    )
    assert both.exit_code == 2 and "--combined needs --eos-mode ours" in both.stderr
    bad = invoke("score-ppl", tmp_path / "run_a", "--model", scorer_dir, "--eos-mode", "batch")
    assert bad.exit_code == 2 and "--eos-mode must be ours or official" in bad.stderr


def test_official_port_rows_are_scored(tmp_path, scorer_dir):
    path = tmp_path / "official.jsonl"
    path.write_text('{"id": 0, "generated": "the cat sat"}\n{"id": 1, "generated": ""}\n')
    result = invoke("score-ppl", path, "--model", scorer_dir, "--json")
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)[0]["values"]
    assert (values["n_samples"], values["n_empty"]) == (1, 1)


def test_all_empty_file_records_null_ppl(tmp_path, scorer_dir):
    write_run(tmp_path / "run", [{"id": 0, "text": ""}])
    result = invoke("score-ppl", tmp_path / "run", "--model", scorer_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["values"]["ppl"] is None


@pytest.mark.parametrize(
    "bad_line, message",
    [('{"id": 1, "text": "unterminated', "malformed JSON"), ('{"id": 1}', 'no "text"')],
)
def test_malformed_jsonl_exits_2_naming_file_and_line_and_writes_nothing(
    tmp_path, scorer_dir, bad_line, message
):
    write_run(tmp_path / "good", ROWS)  # scored first, yet must not be recorded either
    bad = tmp_path / "bad" / records.SAMPLES_FILE
    bad.parent.mkdir()
    bad.write_text('{"id": 0, "text": "fine"}\n' + bad_line + "\n")
    result = invoke("score-ppl", tmp_path / "good", bad, "--model", scorer_dir)
    assert result.exit_code == 2
    assert f"{bad}, line 2" in result.stderr and message in result.stderr
    assert "Traceback" not in result.output
    assert metrics_files(tmp_path) == []


def test_unmatched_glob_and_missing_file_exit_2(tmp_path, scorer_dir):
    result = invoke("score-ppl", tmp_path / "nothing*", "--model", scorer_dir)
    assert result.exit_code == 2 and "no samples file matches" in result.stderr
    result = invoke("score-ppl", tmp_path / "missing.jsonl", "--model", scorer_dir)
    assert result.exit_code == 2 and "no such file" in result.stderr
    (tmp_path / "empty_dir").mkdir()
    result = invoke("score-ppl", tmp_path / "empty_dir", "--model", scorer_dir)
    assert result.exit_code == 2 and "without a samples.jsonl" in result.stderr


def test_a_scorer_path_that_does_not_exist_says_so(tmp_path, monkeypatch):
    write_run(tmp_path / "run", ROWS)
    monkeypatch.chdir(tmp_path)
    result = invoke("score-ppl", "run", "--model", "./no-such-model")
    assert result.exit_code == 2
    assert "the folder ./no-such-model does not exist" in result.stderr
    assert "Repo id" not in result.stderr and "Traceback" not in result.stderr
    assert metrics_files(tmp_path) == []


def test_unloadable_scorer_exits_2(tmp_path):
    write_run(tmp_path / "run", ROWS)
    result = invoke("score-ppl", tmp_path / "run", "--model", tmp_path / "no-model")
    assert result.exit_code == 2 and "load the scorer model" in result.stderr
    assert metrics_files(tmp_path) == []


# ----------------------------------------------------------------------------- BLEU, ROUGE


def test_score_bleu_records_sacrebleu_corpus_bleu(tmp_path):
    write_run(tmp_path / "run", ROWS)
    result = invoke("score-bleu", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    expected = scoring.score_bleu([r["text"] for r in ROWS], [r["reference"] for r in ROWS])
    assert record["metric"] == "bleu" and record["n"] == 4
    assert record["values"]["bleu"] == pytest.approx(expected.bleu, abs=1e-9)
    assert "case:lc" in record["scorer"] and "eff:yes" in record["scorer"]
    assert records.read_metrics(tmp_path / "run") == [record]


def test_score_bleu_identical_text_is_100(tmp_path):
    rows = [{"text": r["reference"], "reference": r["reference"]} for r in ROWS]
    write_run(tmp_path / "run", rows)
    result = invoke("score-bleu", tmp_path / "run", "--json")
    assert json.loads(result.stdout)[0]["values"]["bleu"] == pytest.approx(100.0)


def test_score_rouge_records_mean_f_measures(tmp_path):
    write_run(tmp_path / "run", ROWS)
    result = invoke("score-rouge", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    expected = scoring.score_rouge([r["text"] for r in ROWS], [r["reference"] for r in ROWS])
    for name in ("rouge1", "rouge2", "rougeL"):
        assert record["values"][name] == pytest.approx(getattr(expected, name), abs=1e-9)
    assert all(math.isfinite(record["values"][k]) for k in ("rouge1", "rouge2", "rougeL"))
    assert records.read_metrics(tmp_path / "run") == [record]


@pytest.mark.parametrize("command", ["score-bleu", "score-rouge"])
def test_rows_without_reference_exit_2_naming_file_and_line(tmp_path, command):
    rows = [ROWS[0], {"id": 1, "text": "no reference here"}]
    samples = write_run(tmp_path / "run", rows) / records.SAMPLES_FILE
    result = invoke(command, samples)
    assert result.exit_code == 2
    assert f"{samples}, line 2" in result.stderr and '"reference"' in result.stderr
    assert metrics_files(tmp_path) == []


def test_official_port_rows_without_reference_cannot_be_bleu_scored(tmp_path):
    path = tmp_path / "official.jsonl"
    path.write_text('{"id": 0, "generated": "the cat"}\n')
    result = invoke("score-bleu", path)
    assert result.exit_code == 2 and f"{path}, line 1" in result.stderr


@pytest.mark.parametrize("command", ["score-ppl", "score-bleu", "score-rouge"])
def test_help_shows_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and f"elfctl {command}" in result.stdout
