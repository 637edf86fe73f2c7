"""`elfctl sample --prompt/--prompts/--infill/--trajectory` and `elfctl show`, end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import resolve
from elfctl.model import ELF, save_model_checkpoint
from tests.conftest import randomize_

runner = CliRunner()

SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.bottleneck=16"]


def random_checkpoint(folder, preset):
    """A checkpoint of `preset` (made smaller) with random weights everywhere."""
    config = resolve(preset, sets=SMALL)
    model = randomize_(ELF(config.model), seed=2, std=0.15)
    return save_model_checkpoint(folder / "step_00000001", model.state_dict(), config, step=1)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="module")
def translate_ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("tt"), "tiny-translate")


def invoke(*args):
    return runner.invoke(app, [*map(str, args)])


def rows_of(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompted_rows_start_with_their_prompt_and_record_it(tmp_path, tiny_ckpt):
    from elfctl.runs import load_for_sampling

    (tmp_path / "p.txt").write_text("the dog\nevery big cat\n")
    out = tmp_path / "s"
    result = invoke(
        "sample", "--repo", tiny_ckpt, "--prompts", tmp_path / "p.txt", "--steps", 3, "--out", out
    )
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 2  # several prompts and no --num-samples: one sample each
    tokenizer = load_for_sampling(str(tiny_ckpt)).tokenizer
    for row, prompt in zip(rows, ["the dog", "every big cat"], strict=True):
        assert row["meta"]["prompt"] == prompt
        assert row["tokens"][: len(ids(tokenizer, prompt))] == ids(tokenizer, prompt)
        assert row["text"].startswith(prompt)
    info = json.loads((out / "run.json").read_text())
    assert info["prompting"] == {
        "kind": "prompt",
        "count": 2,
        "hold": "clean",
        "known_encoding": "masked",
    }


def test_infilled_rows_keep_the_template_tokens_and_record_the_template(tmp_path, tiny_ckpt):
    from elfctl.runs import load_for_sampling
    from elfctl.sampling import parse_template

    template = "the [gap:2] sees [gap:3] ."
    out = tmp_path / "s"
    result = invoke(
        "sample",
        "--repo",
        tiny_ckpt,
        "--infill",
        template,
        "--num-samples",
        3,
        "--steps",
        3,
        "--hold",
        "noised",
        "--known-encoding",
        "segments",
        "--trajectory",
        2,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    layout = parse_template(load_for_sampling(str(tiny_ckpt)).tokenizer, template)
    for row in rows_of(out):
        assert row["meta"]["template"] == template
        assert all(row["tokens"][p] == k for p, k in enumerate(layout.ids) if k is not None)
        assert row["meta"]["trajectory"]["texts"][-1] == row["text"]
    assert json.loads((out / "run.json").read_text())["prompting"]["hold"] == "noised"
    shown = invoke("show", out, "--id", 1)
    assert shown.exit_code == 0, shown.output
    assert "step   3" in shown.output and "final" in shown.output
    picture = tmp_path / "t.png"
    assert invoke("show", out, "--id", 1, "--out", picture).exit_code == 0
    assert picture.stat().st_size > 1000
    again = invoke("show", out, "--id", 1, "--out", picture)
    assert again.exit_code == 2 and "--force" in again.output


def test_a_conditional_model_takes_prompts_after_its_condition(tmp_path, translate_ckpt):
    from elfctl.runs import load_for_sampling

    (tmp_path / "src.txt").write_text(
        "the dog sleeps .\nevery cat runs quickly .\nthat fox sings .\n"
    )
    out = tmp_path / "s"
    result = invoke(
        "sample",
        "--repo",
        translate_ckpt,
        "--input",
        tmp_path / "src.txt",
        "--prompt",
        "lo kanu",
        "--steps",
        3,
        "--batch-size",
        2,
        "--trajectory",
        2,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    tokenizer = load_for_sampling(str(translate_ckpt)).tokenizer
    want = ids(tokenizer, "lo kanu")
    rows = rows_of(out)
    assert [r["condition"] for r in rows] == [
        "the dog sleeps .",
        "every cat runs quickly .",
        "that fox sings .",
    ]
    for row in rows:
        assert row["tokens"][: len(want)] == want and row["meta"]["prompt"] == "lo kanu"
        texts = row["meta"]["trajectory"]["texts"]  # target side only, prompt kept
        assert texts[-1] == row["text"] and all(t.startswith("lo kanu") for t in texts)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--infill", "the dog runs ."], "has no gap"),
        (["--infill", "the [gap:40] dog"], "covers 42 tokens"),
        (["--prompt", " ".join(["the dog"] * 9)], "has 18 tokens but samples have only 16"),
        (["--prompt", "the", "--infill", "the [gap:2] ."], "cannot be combined"),
        (["--prompt", "the", "--hold", "sideways"], "--hold must be noised or clean"),
        (["--hold", "clean"], "need --prompt"),
        (["--prompts", "missing.txt"], "not found"),
    ],
)
def test_bad_prompts_and_templates_are_one_sentence_and_exit_2(tmp_path, tiny_ckpt, flags, message):
    result = invoke("sample", "--repo", tiny_ckpt, "--steps", 2, "--out", tmp_path / "s", *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s" / "samples.jsonl").exists()


def test_a_conditional_prompt_must_fit_in_the_output_budget(tmp_path, translate_ckpt):
    (tmp_path / "src.txt").write_text("the dog sleeps .\n")
    result = invoke(
        "sample",
        "--repo",
        translate_ckpt,
        "--input",
        tmp_path / "src.txt",
        "--steps",
        2,
        "--prompt",
        " ".join(["lo"] * 40),
        "--out",
        tmp_path / "s",
    )
    assert result.exit_code == 2 and "has 40 tokens but samples have only" in result.output


def test_show_without_a_trajectory_prints_texts_and_refuses_to_draw(tmp_path, tiny_ckpt):
    out = tmp_path / "s"
    assert (
        invoke(
            "sample", "--repo", tiny_ckpt, "--num-samples", 2, "--steps", 2, "--out", out
        ).exit_code
        == 0
    )
    shown = invoke("show", out)
    assert shown.exit_code == 0 and "#0" in shown.output and "#1" in shown.output
    drawn = invoke("show", out, "--id", 0, "--out", tmp_path / "t.gif")
    assert drawn.exit_code == 2 and "has no trajectory" in drawn.output
    assert invoke("show", out, "--id", 9).exit_code == 2
    assert invoke("show", out, "--out", tmp_path / "t.jpg").exit_code == 2
    assert invoke("show", tmp_path / "nothing").exit_code == 2


def test_eval_prompts_every_setting_and_scores_the_prompted_samples(tmp_path, tiny_ckpt):
    from elfctl import records
    from tests.gpt2_fixture import build_tiny_gpt2

    scorer = build_tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "eval"
    result = invoke(
        "eval",
        "--preset",
        "tiny",
        "--repo",
        tiny_ckpt,
        "--scorer",
        scorer,
        "--cpu",
        "--num-samples",
        3,
        "--prompt",
        "the dog",
        "--prompt",
        "every cat",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = records.read_samples(out / "sde-32")
    assert [r["meta"]["prompt"] for r in rows] == ["the dog", "every cat", "the dog"]
    assert all(r["text"].startswith(r["meta"]["prompt"]) for r in rows)
    assert records.read_run_json(out / "sde-32")["prompting"]["kind"] == "prompt"
    assert any(m["metric"] == "gen_ppl" for m in records.read_metrics(out / "sde-32"))
