"""Streamed training rows: exact resume, epochs, packing, and the refusals.

Streams are real `load_dataset(..., streaming=True)` streams over dataset folders built
here: the same call that streams a hub id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import DataConfig, resolve
from elfctl.data import RowStream, check_exact_resume
from elfctl.errors import UserError
from tests.conftest import build_word_tokenizer
from tests.test_pipeline import EOS, slow_pack


@pytest.fixture
def tokenizer(tmp_path):
    return build_word_tokenizer(tmp_path / "tokenizer")


def text_repo(folder: Path, texts: list[str], shards: int = 1) -> Path:
    """A dataset repo of jsonl shards with a `text` field (what load_dataset streams)."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // shards)
    for s in range(shards):
        lines = texts[s * per : (s + 1) * per]
        (folder / f"train-{s:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in lines)
        )
    return folder


PHRASES = ["the cat", "a dog", "big bird"]
TEXTS = [" ".join(PHRASES[i % 3] for _ in range(1 + i % 4)) for i in range(11)]


def ids_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("saved_after", [4, 15])  # in the first epoch, in the second
@pytest.mark.parametrize("packing", [False, True])
def test_a_restored_stream_continues_at_the_next_row_across_epochs(
    tmp_path, tokenizer, packing, saved_after
):
    repo = text_repo(tmp_path / "repo", TEXTS, shards=2)
    cfg = DataConfig(packing=packing, max_length=5)
    stream = RowStream(str(repo), cfg, tokenizer, "train")
    first = stream.take(saved_after)
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint stores
    straight = stream.take(30)  # runs past the end: epoch 2 starts over
    assert stream.epoch >= 1
    resumed = RowStream(str(repo), cfg, tokenizer, "train")
    resumed.load_state_dict(state)
    assert resumed.take(30) == straight
    # the reference: each epoch's documents in the order datasets streams that epoch
    from datasets import load_dataset

    reference = load_dataset(str(repo), split="train", streaming=True)
    docs = []
    for epoch in range(6):
        reference.set_epoch(epoch)
        docs += ids_of(tokenizer, [x["text"] for x in reference])
    got = [r["input_ids"] for r in first + straight]
    if packing:  # documents joined with eos (across epochs too), cut into rows
        assert got == slow_pack(docs, 5)[: len(got)]
    else:  # one document per row
        assert got == docs[: len(got)]


def test_two_processes_stream_disjoint_shares_that_cover_the_stream(tmp_path, tokenizer):
    repo = text_repo(tmp_path / "repo", TEXTS, shards=2)
    cfg = DataConfig()
    shares = [RowStream(str(repo), cfg, tokenizer, "train", rank, 2).take(5) for rank in (0, 1)]
    # two shards (files) for two processes: each process reads its own shard, in order
    docs = ids_of(tokenizer, TEXTS)
    assert [r["input_ids"] for r in shares[0]] == docs[0:5]
    assert [r["input_ids"] for r in shares[1]] == docs[6:11]


def test_pretokenized_streams_are_used_as_they_are(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    folder.mkdir()
    docs = [[5, 6], [7, 8, 9], [10]]
    (folder / "train.jsonl").write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    rows = RowStream(str(folder), DataConfig(packing=True, max_length=4), tokenizer, "train")
    assert [r["input_ids"] for r in rows.take(2)] == [[5, 6, EOS, 7], [8, 9, EOS, 10]]


def test_a_stream_that_cannot_be_restored_exactly_is_refused():
    from datasets import Dataset

    data = Dataset.from_dict({"text": [str(i) for i in range(2000)]})

    def buffered():  # a shuffle buffer's content is lost on restore
        return data.to_iterable_dataset().shuffle(seed=0, buffer_size=50)

    with pytest.raises(UserError, match="cannot resume the stream of buffered exactly"):
        check_exact_resume(buffered, "buffered")
    check_exact_resume(data.to_iterable_dataset, "plain")  # in order: exact


def test_a_stream_without_the_needed_columns_is_a_user_error(tmp_path, tokenizer):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"body": "the cat"}) + "\n")
    with pytest.raises(UserError, match="neither input_ids nor the text field"):
        RowStream(str(folder), DataConfig(), tokenizer, "train")


SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "optim.warmup_steps=2",
    "data.streaming=true",
]


def grammar_repo(folder: Path) -> Path:
    from elfctl.testbed.grammar import generate_corpus

    return text_repo(folder, generate_corpus(60, seed=9), shards=2)


def test_streamed_training_resumed_equals_straight_training(tmp_path):
    from elfctl.training import make_accelerator, train
    from tests.test_train import assert_same_weights, final_weights

    repo = grammar_repo(tmp_path / "repo")

    def config(steps, *extra):
        sets = SMALL + [f"data.train={repo}", f"train.max_steps={steps}", *extra]
        return resolve("tiny", sets=sets)

    for packing in ("false", "true"):
        straight, halves = tmp_path / f"straight-{packing}", tmp_path / f"halves-{packing}"
        extra = f"data.packing={packing}"
        train(config(6, extra), straight, accelerator=make_accelerator(cpu=True))
        train(config(2, extra), halves, accelerator=make_accelerator(cpu=True))
        result = train(config(6, extra), halves, accelerator=make_accelerator(cpu=True))
        assert result.resumed_from == 2
        assert_same_weights(final_weights(straight), final_weights(halves))
    state = sorted((halves / "checkpoints").glob("*/training_state/stream_rank0.json"))
    assert state and json.loads(state[-1].read_text())["epoch"] >= 0


def run_train(tmp_path, *sets):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--run-dir", str(run), "--cpu", "--max-steps", "1"]
    result = CliRunner().invoke(app, args + [x for s in sets for x in ("--set", s)])
    return result, run


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_cli_refuses_to_stream_a_save_to_disk_hub_layout_and_leaves_the_run_dir_untouched(
    tmp_path,
):
    from datasets import Dataset

    # a hub repo holding a save_to_disk folder (how the official rows are stored)
    repo = tmp_path / "repo"
    Dataset.from_dict({"input_ids": [[5, 6]] * 20}).save_to_disk(str(repo / "saved"))
    (repo / "card.json").write_text((repo / "saved" / "state.json").read_text())
    result, run = run_train(tmp_path, "data.streaming=true", f"data.train={repo}")
    assert "save_to_disk layout" in one_error_line(result)
    assert not run.exists()


def test_cli_streaming_without_max_steps_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--run-dir", str(run), "--cpu"]
    args += ["--set", "data.streaming=true", "--set", "train.max_steps=null"]
    result = CliRunner().invoke(app, args)
    assert "needs train.max_steps" in one_error_line(result)
    assert not run.exists()


def test_auto_latent_stats_of_a_stream_are_measured_on_its_first_rows(tmp_path):
    import numpy as np

    from elfctl.training import Trainer, make_accelerator
    from tests.test_autoconfig import slow_hidden_values

    repo = grammar_repo(tmp_path / "repo")
    sets = SMALL + [f"data.train={repo}", "data.streaming=true", "train.max_steps=2"]
    sets += ["encoder.latent_mean=auto", "encoder.latent_std=auto"]
    sets += ["encoder.latent_stats_rows=12"]
    cfg = resolve("tiny", sets=sets)
    trainer = Trainer(cfg, tmp_path / "run", make_accelerator(cpu=True))
    first = RowStream(str(repo), cfg.data, trainer.tokenizer, "train").take(12)
    values = slow_hidden_values([row["input_ids"] for row in first])
    assert trainer.auto_settings["rows"] == 12
    assert trainer.cfg.encoder.latent_mean == pytest.approx(values.mean(), rel=1e-5, abs=1e-8)
    assert trainer.cfg.encoder.latent_std == pytest.approx(values.std(), rel=1e-5)
    assert np.isfinite(trainer.encoder.latent_std)


def test_distill_refuses_a_streamed_dataset(tmp_path):
    from elfctl.training import DistillTrainer, make_accelerator, round_config

    cfg = resolve("tiny", sets=SMALL + ["data.streaming=true", "train.max_steps=2"])
    cfg.distill.teacher = str(tmp_path / "no-teacher")
    with pytest.raises(UserError, match="distill does not stream"):
        DistillTrainer(round_config(cfg, 1), tmp_path / "run", make_accelerator(cpu=True))


@pytest.mark.parametrize("kind", ["glob", "file", "txt"])
def test_local_files_and_globs_stream_and_resume_exactly(tmp_path, tokenizer, kind):
    repo = text_repo(tmp_path / "repo", TEXTS, shards=2)
    source = str(repo / "*.jsonl") if kind == "glob" else str(repo / "train-00.jsonl")
    texts = TEXTS if kind == "glob" else TEXTS[:6]
    if kind == "txt":  # one example per non-empty line
        source = str(tmp_path / "corpus.txt")
        Path(source).write_text("\n".join(t + "\n" for t in TEXTS))
        texts = TEXTS
    cfg = DataConfig(max_length=16)
    stream = RowStream(source, cfg, tokenizer, "train")
    check_exact_resume(lambda: RowStream(source, cfg, tokenizer, "train").stream, source)
    first = stream.take(4)
    state = json.loads(json.dumps(stream.state_dict()))
    rest = stream.take(len(texts) - 4)
    assert [row["input_ids"] for row in first + rest] == ids_of(tokenizer, texts)
    resumed = RowStream(source, cfg, tokenizer, "train")
    resumed.load_state_dict(state)
    assert resumed.take(len(texts) - 4) == rest


def test_cli_streams_a_local_glob_instead_of_calling_it_a_bad_hub_id(tmp_path):
    repo = grammar_repo(tmp_path / "repo")
    result, run = run_train(tmp_path, *SMALL, f"data.train={repo / '*.jsonl'}")
    assert result.exit_code == 0, result.output
    assert "Repo id" not in result.output and (run / "checkpoints").is_dir()
