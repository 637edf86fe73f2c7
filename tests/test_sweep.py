"""`elfctl sweep`: its table equals separate `sample` + `score-ppl` runs, and its PNG opens."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.errors import UserError
from elfctl.runs import mean_stderr, sweep
from tests.conftest import build_word_tokenizer
from tests.gpt2_fixture import build_tiny_gpt2
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint, tokenizer dir, scorer dir): a random model whose samples vary."""
    root = tmp_path_factory.mktemp("sweep")
    tok = build_word_tokenizer(root / "tok")
    state = {k: 10 * v for k, v in official_state(0, V=len(tok)).items()}
    ckpt = write_official(root / "checkpoint_300", state, step=300)
    return ckpt, root / "tok", build_tiny_gpt2(root / "tiny-gpt2")


def common(model):
    ckpt, tok, _ = model
    return ["--repo", ckpt, "--tokenizer", tok, "--length", 8, "--num-samples", 6]


def run_sweep(model, out, *extra):
    scorer = model[2]
    args = [*common(model), "--batch-size", 4, "--scorer", scorer, "--cpu", "--out", out]
    return invoke("sweep", *args, *extra)


def test_sweep_table_equals_separate_sample_and_score_ppl_runs(tmp_path, model):
    result = run_sweep(model, tmp_path / "sw", "--steps", "2,5", "--seeds", "0,3", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    summary = sweep.load(tmp_path / "sw")
    assert printed == summary
    assert [row["steps"] for row in summary["rows"]] == [2, 5]
    assert summary["metrics"] == ["gen_ppl", "entropy"]

    for row in summary["rows"]:
        assert row["seeds"] == [0, 3] and row["n"] == 6
        for i, seed in enumerate(row["seeds"]):
            alone = tmp_path / f"alone-{row['steps']}-{seed}"
            sampled = invoke(
                "sample", *common(model), "--batch-size", 4, "--steps", row["steps"],
                "--seed", seed, "--out", alone, "--cpu",
            )  # fmt: skip
            assert sampled.exit_code == 0, sampled.output
            swept = sweep.run_dir(tmp_path / "sw", row["steps"], seed)
            assert records.read_samples(swept) == records.read_samples(alone)
            scored = invoke("score-ppl", alone, "--model", model[2], "--json", "--cpu")
            values = json.loads(scored.stdout)[0]["values"]
            assert row["metrics"]["gen_ppl"]["values"][i] == pytest.approx(values["ppl"])
            assert row["metrics"]["entropy"]["values"][i] == pytest.approx(values["entropy"])
        for name in ("gen_ppl", "entropy"):
            entry = row["metrics"][name]
            assert (entry["mean"], entry["stderr"]) == pytest.approx(mean_stderr(entry["values"]))
            assert entry["stderr"] > 0  # two seeds, two different sample sets
    # Each run dir is an ordinary sample run, scored like score-ppl scores it.
    first = sweep.run_dir(tmp_path / "sw", 2, 0)
    assert json.loads((first / records.RUN_FILE).read_text())["sampler"]["steps"] == 2
    assert records.read_metrics(first)[0]["metric"] == "gen_ppl"


def test_sweep_writes_a_png_that_opens(tmp_path, model):
    from matplotlib.image import imread

    result = run_sweep(model, tmp_path / "sw", "--steps", "1,2,4", "--paper")
    assert result.exit_code == 0, result.output
    image = imread(tmp_path / "sw" / sweep.PLOT_FILE)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0  # something was drawn
    # --paper keeps the paper's curve in sweep.json and shows it beside ours.
    summary = sweep.load(tmp_path / "sw")
    assert summary["paper"]["gen_ppl"] == {"8": 67.32, "16": 33.66, "32": 24.08, "64": 19.72}
    assert "paper Gen PPL" in result.stdout
    # A single seed: the value itself, no error bar.
    assert all(len(r["metrics"]["gen_ppl"]["values"]) == 1 for r in summary["rows"])
    assert all(r["metrics"]["gen_ppl"]["stderr"] == 0.0 for r in summary["rows"])
    # Another command (elfctl show) can redraw it from the directory alone.
    again = sweep.plot(sweep.load(tmp_path / "sw"), tmp_path / "again.png", paper=False)
    assert imread(again).shape == image.shape
    shown = CliRunner().invoke(
        app, ["show", str(tmp_path / "sw"), "--out", str(tmp_path / "s.png")]
    )
    assert shown.exit_code == 0, shown.output
    assert "paper Gen PPL" in shown.stdout and imread(tmp_path / "s.png").shape == image.shape


def test_sweep_with_references_adds_mauve_as_score_mauve_scores_it(tmp_path, model):
    refs = tmp_path / "refs.txt"
    refs.write_text("\n".join(["the cat sees a dog .", "a bird runs .", "the dog sleeps ."] * 5))
    args = ["--steps", "2", "--num-samples", 12, "--references", refs, "--json"]
    result = run_sweep(model, tmp_path / "sw", *args)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    scored = invoke(
        "score-mauve", sweep.run_dir(tmp_path / "sw", 2, 0), "--references", refs, "--model",
        model[2], "--json", "--cpu",
    )  # fmt: skip
    assert scored.exit_code == 0, scored.output
    expected = json.loads(scored.stdout)[0]["values"]["mauve"]
    assert row["metrics"]["mauve"]["values"] == [pytest.approx(expected)]


def test_samplers_are_an_axis_compared_at_equal_forwards(tmp_path, model):
    from matplotlib.image import imread

    args = ["--samplers", "sde,heun", "--forwards", "3,5", "--json"]
    result = run_sweep(model, tmp_path / "sw", *args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    cells = [(r["sampler"], r["budget"], r["steps"], r["forwards"]) for r in summary["rows"]]
    # A Heun step costs two forwards and the last step one: 2 steps = 3, 3 steps = 5.
    assert cells == [("sde", 3, 3, 3), ("sde", 5, 5, 5), ("heun", 3, 2, 3), ("heun", 5, 3, 5)]
    assert summary["samplers"] == ["sde", "heun"]
    heun = sweep.run_dir(tmp_path / "sw", 3, 0, "heun")
    info = json.loads((heun / records.RUN_FILE).read_text())
    assert info["sampler"]["method"] == "heun" and info["forwards"]["sampling"] == 5
    assert info["forwards"]["total"] == 2 * (5 + 1)  # 6 samples in batches of 4, a decode each
    alone = tmp_path / "alone"
    sampled = invoke(
        "sample", *common(model), "--batch-size", 4, "--steps", 3, "--sampler", "heun",
        "--out", alone, "--cpu",
    )  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert records.read_samples(heun) == records.read_samples(alone)
    assert "heun" in result.stderr and "forwards" in result.stderr  # the table's columns
    assert imread(tmp_path / "sw" / sweep.PLOT_FILE).std() > 0


def test_an_earlier_sweep_is_kept_unless_forced(tmp_path, model):
    assert run_sweep(model, tmp_path / "sw", "--steps", "1").exit_code == 0
    again = run_sweep(model, tmp_path / "sw", "--steps", "1")
    assert again.exit_code == 2 and "--force" in again.stderr
    assert run_sweep(model, tmp_path / "sw", "--steps", "1", "--force").exit_code == 0
    assert len(records.read_metrics(sweep.run_dir(tmp_path / "sw", 1, 0))) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "8,x"], "comma-separated integers"),
        (["--steps", "0,4"], "at least 1"),
        (["--steps", "4,4"], "twice"),
        (["--seeds", ""], "names no values"),
        (["--sampler", "euler"], "--sampler must be ode, sde, heun"),
        (["--samplers", "sde,euler"], "--samplers must be ode, sde, heun"),
        (["--samplers", "sde", "--sampler", "ode"], "pass one of them"),
        (["--forwards", "4,x"], "--forwards must be distinct integers"),
        (["--references", "nowhere.txt"], "--references not found"),
    ],
)
def test_bad_sweep_input_is_one_sentence_and_exit_2(tmp_path, model, args, message):
    result = run_sweep(model, tmp_path / "sw", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "sw").exists()


def test_load_refuses_a_directory_that_is_not_a_sweep(tmp_path):
    with pytest.raises(UserError, match="not a sweep directory"):
        sweep.load(tmp_path)
    (tmp_path / sweep.SWEEP_FILE).write_text('{"steps": [8]}')
    with pytest.raises(UserError, match="not a sweep summary"):
        sweep.load(tmp_path)


def test_a_missing_plot_extra_is_named_before_any_sampling(tmp_path, model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    result = run_sweep(model, tmp_path / "sw", "--steps", "1")
    assert result.exit_code == 2
    assert "elfctl[plot]" in result.stderr and not (tmp_path / "sw").exists()


def test_a_conditional_model_is_refused_in_one_sentence(tmp_path, model):
    result = run_sweep(model, tmp_path / "sw", "--steps", "1", "--preset", "de-en-b")
    assert result.exit_code == 2, result.output
    assert "is a conditional model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()
