"""Resumable sampling: a `sample` run killed with SIGKILL at any moment and started again
continues from its last finished batch, never samples a finished batch twice, and ends
with the same samples.jsonl as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.model import ELF
from elfctl.runs import UNFINISHED_DIR
from tests.conftest import build_word_tokenizer
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()
STEPS, BATCH, N = 3, 2, 9  # 5 batches (the last holds one sample), 4 model calls each

# Run the CLI in a fresh interpreter that SIGKILLs itself at a chosen moment:
#   forward K   at the K-th model call (in the middle of a batch)
#   rename K    just before the K-th finished batch file is renamed into place
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    mode, k = sys.argv[1], int(sys.argv[2])
    count = [0]

    def tick():
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "forward":
        from elfctl.model import ELF
        forward = ELF.forward
        def counted(self, *args, **kwargs):
            tick()
            return forward(self, *args, **kwargs)
        ELF.forward = counted
    else:
        replace = os.replace
        def killing_replace(src, dst):
            if os.path.basename(str(dst)).startswith("batch_"):
                tick()
            return replace(src, dst)
        os.replace = killing_replace
    sys.argv = ["elfctl", *sys.argv[3:]]
    from elfctl.cli import main
    main()
    """
)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tok = build_word_tokenizer(root / "tok")
    state = {k: 10 * v for k, v in official_state(0, V=len(tok)).items()}  # varied samples
    ckpt = write_official(root / "checkpoint_300", state, step=300)
    return ckpt, root / "tok"


def sample_args(model_files, out, *extra):
    ckpt, tok = model_files
    args = ["--repo", ckpt, "--tokenizer", tok, "--num-samples", N, "--batch-size", BATCH]
    args += ["--length", 8, "--steps", STEPS, "--seed", 3, "--out", out, *extra]
    return [str(a) for a in args]


def killed_run(model_files, out, mode, k):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, mode, str(k), "sample", *sample_args(model_files, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr  # killed, not finished


class CountCalls:
    """Counts the rows of every model call made in this process."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        forward = ELF.forward

        def counted(module, inputs, *args, **kwargs):
            self.rows.append(inputs.shape[0])
            return forward(module, inputs, *args, **kwargs)

        monkeypatch.setattr(ELF, "forward", counted)


def finished_batches(out):
    return sorted(p.name for p in (out / UNFINISHED_DIR).glob("batch_*.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, k, survivors",
    [
        ("forward", 2 * (STEPS + 1) + 2, 2),  # in the middle of the third batch
        ("rename", 4, 3),  # the fourth batch sampled and written, not yet renamed
        ("forward", 1, 0),  # before anything was finished
    ],
)
def test_a_killed_run_resumes_without_redoing_finished_batches_and_ends_identical(
    tmp_path, model_files, monkeypatch, mode, k, survivors
):
    straight = runner.invoke(app, ["sample", *sample_args(model_files, tmp_path / "straight")])
    assert straight.exit_code == 0, straight.output

    out = tmp_path / "killed"
    killed_run(model_files, out, mode, k)
    assert not (out / "samples.jsonl").exists()  # an unfinished run never looks finished
    survived = finished_batches(out)
    assert len(survived) == survivors
    for name in survived:  # every finished batch file is whole
        lines = (out / UNFINISHED_DIR / name).read_text().splitlines()
        assert len(lines) == BATCH and all(json.loads(line)["text"] is not None for line in lines)

    calls = CountCalls(monkeypatch)
    resumed = runner.invoke(app, ["sample", *sample_args(model_files, out)])
    assert resumed.exit_code == 0, resumed.output
    pending = N - BATCH * survivors
    if survivors:
        assert f"{BATCH * survivors} of {N} samples already done" in resumed.output
    # Only the unfinished batches are sampled: STEPS + 1 calls each (steps + decode).
    batches = -(-pending // BATCH)
    assert len(calls.rows) == batches * (STEPS + 1) and sum(calls.rows) == pending * (STEPS + 1)
    assert (out / "samples.jsonl").read_bytes() == (
        tmp_path / "straight" / "samples.jsonl"
    ).read_bytes()
    assert not (out / UNFINISHED_DIR).exists()
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_samples"] == N - pending and info["sampled_samples"] == pending


def test_resume_flag_continues_and_other_settings_are_refused_leaving_everything(
    tmp_path, model_files
):
    out = tmp_path / "killed"
    killed_run(model_files, out, "forward", STEPS + 2)  # one batch finished
    before = {p.name: p.read_bytes() for p in (out / UNFINISHED_DIR).iterdir()}

    other = runner.invoke(app, ["sample", *sample_args(model_files, out, "--gamma", 1.0)])
    assert other.exit_code == 2
    assert "holds an unfinished run with other settings (sampler)" in other.output
    assert "Traceback" not in other.output and len(other.output.strip().splitlines()) == 1
    other_grid = runner.invoke(
        app, ["sample", *sample_args(model_files, out, "--grid", "per-batch")]
    )
    assert other_grid.exit_code == 2 and "(batch_size, grid)" in other_grid.output
    assert {p.name: p.read_bytes() for p in (out / UNFINISHED_DIR).iterdir()} == before

    resumed = runner.invoke(app, ["sample", *sample_args(model_files, out, "--resume")])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and (out / "samples.jsonl").exists()
    finished = runner.invoke(app, ["sample", *sample_args(model_files, out, "--resume")])
    assert finished.exit_code == 2 and "already holds samples.jsonl" in finished.output


def test_resume_without_an_unfinished_run_and_resume_with_force_are_refused(tmp_path, model_files):
    nothing = runner.invoke(
        app, ["sample", *sample_args(model_files, tmp_path / "new", "--resume")]
    )
    assert nothing.exit_code == 2 and "holds no unfinished sample run" in nothing.output
    assert not (tmp_path / "new" / "samples.jsonl").exists()
    both = runner.invoke(
        app, ["sample", *sample_args(model_files, tmp_path / "x", "--resume", "--force")]
    )
    assert both.exit_code == 2 and "pass one of them" in both.output


def test_force_starts_an_unfinished_run_over(tmp_path, model_files, monkeypatch):
    out = tmp_path / "killed"
    killed_run(model_files, out, "forward", STEPS + 2)
    calls = CountCalls(monkeypatch)
    forced = runner.invoke(
        app, ["sample", *sample_args(model_files, out, "--gamma", 1.0, "--force")]
    )
    assert forced.exit_code == 0, forced.output
    assert sum(calls.rows) == N * (STEPS + 1)  # everything sampled again
    assert json.loads((out / "run.json").read_text())["sampler"]["gamma"] == 1.0
