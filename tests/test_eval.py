"""`elfctl eval` end to end: a tiny official-format checkpoint, a local word tokenizer, a tiny
GPT-2 scorer and test-only settings passed with --config. No network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.cli.eval import metric_cell
from elfctl.config import Config, resolve
from elfctl.errors import UserError
from elfctl.runs import check_eval_out_dir, load_for_eval, scorers_for, select_settings
from tests.conftest import WORDS, build_word_tokenizer
from tests.gpt2_fixture import build_tiny_gpt2
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()

SETTINGS = [
    {
        "name": "sde-a",
        "method": "sde",
        "steps": 3,
        "gamma": 1.5,
        "sc_cfg": 3.0,
        "cfg": 1.0,
        "num_samples": 3,
        "batch_size": 2,
        "paper": {"gen_ppl": 24.1, "entropy": 5.15},
    },
    {
        "name": "ode-b",
        "method": "ode",
        "steps": 2,
        "gamma": 0.0,
        "sc_cfg": 1.0,
        "cfg": 1.0,
        "num_samples": 4,
        "batch_size": 4,
        "paper": {},
    },
]


def varied_state(seed, **sizes):
    """A random official state dict whose samples differ from one another: at the fixture's
    scale (0.1) every sample decodes to one repeated token, which would hide a mix-up of
    settings or files."""
    return {name: 10 * tensor for name, tensor in official_state(seed, **sizes).items()}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """(checkpoint, config file) of a tiny unconditional model and two test settings."""
    root = tmp_path_factory.mktemp("uncond")
    tok = build_word_tokenizer(root / "tok")
    ckpt = write_official(root / "checkpoint_300", varied_state(0, V=len(tok)), step=300)
    config = {
        "name": "test-eval",
        "encoder": {"tokenizer": str(root / "tok")},
        "data": {"conditional": False, "max_length": 8, "pad_token": "eos"},
        "sampling": SETTINGS,
    }
    config_file = root / "test-eval.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return ckpt, config_file


def run_eval(unconditional, scorer_dir, out, *extra):
    ckpt, config_file = unconditional
    args = ["--config", config_file, "--repo", ckpt, "--scorer", scorer_dir, "--out", out]
    return invoke("eval", *args, "--cpu", *extra)


TIMING = ("seconds", "samples_per_s")


def without_timing(values):
    return {k: v for k, v in values.items() if k not in TIMING}


# ----------------------------------------------------------------------------- unconditional


def test_every_setting_is_sampled_and_scored_exactly_as_score_ppl_scores_it(
    tmp_path, unconditional, scorer_dir
):
    out = tmp_path / "eval"
    result = run_eval(unconditional, scorer_dir, out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "eval.json").read_text())
    assert summary["preset"] == "test-eval" and summary["checkpoint"]["step"] == 300

    rows = summary["rows"]
    assert [row["setting"] for row in rows] == ["sde-a", "ode-b"]
    assert [row["n"] for row in rows] == [3, 4]
    for row, setting in zip(rows, SETTINGS, strict=True):
        run_dir = out / setting["name"]
        info = records.read_run_json(run_dir)
        assert info["sampler"]["method"] == setting["method"]
        assert info["sampler"]["steps"] == setting["steps"]
        assert info["sampler"]["gamma"] == setting["gamma"]
        assert info["num_samples"] == setting["num_samples"]
        assert len(records.read_samples(run_dir)) == setting["num_samples"]
        assert row["wall_seconds"] == info["wall_seconds"]
        assert row["samples_per_s"] == info["samples_per_s"]
        assert set(row["metrics"]) == {"gen_ppl", "entropy"}

        # The same samples scored by `elfctl score-ppl` give the same numbers.
        (recorded,) = records.read_metrics(run_dir)
        scored = invoke("score-ppl", run_dir, "--model", scorer_dir, "--cpu", "--json")
        assert scored.exit_code == 0, scored.output
        (expected,) = json.loads(scored.stdout)
        assert without_timing(recorded["values"]) == without_timing(expected["values"])
        assert row["metrics"]["gen_ppl"]["value"] == expected["values"]["ppl"]
        assert row["metrics"]["entropy"]["value"] == expected["values"]["entropy"]

    # the two settings' samples differ, so a mix-up of files would show
    assert rows[0]["metrics"]["gen_ppl"]["value"] != rows[1]["metrics"]["gen_ppl"]["value"]
    assert rows[0]["metrics"]["gen_ppl"]["paper"] == 24.1
    assert rows[0]["metrics"]["entropy"]["paper"] == 5.15
    assert rows[1]["metrics"]["gen_ppl"]["paper"] is None


def test_the_table_shows_each_number_beside_the_papers(tmp_path, unconditional, scorer_dir):
    out = tmp_path / "eval"
    result = run_eval(unconditional, scorer_dir, out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "eval.json").read_text())["rows"]
    ppl, entropy = (rows[0]["metrics"][k]["value"] for k in ("gen_ppl", "entropy"))
    table = " ".join(result.stdout.split())  # rich may wrap a cell over two lines
    assert f"{ppl:.2f} (paper 24.1)" in table and f"{entropy:.2f} (paper 5.15)" in table
    assert "SDE 3 steps, gamma 1.5, SC-CFG 3, CFG 1" in table
    assert "sde-a" in table and "ode-b" in table and "test-eval" in table


def test_setting_and_num_samples_run_a_subset(tmp_path, unconditional, scorer_dir):
    out = tmp_path / "eval"
    result = run_eval(
        unconditional, scorer_dir, out, "--setting", "ode-b", "--num-samples", 2, "--json"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(row["setting"], row["n"]) for row in rows] == [("ode-b", 2)]
    assert not (out / "sde-a").exists()


def test_an_earlier_evaluation_is_kept_unless_forced(tmp_path, unconditional, scorer_dir):
    out = tmp_path / "eval"
    assert run_eval(unconditional, scorer_dir, out, "--setting", "ode-b").exit_code == 0
    before = (out / "ode-b" / "samples.jsonl").read_text()
    again = run_eval(unconditional, scorer_dir, out, "--setting", "ode-b", "--seed", 5)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert (out / "ode-b" / "samples.jsonl").read_text() == before

    forced = run_eval(unconditional, scorer_dir, out, "--setting", "ode-b", "--seed", 5, "--force")
    assert forced.exit_code == 0, forced.output
    assert records.read_run_json(out / "ode-b")["seed"] == 5
    # the old samples' metrics went with them: one record, for the new samples
    assert len(records.read_metrics(out / "ode-b")) == 1


def test_metrics_left_in_a_setting_folder_also_need_force(tmp_path):
    settings = select_settings(resolve("owt-b"))
    records.append_metrics(tmp_path / "sde-64", {"metric": "gen_ppl"})
    with pytest.raises(UserError, match="sde-64 already holds metrics.jsonl; pass --force"):
        check_eval_out_dir(tmp_path, settings, force=False)
    check_eval_out_dir(tmp_path, settings, force=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "owt-q"], "Unknown preset 'owt-q'"),
        (["--preset", "owt-b", "--setting", "sde-16"], "no sampling setting 'sde-16'"),
        ([], "--preset NAME or --config FILE"),
        (["--preset", "owt-b", "--precision", "fp8"], "--precision must be"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(tmp_path, args, message):
    result = invoke("eval", "--repo", tmp_path / "missing", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_setting_in_a_config_file_exits_2(tmp_path, unconditional, scorer_dir):
    result = run_eval(unconditional, scorer_dir, tmp_path / "o", "--setting", "nope")
    assert result.exit_code == 2
    assert "Preset 'test-eval' has no sampling setting 'nope'; it has: sde-a, ode-b." in (
        result.stderr
    )


# ----------------------------------------------------------------------------- planning


def test_every_official_entry_of_a_preset_is_run_in_order():
    assert [s.name for s in select_settings(resolve("owt-b"))] == ["sde-32", "sde-64"]
    assert [s.name for s in select_settings(resolve("owt-l"), ["sde-64"])] == ["sde-64"]


@pytest.mark.parametrize(
    "preset, kinds",
    [("owt-b", ["gen_ppl"]), ("owt-l", ["gen_ppl"]), ("de-en-b", ["bleu"]), ("xsum-b", ["rouge"])],
)
def test_scorers_follow_the_paper_numbers_of_the_preset(preset, kinds):
    config = resolve(preset)
    for setting in config.sampling:
        assert scorers_for(config, setting) == kinds


def test_a_conditional_setting_without_paper_numbers_gets_both_scorers():
    config = resolve("tiny-translate")
    assert scorers_for(config, config.sampling[0]) == ["bleu", "rouge"]


def test_metric_cells_put_the_paper_number_beside_ours():
    assert metric_cell({"value": 25.304, "paper": 24.1, "paper_validation": None}) == (
        "25.30 (paper 24.1)"
    )
    assert metric_cell({"value": 26.1, "paper": 26.4, "paper_validation": 26.7}) == (
        "26.10 (paper 26.7 val, 26.4 test)"
    )
    assert metric_cell({"value": None, "paper": None, "paper_validation": None}) == "-"
    assert metric_cell({"value": 3.0, "paper": None, "paper_validation": 36.3}) == (
        "3.00 (paper 36.3 val)"
    )


def test_our_checkpoints_keep_their_network_and_latent_space_under_the_presets_settings(
    tmp_path,
):
    from elfctl.model import infer_model_config, save_model_checkpoint

    tok = build_word_tokenizer(tmp_path / "tok")
    ema = official_state(2, V=len(tok))
    trained = Config(name="my-run")
    trained.model = infer_model_config(ema)
    trained.encoder.tokenizer = str(tmp_path / "tok")
    trained.encoder.latent_std = 0.7
    save_model_checkpoint(tmp_path / "run" / "step_00000050", ema, trained, step=50)

    preset = resolve("owt-b")  # T5-small tokenizer and ELF-B sizes: both must give way
    loaded = load_for_eval(str(tmp_path / "run"), preset, device="cpu")
    assert loaded.config.model == trained.model
    assert loaded.config.encoder == trained.encoder and len(loaded.tokenizer) == len(tok)
    assert [s.name for s in loaded.config.sampling] == ["sde-32", "sde-64"]
    assert loaded.config.name == "owt-b" and loaded.checkpoint.step == 50
    assert loaded.encoder is None  # unconditional: no encoder needed
    assert preset.model.hidden_size == 768  # the caller's config is not changed


# ----------------------------------------------------------------------------- conditional


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """(checkpoint, config file, validation pairs) of a tiny conditional model."""
    from elfctl.testbed.assets import build_encoder

    root = tmp_path_factory.mktemp("cond")
    tok = build_word_tokenizer(root / "tok")
    build_encoder(root / "encoder", vocab_size=len(tok))  # a 64-wide T5 encoder
    ckpt = write_official(root / "checkpoint_7", varied_state(1, C=64, V=len(tok)), step=7)
    pairs = [(" ".join(WORDS[i : i + 4]), " ".join(WORDS[i + 1 : i + 3])) for i in range(0, 10, 2)]
    validation = root / "validation.jsonl"
    validation.write_text("".join(json.dumps({"input": s, "target": t}) + "\n" for s, t in pairs))
    config = {
        "name": "test-cond",
        "encoder": {
            "tokenizer": str(root / "tok"),
            "encoder": str(root / "encoder"),
            "latent_mean": 0.0,
            "latent_std": 1.0,
        },
        "data": {
            "conditional": True,
            "validation": str(validation),
            "max_length": 10,
            "max_input_length": 6,
            "pad_token": "eos",
        },
        "sampling": [
            {
                "name": "ode-cfg2",
                "method": "ode",
                "steps": 2,
                "sc_cfg": 1.0,
                "cfg": 2.0,
                "num_samples": 4,
                "batch_size": 3,
                "paper": {"bleu": 26.4, "bleu_validation": 26.7},
            },
            # asks for more samples than the validation set has rows
            {"name": "ode-any", "method": "ode", "steps": 2, "cfg": 1.0, "num_samples": 9},
        ],
    }
    config_file = root / "test-cond.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return ckpt, config_file, pairs


def test_conditional_presets_sample_the_validation_set_and_score_bleu_or_rouge(
    tmp_path, conditional
):
    ckpt, config_file, pairs = conditional
    out = tmp_path / "eval"
    args = ["eval", "--config", config_file, "--repo", ckpt, "--out", out, "--cpu", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [(row["setting"], row["n"]) for row in rows] == [("ode-cfg2", 4), ("ode-any", 5)]
    assert "ode-any: 5 samples, one per row of the validation set" in result.stderr
    assert set(rows[0]["metrics"]) == {"bleu"}
    assert set(rows[1]["metrics"]) == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert rows[0]["metrics"]["bleu"]["paper"] == 26.4
    assert rows[0]["metrics"]["bleu"]["paper_validation"] == 26.7
    assert "(paper 26.7 val, 26.4 test)" in " ".join(result.stderr.split())

    for row in rows:
        run_dir = out / row["setting"]
        samples = records.read_samples(run_dir)
        # conditioned on the validation rows, in order, with their references
        assert [(s["condition"], s["reference"]) for s in samples] == pairs[: row["n"]]
        assert records.read_run_json(run_dir)["sampler"]["cfg"] == (2.0 if row["n"] == 4 else 1.0)
        bleu = invoke("score-bleu", run_dir, "--json")
        assert bleu.exit_code == 0, bleu.output
        assert row["metrics"]["bleu"]["value"] == json.loads(bleu.stdout)[0]["values"]["bleu"]
    rouge = invoke("score-rouge", out / "ode-any", "--json")
    expected = json.loads(rouge.stdout)[0]["values"]
    assert {k: rows[1]["metrics"][k]["value"] for k in ("rouge1", "rouge2", "rougeL")} == {
        k: expected[k] for k in ("rouge1", "rouge2", "rougeL")
    }


def test_more_samples_than_validation_rows_exits_2(tmp_path, conditional):
    ckpt, config_file, pairs = conditional
    result = invoke(
        "eval", "--config", config_file, "--repo", ckpt, "--out", tmp_path / "o", "--cpu",
        "--num-samples", len(pairs) + 1,
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"--num-samples {len(pairs) + 1} is more than the {len(pairs)} rows" in result.stderr


def test_conditional_eval_feeds_the_validation_sets_own_condition_ids(tmp_path, conditional):
    from datasets import Dataset

    from elfctl.model import load_tokenizer

    ckpt, config_file, pairs = conditional
    config = yaml.safe_load(Path(config_file).read_text())
    # A pre-tokenized validation set like the official *_validation_t5 ones: stored ids
    # (here each source's ids reversed) that re-tokenizing the text would not give back.
    tok = load_tokenizer(config["encoder"]["tokenizer"])
    stored = [tok(s, add_special_tokens=False)["input_ids"][::-1] for s, _ in pairs]
    Dataset.from_dict(
        {
            "input": [s for s, _ in pairs],
            "target": [t for _, t in pairs],
            "condition_input_ids": stored,
        }
    ).save_to_disk(str(tmp_path / "validation"))
    config["data"]["validation"] = str(tmp_path / "validation")
    config["sampling"] = config["sampling"][:1]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    args = ["eval", "--config", tmp_path / "eval.yaml", "--repo", ckpt, "--out", out, "--cpu"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    conditioning = records.read_run_json(out / "ode-cfg2")["conditioning"]
    assert conditioning["condition_ids"] == "dataset"
    assert conditioning["condition_ids_from_dataset"] == 4


# ----------------------------------------------------------------------------- seeds


def test_seeds_give_mean_and_standard_error_of_the_per_seed_values(
    tmp_path, unconditional, scorer_dir
):
    import math

    out = tmp_path / "eval"
    result = run_eval(unconditional, scorer_dir, out, "--seeds", "0,1,2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "eval.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    for row, setting in zip(summary["rows"], SETTINGS, strict=True):
        assert row["seeds"] == [0, 1, 2] and [s["seed"] for s in row["per_seed"]] == [0, 1, 2]
        for name in ("gen_ppl", "entropy"):
            per_seed = []
            for seed in (0, 1, 2):  # each seed's own run dir and its metrics record
                run_dir = out / setting["name"] / f"seed_{seed}"
                assert records.read_run_json(run_dir)["seed"] == seed
                (record,) = records.read_metrics(run_dir)
                per_seed.append(record["values"]["ppl" if name == "gen_ppl" else "entropy"])
            entry = row["metrics"][name]
            assert entry["per_seed"] == per_seed
            assert [s["metrics"][name] for s in row["per_seed"]] == per_seed
            mean = sum(per_seed) / 3
            stderr = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / 2) / math.sqrt(3)
            assert entry["value"] == pytest.approx(mean, rel=1e-12)
            assert entry["stderr"] == pytest.approx(stderr, rel=1e-12)
            assert len(set(per_seed)) == 3  # the seeds really differ
    first = summary["rows"][0]["metrics"]["gen_ppl"]
    table = " ".join(result.stderr.split())
    assert f"{first['value']:.2f} ± {first['stderr']:.2f} (paper 24.1)" in table


def test_a_killed_evaluation_reuses_finished_samples_and_refuses_other_settings(
    tmp_path, unconditional, scorer_dir, monkeypatch
):
    from elfctl.model import ELF

    out = tmp_path / "eval"
    first = run_eval(unconditional, scorer_dir, out, "--seeds", "0,1", "--json")
    assert first.exit_code == 0, first.output
    (out / "eval.json").unlink()  # killed while scoring: samples finished, no summary
    samples = {p: p.read_bytes() for p in out.rglob("samples.jsonl")}
    calls = []
    forward = ELF.forward
    monkeypatch.setattr(ELF, "forward", lambda m, *a, **k: calls.append(1) or forward(m, *a, **k))
    again = run_eval(unconditional, scorer_dir, out, "--seeds", "0,1", "--json")
    assert again.exit_code == 0, again.output
    assert calls == [] and "reusing the finished samples" in again.stderr
    rows = [r["metrics"]["gen_ppl"]["value"] for r in json.loads(again.stdout)["rows"]]
    assert rows == [r["metrics"]["gen_ppl"]["value"] for r in json.loads(first.stdout)["rows"]]

    (out / "eval.json").unlink()
    other = run_eval(unconditional, scorer_dir, out, "--seeds", "0,1", "--grid", "per-batch")
    assert other.exit_code == 2 and "Traceback" not in other.output
    *_, error = other.stderr.strip().splitlines()  # after the "evaluating ..." line
    assert error.startswith("error:") and "already holds samples of other settings" in error
    assert {p: p.read_bytes() for p in out.rglob("samples.jsonl")} == samples


@pytest.mark.parametrize(
    "seeds, message",
    [
        ("0,1,1", "--seeds names seed 1 twice."),
        ("0,x", "--seeds must be distinct non-negative integers separated by commas, got '0,x'."),
        ("", "--seeds must be distinct non-negative integers"),
        ("1,-2", "--seeds must be distinct non-negative integers"),
    ],
)
def test_bad_seeds_exit_2_with_one_sentence_before_anything_is_written(
    tmp_path, unconditional, scorer_dir, seeds, message
):
    result = run_eval(unconditional, scorer_dir, tmp_path / "o", "--seeds", seeds)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    both = run_eval(unconditional, scorer_dir, tmp_path / "o", "--seeds", "0,1", "--seed", 3)
    assert both.exit_code == 2 and "--seed or --seeds, not both" in both.stderr


def test_seed_statistics_of_a_conditional_preset_are_bleu_per_seed(tmp_path, conditional):
    ckpt, config_file, pairs = conditional
    out = tmp_path / "eval"
    args = ["eval", "--config", config_file, "--repo", ckpt, "--out", out, "--cpu", "--json"]
    result = invoke(*args, "--setting", "ode-cfg2", "--seeds", "3,4")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    bleu = row["metrics"]["bleu"]
    per_seed = []
    for seed in (3, 4):
        scored = invoke("score-bleu", out / "ode-cfg2" / f"seed_{seed}", "--json")
        per_seed.append(json.loads(scored.stdout)[0]["values"]["bleu"])
    assert bleu["per_seed"] == per_seed
    assert bleu["value"] == pytest.approx(sum(per_seed) / 2)
    assert bleu["stderr"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert bleu["paper_validation"] == 26.7
