"""`eval --metrics`: MAUVE and diversity in a row, exactly as score-mauve / score-diversity."""

from __future__ import annotations

import json

import pytest

from elfctl.errors import UserError
from elfctl.runs import parse_metrics
from tests.test_eval import run_eval, scorer_dir, unconditional  # noqa: F401 (fixtures)
from tests.test_score_distribution import invoke, texts


@pytest.fixture
def references(tmp_path):
    path = tmp_path / "human.txt"
    path.write_text("\n".join(texts(20, 11, lengths=(2, 6))) + "\n")
    return path


def test_eval_metrics_add_mauve_and_diversity_as_their_commands_score_them(
    tmp_path,
    unconditional,  # noqa: F811
    scorer_dir,  # noqa: F811
    references,
):
    out = tmp_path / "ev"
    result = run_eval(
        unconditional, scorer_dir, out, "--metrics", "ppl,mauve,diversity", "--references",
        references, "--num-samples", 12, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for row in summary["rows"]:
        metrics = row["metrics"]
        names = {"gen_ppl", "entropy", "mauve", "distinct_4", "rep_4", "self_bleu"}
        assert set(metrics) == names
        run_dir = out / row["setting"]
        mauve = invoke(
            "score-mauve", run_dir, "--references", references, "--model", scorer_dir,
            "--json", "--cpu",
        )  # fmt: skip
        assert mauve.exit_code == 0, mauve.output
        assert metrics["mauve"]["value"] == pytest.approx(
            json.loads(mauve.stdout)[0]["values"]["mauve"]
        )
        diversity = invoke("score-diversity", run_dir, "--tokenizer", scorer_dir, "--json")
        values = json.loads(diversity.stdout)[0]["values"]
        for name in ("distinct_4", "rep_4", "self_bleu"):
            assert metrics[name]["value"] == pytest.approx(values[name])
        assert metrics["mauve"]["paper"] is None
    assert "MAUVE" in result.stderr and "self-BLEU" in result.stderr  # the table's columns


def test_parse_metrics_maps_names_to_scorers_in_a_fixed_order():
    assert parse_metrics("diversity,ppl") == ["gen_ppl", "diversity"]
    assert parse_metrics("mauve, rouge,bleu") == ["bleu", "rouge", "mauve"]
    with pytest.raises(UserError, match="comma-separated list"):
        parse_metrics("ppl,bleurt")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metrics", "ppl,mauve"], "--metrics mauve needs --references"),
        (["--metrics", "ppl", "--references", "human.txt"], "only used by MAUVE"),
        (["--metrics", "perplexity"], "comma-separated list"),
        (["--metrics", "mauve", "--references", "missing.txt"], "--references not found"),
    ],
)
def test_bad_eval_metrics_input_is_one_sentence_and_exit_2(
    tmp_path,
    unconditional,  # noqa: F811
    scorer_dir,  # noqa: F811
    args,
    message,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "human.txt").write_text("a b c\n" * 12)
    result = run_eval(unconditional, scorer_dir, tmp_path / "ev", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "ev").exists()
