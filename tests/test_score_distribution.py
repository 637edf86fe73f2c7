"""`score-diversity` and `score-mauve` end to end, with a tiny local GPT-2 for features."""

from __future__ import annotations

import json
import random
import re

import mauve
import numpy as np
import pytest
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.scoring import diversity
from elfctl.scoring import mauve as mauve_score
from tests.gpt2_fixture import build_tiny_gpt2

runner = CliRunner()

WORDS = "the a cat dog bird sat ran on in mat park red ball . ,".split()


def texts(n, seed, lengths=(3, 12)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths))) for _ in range(n)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    # mauve-text loads a model from a name only if the name contains "gpt2".
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("features") / "tiny-gpt2"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_run(directory, samples):
    records.write_samples(directory, [records.sample_row(i, t) for i, t in enumerate(samples)])
    return directory


# ----------------------------------------------------------------------------- score-diversity


def test_score_diversity_json_is_the_library_result_and_is_recorded(tmp_path):
    samples = texts(30, 0) + [""]
    write_run(tmp_path / "run", samples)
    result = invoke("score-diversity", tmp_path / "run", "--tokenizer", "words", "--json")
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    expected = diversity.score_diversity(samples, None, self_bleu_samples=1000, seed=0)
    values = record["values"]
    for n in (1, 2, 3, 4):
        assert values[f"distinct_{n}"] == pytest.approx(expected.distinct[str(n)])
        assert values[f"rep_{n}"] == pytest.approx(expected.rep[str(n)])
    assert values["self_bleu"] == pytest.approx(expected.self_bleu)
    assert values["entropy"] == pytest.approx(expected.entropy)
    assert (values["n_samples"], values["n_empty"]) == (30, 1)
    assert record["metric"] == "diversity" and record["scorer"] == "words" and record["n"] == 31
    assert records.read_metrics(tmp_path / "run") == [record]


def test_score_diversity_self_bleu_subsample_follows_its_seed(tmp_path, gpt2_dir):
    write_run(tmp_path / "run", texts(40, 1))
    args = ["score-diversity", tmp_path / "run", "--tokenizer", gpt2_dir, "--json"]
    a = json.loads(invoke(*args, "--self-bleu-samples", 8, "--seed", 1).stdout)[0]["values"]
    b = json.loads(invoke(*args, "--self-bleu-samples", 8, "--seed", 1).stdout)[0]["values"]
    c = json.loads(invoke(*args, "--self-bleu-samples", 8, "--seed", 2).stdout)[0]["values"]
    assert a["self_bleu_samples"] == 8 and a["self_bleu"] == b["self_bleu"]
    assert a["self_bleu"] != c["self_bleu"]
    assert a["distinct_1"] == c["distinct_1"]  # only self-BLEU is subsampled


# ----------------------------------------------------------------------------- MAUVE


def test_features_are_mauve_texts_own_features(gpt2_dir):
    from mauve.utils import featurize_tokens_from_model

    samples = texts(7, 2)
    model, tokenizer = mauve_score.load_featurizer(gpt2_dir)
    ours = mauve_score.featurize(samples, model, tokenizer, batch_size=3)
    tokens = [
        tokenizer.encode(t, return_tensors="pt", truncation=True, max_length=1024) for t in samples
    ]
    theirs = featurize_tokens_from_model(model, tokens, batch_size=1).numpy()
    assert ours.shape == theirs.shape == (7, model.config.n_embd)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_score_mauve_equals_a_direct_compute_mauve_call_on_the_same_texts(tmp_path, gpt2_dir):
    samples = texts(30, 3) + [""]
    references = texts(40, 4, lengths=(2, 6))
    write_run(tmp_path / "run", samples)
    (tmp_path / "refs.txt").write_text("\n".join(references) + "\n")
    result = invoke(
        "score-mauve", tmp_path / "run", "--references", tmp_path / "refs.txt", "--model",
        gpt2_dir, "--json", "--cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)

    direct = mauve.compute_mauve(
        p_text=samples, q_text=references, featurize_model_name=gpt2_dir, device_id=-1
    )
    values = record["values"]
    assert values["mauve"] == pytest.approx(direct.mauve, abs=1e-6)
    assert values["frontier_integral"] == pytest.approx(direct.frontier_integral, abs=1e-6)
    assert values["num_buckets"] == direct.num_buckets == 3
    assert (values["n_samples"], values["n_empty"], values["n_references"]) == (30, 1, 40)
    assert 0.0 < values["mauve"] < 1.0
    assert record["metric"] == "mauve" and record["scorer"] == gpt2_dir
    assert record["references"] == str(tmp_path / "refs.txt")
    assert records.read_metrics(tmp_path / "run") == [record]


def test_mauve_is_one_for_identical_sides_and_low_for_distinct_ones(gpt2_dir):
    model, tokenizer = mauve_score.load_featurizer(gpt2_dir)
    same = mauve_score.featurize(texts(40, 5), model, tokenizer)
    assert mauve_score.mauve_from_features(same, same).mauve == pytest.approx(1.0)
    far = np.asarray(same) + 100.0  # every sample far from every reference
    assert mauve_score.mauve_from_features(far, same).mauve < 0.1


def test_references_can_be_a_samples_file_a_jsonl_field_or_a_saved_dataset(tmp_path):
    from datasets import Dataset

    refs = texts(12, 6)
    write_run(tmp_path / "human", refs)
    assert mauve_score.read_references(str(tmp_path / "human")) == refs
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in refs))
    assert mauve_score.read_references(str(tmp_path / "h.jsonl"), "body", limit=5) == refs[:5]
    Dataset.from_dict({"text": refs}).save_to_disk(str(tmp_path / "ds"))
    assert mauve_score.read_references(str(tmp_path / "ds")) == refs


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--references .*not found"),
        ("blank", "holds no non-empty texts"),
        ("few_samples", "at least 10 non-empty samples"),
        ("few_references", "at least 10 non-empty references"),
    ],
)
def test_bad_mauve_input_is_one_sentence_and_exit_2(tmp_path, gpt2_dir, case, message):
    samples = texts(4 if case == "few_samples" else 20, 7)
    write_run(tmp_path / "run", samples)
    refs = tmp_path / "refs.txt"
    if case == "blank":
        write_run(tmp_path / "blank", ["", "", ""])
        refs = tmp_path / "blank"
    elif case != "missing":
        refs.write_text("\n".join(texts(5 if case == "few_references" else 20, 8)) + "\n")
    result = invoke("score-mauve", tmp_path / "run", "--references", refs, "--model", gpt2_dir)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr)
    assert not (tmp_path / "run" / records.METRICS_FILE).exists()


def test_score_mauve_without_references_is_a_usage_error(tmp_path):
    write_run(tmp_path / "run", texts(12, 9))
    result = invoke("score-mauve", tmp_path / "run")
    assert result.exit_code == 2
    assert "--references" in result.output


def test_featurize_ignores_batch_mates(gpt2_dir):
    model, tokenizer = mauve_score.load_featurizer(gpt2_dir)
    samples = texts(6, 10)
    alone = np.concatenate([mauve_score.featurize([t], model, tokenizer) for t in samples])
    together = mauve_score.featurize(samples, model, tokenizer, batch_size=6)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_a_missing_mauve_extra_is_one_sentence_naming_it(tmp_path, gpt2_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mauve", None)  # import fails
    write_run(tmp_path / "run", texts(12, 12))
    (tmp_path / "refs.txt").write_text("\n".join(texts(12, 13)) + "\n")
    result = invoke(
        "score-mauve", tmp_path / "run", "--references", tmp_path / "refs.txt", "--model", gpt2_dir
    )
    assert result.exit_code == 2
    assert "elfctl[mauve]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
