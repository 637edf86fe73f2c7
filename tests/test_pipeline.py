"""Raw text through `datasets`: the cache, num_proc, packing, and the launch contract.

Corpora, tokenizers and datasets are built here and read through the real code paths
(`load_dataset("text" | "json")`, `AutoTokenizer.from_pretrained`, `save_to_disk` /
`load_from_disk`); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import DataConfig, resolve
from elfctl.data import MANIFEST, load_corpus, load_rows, packed_stream
from elfctl.errors import UserError
from tests.conftest import WORDS, build_word_tokenizer

EOS = 1


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    """Each test its own data cache (the default lives under $ELFCTL_CACHE)."""
    monkeypatch.setattr("elfctl.data.pipeline.default_cache_dir", lambda: tmp_path / "data-cache")


@pytest.fixture
def tokenizer(tmp_path):
    return build_word_tokenizer(tmp_path / "tokenizer")


class CountingTokenizer:
    """The real tokenizer, counting the calls that tokenize (the cache must make them zero):
    its own `__call__` and its Rust backend's batch encoders."""

    def __init__(self, tokenizer):
        self.inner, self.calls = tokenizer, 0
        self.backend_tokenizer = _CountingBackend(tokenizer.backend_tokenizer, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _CountingBackend:
    def __init__(self, backend, owner):
        self.backend, self.owner = backend, owner

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if name.startswith("encode"):

            def counted(*args, **kwargs):
                self.owner.calls += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def write_corpus(folder: Path, files: int = 2, lines: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        text = "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 9))) for _ in range(lines)
        )
        (folder / f"part{f}.txt").write_text(text + "\n")
    return folder


def slow_documents(folder: Path, tokenizer) -> list[list[int]]:
    """One document per non-blank line, files in sorted order: the obvious way."""
    docs = []
    for file in sorted(folder.rglob("*.txt")):
        for line in file.read_text().splitlines():
            if line.strip():
                docs.append(tokenizer(line.strip(), add_special_tokens=False)["input_ids"])
    return docs


def slow_pack(docs: list[list[int]], max_length: int) -> list[list[int]]:
    """eos between documents, then consecutive cuts of max_length; the rest last."""
    stream = []
    for i, doc in enumerate(docs):
        stream += ([EOS] if i else []) + list(doc)
    return [stream[i : i + max_length] for i in range(0, len(stream), max_length)]


# ---------------------------------------------------------------------------
# The cache


def test_a_second_run_reuses_the_cache_and_does_not_call_the_tokenizer(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    first = CountingTokenizer(tokenizer)
    built = load_corpus(str(corpus), DataConfig(), first)
    assert built.prepared.built and first.calls > 0
    again = CountingTokenizer(tokenizer)
    reused = load_corpus(str(corpus), DataConfig(), again)
    assert not reused.prepared.built and again.calls == 0
    assert reused.prepared.folder == built.prepared.folder
    assert reused.rows["input_ids"] == built.rows["input_ids"] == slow_documents(corpus, tokenizer)
    # memory-mapped from the cache folder, not held in Python lists
    assert all(str(built.prepared.folder) in f["filename"] for f in reused.rows.cache_files)


def _rebuilds(source, cfg, tokenizer) -> bool:
    counting = CountingTokenizer(tokenizer)
    out = load_corpus(source, cfg, counting)
    return out.prepared.built and counting.calls > 0


def test_changing_a_file_invalidates_the_cache(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)
    assert not _rebuilds(str(corpus), DataConfig(), tokenizer)
    part = corpus / "part1.txt"
    part.write_text(part.read_text() + "the red dog\n")
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)
    assert load_rows(str(corpus), DataConfig(), tokenizer)["target"][-1] == "the red dog"
    # same size and content, new mtime: rebuilt too (the key covers path, size, mtime)
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)
    (corpus / "part2.txt").write_text("a cat\n")  # a new file in the folder
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)


def test_changing_the_tokenizer_invalidates_the_cache(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)
    other = build_word_tokenizer(tmp_path / "other", words=list(reversed(WORDS)))
    assert _rebuilds(str(corpus), DataConfig(), other)
    assert load_rows(str(corpus), DataConfig(), other)["input_ids"] == slow_documents(corpus, other)


def test_changing_max_length_invalidates_packed_rows_but_not_unpacked_ones(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    packed = DataConfig(packing=True, max_length=8)
    assert _rebuilds(str(corpus), packed, tokenizer)
    assert _rebuilds(str(corpus), replace(packed, max_length=12), tokenizer)
    assert not _rebuilds(str(corpus), replace(packed, max_length=8), tokenizer)
    # unpacked rows are whole documents: collation cuts them, so max_length is not in the key
    assert _rebuilds(str(corpus), DataConfig(max_length=8), tokenizer)
    assert not _rebuilds(str(corpus), DataConfig(max_length=12), tokenizer)


def test_settings_that_change_rows_invalidate_the_cache(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus")
    assert _rebuilds(str(corpus), DataConfig(), tokenizer)
    assert _rebuilds(str(corpus), DataConfig(text_mode="file"), tokenizer)
    assert _rebuilds(str(corpus), DataConfig(packing=True), tokenizer)
    # how the rows are made is not what they are: num_proc shares the entry
    assert not _rebuilds(str(corpus), DataConfig(num_proc=2), tokenizer)


def test_num_proc_2_tokenizes_the_same_rows_in_the_same_order(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus", files=3, lines=50)
    one = load_rows(str(corpus), DataConfig(cache_dir=str(tmp_path / "c1")), tokenizer)
    # two tokenizer processes, in a fresh interpreter: forking this one (which may hold
    # JAX's threads from other tests) could deadlock
    build = (
        "import elfctl.data.pipeline as p; from elfctl.config import DataConfig; "
        "from elfctl.data import load_corpus; from transformers import AutoTokenizer; "
        "p.MAP_BATCH = 8; "  # several batches per process
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tokenizer')!r}); "
        f"cfg = DataConfig(num_proc=2, cache_dir={str(tmp_path / 'c2')!r}); "
        f"assert load_corpus({str(corpus)!r}, cfg, tok).prepared.built"
    )
    subprocess.run([sys.executable, "-c", build], check=True, timeout=600)
    two = load_corpus(
        str(corpus), DataConfig(num_proc=2, cache_dir=str(tmp_path / "c2")), tokenizer
    )
    assert not two.prepared.built  # what the two processes wrote
    assert two.rows["input_ids"] == one["input_ids"] == slow_documents(corpus, tokenizer)


def test_tokenization_reports_progress_in_documents_and_tokens(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr("elfctl.data.pipeline.CHUNK_BYTES", 64)  # many small chunks
    monkeypatch.setattr("elfctl.data.pipeline.MAP_BATCH", 8)
    corpus = write_corpus(tmp_path / "corpus", files=2, lines=40)
    calls = []
    load_corpus(str(corpus), DataConfig(), tokenizer, on_progress=lambda *a: calls.append(a))
    docs = slow_documents(corpus, tokenizer)
    raw_lines = sum(len(f.read_text().splitlines()) for f in corpus.glob("*.txt"))
    assert calls[0] == (0, raw_lines, 0)
    assert calls[-1] == (raw_lines, raw_lines, sum(map(len, docs)))
    assert len(calls) > 3 and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_glob_sources_and_mixed_txt_jsonl_folders_keep_sorted_file_order(tmp_path, tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat\n")
    (folder / "b.jsonl").write_text(json.dumps({"text": "a dog"}) + "\n")
    (folder / "c.txt").write_text("big bird\n")
    rows = load_rows(str(folder), DataConfig(), tokenizer)
    assert rows["target"] == ["the cat", "a dog", "big bird"]
    rows = load_rows(str(folder / "*.txt"), DataConfig(), tokenizer)
    assert rows["target"] == ["the cat", "big bird"]
    with pytest.raises(UserError, match="matches no .txt or .jsonl files"):
        load_rows(str(folder / "*.md"), DataConfig(), tokenizer)


def test_an_interrupted_build_leaves_no_cache_entry(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"text": 3}\n')
    with pytest.raises(UserError, match="line 2"):
        load_rows(str(tmp_path / "bad.jsonl"), DataConfig(), tokenizer)
    cache = tmp_path / "data-cache"
    assert not cache.exists() or not any(cache.iterdir())


# ---------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("batch", [1, 2, 5, 1000])
def test_packed_stream_does_not_depend_on_how_documents_are_batched(batch):
    import pyarrow as pa

    rng = random.Random(batch)
    docs = [[rng.randint(3, 20) for _ in range(rng.randint(0, 11))] for _ in range(40)]
    batches = [pa.array(docs[i : i + batch], pa.list_(pa.int32())) for i in range(0, 40, batch)]
    rows = [row for block in packed_stream(iter(batches), 7, EOS) for row in block.to_pylist()]
    assert rows == slow_pack(docs, 7)


def test_packed_rows_are_max_length_and_hold_every_token_once_in_order(tmp_path, tokenizer):
    corpus = write_corpus(tmp_path / "corpus", files=3, lines=60)
    cfg = DataConfig(packing=True, max_length=16)
    rows = load_rows(str(corpus), cfg, tokenizer)["input_ids"]
    docs = slow_documents(corpus, tokenizer)
    assert rows == slow_pack(docs, 16)
    assert all(len(r) == 16 for r in rows[:-1]) and 1 <= len(rows[-1]) <= 16
    stream = [t for r in rows for t in r]
    assert stream.count(EOS) == len(docs) - 1  # one eos between consecutive documents
    assert sum(map(len, docs)) + len(docs) - 1 == len(stream)


def test_empty_jsonl_documents_still_get_their_separators(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat", "", "a dog"]))
    rows = load_rows(str(path), DataConfig(packing=True, max_length=3), tokenizer)
    assert rows["input_ids"] == [[3, 5, EOS], [EOS, 4, 6]]


def test_tokenized_datasets_are_packed_and_cached_too(tmp_path, tokenizer):
    from datasets import Dataset

    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    Dataset.from_dict({"input_ids": docs}).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(packing=True, max_length=4)
    built = load_corpus(str(tmp_path / "saved"), cfg, tokenizer)
    assert built.rows["input_ids"] == slow_pack(docs, 4) and built.prepared.built
    assert not load_corpus(str(tmp_path / "saved"), cfg, tokenizer).prepared.built
    unpacked = load_rows(str(tmp_path / "saved"), DataConfig(), tokenizer)
    assert unpacked["input_ids"] == docs  # without packing: one document, one row, as before


def test_packing_conditional_data_is_refused(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"input": "the cat", "target": "a dog"}) + "\n")
    with pytest.raises(UserError, match="conditional pairs are never packed"):
        load_rows(str(path), DataConfig(conditional=True, packing=True), tokenizer)


def test_cli_refuses_packing_on_conditional_data_and_leaves_the_run_dir_untouched(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", "--preset", "tiny-translate", "--run-dir", str(run), "--cpu"]
        + ["--set", "data.packing=true", "--max-steps", "1"],
    )
    assert result.exit_code == 2, result.output
    assert "conditional pairs are never packed" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not run.exists()


# ---------------------------------------------------------------------------
# Training on prepared rows


SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "optim.warmup_steps=2",
    "data.packing=true",
]


def grammar_corpus(folder: Path, lines: int = 400) -> Path:
    """Raw text in the tiny preset's own language (its tokenizer knows every word)."""
    from elfctl.testbed.grammar import generate_corpus

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grammar.txt").write_text("\n".join(generate_corpus(lines, seed=5)) + "\n")
    return folder


def test_resumed_training_on_packed_rows_continues_the_same_rows(tmp_path):
    from elfctl.training import Trainer, make_accelerator, train
    from tests.test_train import assert_same_weights, final_weights

    corpus = grammar_corpus(tmp_path / "corpus")

    def config(steps):
        return resolve("tiny", sets=SMALL + [f"data.train={corpus}", f"train.max_steps={steps}"])

    train(config(4), tmp_path / "straight", accelerator=make_accelerator(cpu=True))
    train(config(2), tmp_path / "halves", accelerator=make_accelerator(cpu=True))
    resumed = Trainer(config(4), tmp_path / "halves", make_accelerator(cpu=True))
    assert not resumed.prepared.built  # the resumed run reads the rows from the cache
    seen = []
    original = resumed._micro_batches

    def recording():
        batches = original()
        seen.extend(b["input_ids"] for b in batches)
        return batches

    resumed._micro_batches = recording
    resumed.fit()
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "halves"))
    # steps 3 and 4 of the straight order, row for row
    fresh = Trainer(config(4), tmp_path / "fresh", make_accelerator(cpu=True))
    expected = [fresh._micro_batches()[0]["input_ids"] for _ in range(4)][2:]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_tokenize_once(tmp_path):
    corpus = grammar_corpus(tmp_path / "corpus")
    cache = tmp_path / "launch-cache"
    sets = SMALL + [f"data.train={corpus}", f"data.cache_dir={cache}"]
    launcher = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        + ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "elfctl", "train"]
        + ["--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--max-steps", "2", "--cpu"]
        + [x for s in sets for x in ("--set", s)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # the main process tokenized; the other (which may not build) read the same entry
    assert output.count("tokenized now") == 1 and "reused from the cache" not in output
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    assert "done: step 2" in output


@pytest.mark.slow
def test_a_killed_run_on_packed_rows_resumes_on_the_same_rows(tmp_path):
    import signal
    import time

    from elfctl.model import list_step_dirs
    from tests.test_train import assert_same_weights, final_weights, run_cli

    corpus = grammar_corpus(tmp_path / "corpus")
    cache = tmp_path / "cli-cache"

    def args(run):
        sets = SMALL + [f"data.train={corpus}", f"data.cache_dir={cache}"]
        sets += ["train.checkpoint_every=1", "train.keep_checkpoints=10"]
        return ["train", "--preset", "tiny", "--run-dir", str(run), "--max-steps", "6", "--cpu"] + [
            x for s in sets for x in ("--set", s)
        ]

    proc = run_cli(args(tmp_path / "straight"), tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    killed = tmp_path / "killed"
    proc = run_cli(args(killed), tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and len(list_step_dirs(killed / "checkpoints")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = list_step_dirs(killed / "checkpoints")
    assert survived and int(survived[-1].name.split("_")[1]) < 6
    proc = run_cli(args(killed), tmp_path)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "resuming from step" in output and "reused from the cache" in output
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(killed))


def test_blank_files_give_no_rows_and_a_corpus_of_them_is_a_user_error(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("\n\n")
    (tmp_path / "c" / "b.txt").write_text("the cat\n")
    assert load_rows(str(tmp_path / "c"), DataConfig(), tokenizer)["target"] == ["the cat"]
    (tmp_path / "c" / "b.txt").write_text("  \n")
    with pytest.raises(UserError, match="holds no text examples"):
        load_rows(str(tmp_path / "c"), DataConfig(), tokenizer)
