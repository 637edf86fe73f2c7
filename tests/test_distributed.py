"""Data-parallel sample and score-ppl: 2 CPU processes (gloo) under `accelerate launch` give
what one process gives: byte-identical samples.jsonl, the same Gen PPL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl import records
from elfctl.cli import app
from elfctl.distributed import Processes, batches, my_share
from tests.conftest import build_word_tokenizer
from tests.gpt2_fixture import build_tiny_gpt2
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()


def launch(*args, cwd):
    """`accelerate launch` with 2 CPU processes (gloo) of `python -m elfctl ARGS`."""
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "elfctl", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tok = build_word_tokenizer(root / "tok")
    state = {k: 10 * v for k, v in official_state(0, V=len(tok)).items()}  # varied samples
    ckpt = write_official(root / "checkpoint_300", state, step=300)
    return ckpt, root / "tok", build_tiny_gpt2(root / "gpt2")


def sample_args(files, out, batch_size):
    ckpt, tok, _ = files
    args = ["sample", "--repo", ckpt, "--tokenizer", tok, "--num-samples", 11, "--length", 8]
    return args + ["--steps", 3, "--seed", 5, "--batch-size", batch_size, "--cpu", "--out", out]


def test_each_process_takes_every_nth_batch():
    work = batches(range(11), 4)
    assert work == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    shares = [my_share(work, Processes(rank, 2)) for rank in range(2)]
    assert shares == [[work[0], work[2]], [work[1]]]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(11))


@pytest.mark.slow
def test_two_processes_at_batch_2_write_the_same_samples_as_one_at_batch_4(tmp_path, files):
    one = runner.invoke(app, [str(a) for a in sample_args(files, tmp_path / "one", 4)])
    assert one.exit_code == 0, one.output
    two = launch(*sample_args(files, tmp_path / "two", 2), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    output = two.stdout + two.stderr
    assert output.count("wrote 11 samples") == 1  # only the main process speaks
    assert "2 processes on cpu" in output
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (
        tmp_path / "one" / "samples.jsonl"
    ).read_bytes()
    rows = records.read_samples(tmp_path / "two")
    assert [r["id"] for r in rows] == list(range(11)) and len({r["text"] for r in rows}) > 1
    info = records.read_run_json(tmp_path / "two")
    assert info["processes"] == 2 and len(info["samples_per_s_per_process"]) == 2
    assert info["samples_per_s"] > 0 and info["sampled_samples"] == 11
    assert records.read_run_json(tmp_path / "one")["processes"] == 1
    assert not list((tmp_path / "two").glob(".unfinished*"))

    # score-ppl on 2 processes: the same token-weighted sums as on one.
    scorer = files[2]
    single = runner.invoke(
        app, ["score-ppl", str(tmp_path / "one"), "--model", str(scorer), "--cpu", "--json"]
    )
    assert single.exit_code == 0, single.output
    (expected,) = json.loads(single.stdout)
    both = launch(
        "score-ppl", tmp_path / "two", "--model", scorer, "--batch-size", 2, "--cpu", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert both.returncode == 0, both.stdout + both.stderr
    (record,) = json.loads(both.stdout)  # one record, from the main process only
    assert record["processes"] == 2
    for key in ("n_tokens", "n_samples", "n_empty"):
        assert record["values"][key] == expected["values"][key]
    for key in ("ppl", "nll_sum", "entropy"):
        assert record["values"][key] == pytest.approx(expected["values"][key], rel=1e-6)
    (written,) = records.read_metrics(tmp_path / "two")  # one metrics line, not two
    assert written["values"]["ppl"] == record["values"]["ppl"]


@pytest.mark.slow
def test_eval_with_seeds_on_two_processes_equals_one_process(tmp_path, files):
    import yaml

    ckpt, tok, scorer = files
    config = {
        "name": "test-ddp",
        "encoder": {"tokenizer": str(tok)},
        "data": {"conditional": False, "max_length": 8, "pad_token": "eos"},
        "sampling": [
            {"name": "sde-a", "method": "sde", "steps": 3, "num_samples": 5, "batch_size": 2}
        ],
    }
    config_file = tmp_path / "test-ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = ["eval", "--config", config_file, "--repo", ckpt, "--scorer", scorer, "--cpu"]
    args += ["--seeds", "0,1", "--json"]
    one = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / "one"]])
    assert one.exit_code == 0, one.output
    two = launch(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    summary = json.loads(two.stdout)  # printed once, by the main process
    assert summary == json.loads((tmp_path / "two" / "eval.json").read_text())
    assert summary["processes"] == 2
    (row_two,) = summary["rows"]
    (row_one,) = json.loads(one.stdout)["rows"]
    for seed in (0, 1):
        same = [
            tmp_path / run / "sde-a" / f"seed_{seed}" / "samples.jsonl" for run in ("one", "two")
        ]
        assert same[0].read_bytes() == same[1].read_bytes()
        assert len(records.read_metrics(same[1].parent)) == 1
    for name in ("gen_ppl", "entropy"):
        assert row_two["metrics"][name]["per_seed"] == pytest.approx(
            row_one["metrics"][name]["per_seed"], rel=1e-6
        )
        assert row_two["metrics"][name]["stderr"] == pytest.approx(
            row_one["metrics"][name]["stderr"], rel=1e-5
        )


@pytest.mark.slow
def test_a_sweep_on_two_processes_writes_the_table_of_one_process(tmp_path, files):
    ckpt, tok, scorer = files
    args = ["sweep", "--repo", ckpt, "--tokenizer", tok, "--steps", "2,3", "--seeds", "0,1"]
    args += ["--num-samples", 5, "--length", 8, "--batch-size", 2, "--scorer", scorer, "--cpu"]
    one = runner.invoke(app, [str(a) for a in args + ["--out", tmp_path / "one"]])
    assert one.exit_code == 0, one.output
    two = launch(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    tables = [json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("one", "two")]
    for row_one, row_two in zip(tables[0]["rows"], tables[1]["rows"], strict=True):
        for name, entry in row_one["metrics"].items():
            assert row_two["metrics"][name]["values"] == pytest.approx(entry["values"], rel=1e-6)
        for d_one, d_two in zip(row_one["run_dirs"], row_two["run_dirs"], strict=True):
            assert (Path(d_one) / "samples.jsonl").read_bytes() == (
                Path(d_two) / "samples.jsonl"
            ).read_bytes()
    assert (tmp_path / "two" / "sweep.png").exists()
