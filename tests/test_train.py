"""The training loop: exact resume, kill safety, run directories, several processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elfctl.config import resolve
from elfctl.errors import UserError
from elfctl.model import list_step_dirs, load_checkpoint
from elfctl.training import Trainer, make_accelerator, plan_batches, read_training_state, train

SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=5",
    "optim.warmup_steps=2",
]


def small_config(*extra):
    return resolve("tiny", sets=SMALL + list(extra))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = list_step_dirs(run_dir / "checkpoints")[-1]
    raw = torch.load(newest / "training_state" / "model_raw.pt", weights_only=True)
    return {"raw": raw, "ema": load_file(str(newest / "model.safetensors"))}


def assert_same_weights(a, b):
    for kind in ("raw", "ema"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            torch.testing.assert_close(a[kind][name], b[kind][name], atol=1e-6, rtol=1e-6)


def test_resumed_training_equals_straight_training(tmp_path):
    straight = tmp_path / "straight"
    train(small_config("train.max_steps=4"), straight, accelerator=make_accelerator(cpu=True))
    halves = tmp_path / "halves"
    train(small_config("train.max_steps=2"), halves, accelerator=make_accelerator(cpu=True))
    result = train(
        small_config("train.max_steps=4"), halves, accelerator=make_accelerator(cpu=True)
    )
    assert result.resumed_from == 2 and result.step == 4
    assert_same_weights(final_weights(straight), final_weights(halves))
    log = [json.loads(x) for x in (halves / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert {"step", "epoch", "loss", "l2", "ce", "lr", "grad_norm", "tokens_per_s"} <= set(log[0])


def test_training_state_loads_onto_the_numbered_cpu_device_of_a_multi_process_run(tmp_path):
    # Accelerate names the devices of a 2-process CPU run cpu:0 and cpu:1; torch.load's
    # map_location and safetensors refuse such a device (issue: resume died on "cpu:0").
    run = tmp_path / "run"
    train(small_config("train.max_steps=2"), run, accelerator=make_accelerator(cpu=True))
    checkpoint = list_step_dirs(run / "checkpoints")[-1]
    state = read_training_state(checkpoint, 0, 1, torch.device("cpu", 1))
    assert state.raw_weights.keys() == final_weights(run)["raw"].keys()
    assert {t.device for t in state.raw_weights.values()} == {torch.device("cpu")}
    assert (state.epoch, state.position) == (0, 16)  # 2 steps of 8 rows into epoch 0


def test_run_dir_holds_config_log_and_loadable_checkpoints_with_retention(tmp_path):
    run = tmp_path / "run"
    cfg = small_config(
        "train.max_steps=6",
        "train.keep_checkpoints=2",
        "train.sample_every=6",
        "train.sample_count=3",
        "sampling.0.steps=2",
    )
    train(cfg, run, accelerator=make_accelerator(cpu=True))
    periodic = (run / "samples" / "step_00000006.jsonl").read_text().splitlines()
    assert len(periodic) == 3 and all(json.loads(r)["meta"]["step"] == 6 for r in periodic)
    steps = [p.name for p in list_step_dirs(run / "checkpoints")]
    assert steps == ["step_00000004", "step_00000006"]
    assert (run / "config.yaml").is_file()
    ckpt = load_checkpoint(str(run))
    assert ckpt.step == 6 and ckpt.config.model.hidden_size == 32
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())


def test_a_different_config_does_not_silently_resume(tmp_path):
    run = tmp_path / "run"
    train(small_config("train.max_steps=2"), run, accelerator=make_accelerator(cpu=True))
    with pytest.raises(UserError, match="model.depth"):
        Trainer(small_config("train.max_steps=4", "model.depth=3"), run, make_accelerator(cpu=True))
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(small_config(), run, make_accelerator(cpu=True), resume="never")


def test_global_batch_is_micro_batch_times_processes_times_accumulation():
    cfg = small_config("train.global_batch=32", "train.micro_batch=4")
    assert plan_batches(cfg, 2) == (4, 4)
    assert plan_batches(small_config("train.global_batch=32"), 2) == (16, 1)
    with pytest.raises(UserError, match="not a multiple"):
        plan_batches(small_config("train.global_batch=30", "train.micro_batch=4"), 2)


def test_micro_batches_sharing_the_global_denominator_sum_to_the_full_batch_loss():
    """Why accumulation and data parallelism keep the single denominator."""
    from dataclasses import fields

    from elfctl.config import ObjectiveConfig
    from elfctl.training import Draws, elf_loss
    from tests.test_objective import make_case

    model, x, ids, cond, loss_mask, draws = make_case()
    cfg = ObjectiveConfig()
    full = elf_loss(model, x, ids, cond, loss_mask, draws, cfg, 0.05)
    full_grads = torch.autograd.grad(full.loss, list(model.parameters()))
    denominator = loss_mask.sum()
    total = 0
    for part in (slice(0, 2), slice(2, 6)):
        sub = Draws(**{f.name: getattr(draws, f.name)[part] for f in fields(Draws)})
        total = (
            total
            + elf_loss(
                model,
                x[part],
                ids[part],
                cond[part],
                loss_mask[part],
                sub,
                cfg,
                0.05,
                denominator=denominator,
            ).loss
        )
    torch.testing.assert_close(total, full.loss)
    for g_full, g_acc in zip(
        full_grads, torch.autograd.grad(total, list(model.parameters())), strict=True
    ):
        torch.testing.assert_close(g_full, g_acc, atol=1e-6, rtol=1e-5)


def run_cli(args, cwd, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "elfctl", *args],
        cwd=cwd,
        env=env or os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def cli_args(run_dir, steps, checkpoint_every=1):
    settings = SMALL + [f"train.checkpoint_every={checkpoint_every}"]
    sets = [x for s in settings for x in ("--set", s)]
    return [
        "train",
        "--preset",
        "tiny",
        "--run-dir",
        str(run_dir),
        "--max-steps",
        str(steps),
        "--cpu",
        *sets,
    ]


@pytest.mark.slow
def test_sigkill_loses_at_most_the_work_since_the_last_checkpoint(tmp_path):
    straight = tmp_path / "straight"
    proc = run_cli(cli_args(straight, 6), tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()

    killed = tmp_path / "killed"
    proc = run_cli(cli_args(killed, 6), tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and len(list_step_dirs(killed / "checkpoints")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = list_step_dirs(killed / "checkpoints")
    assert survived and int(survived[-1].name.split("_")[1]) < 6
    proc = run_cli(cli_args(killed, 6), tmp_path)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "resuming from step" in output
    assert_same_weights(final_weights(straight), final_weights(killed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(run_dir, steps, cwd, checkpoint_every=1):
    """`accelerate launch --multi_gpu --num_processes 2 -m elfctl train ... --cpu` (gloo on
    CPUs), in its own process group so that a kill reaches every process of the run."""
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",  # torchrun-style launch; --cpu below makes it gloo on CPUs
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "elfctl",
        *cli_args(run_dir, steps, checkpoint_every),
    ]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finished(proc, timeout=900) -> str:
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output
    return output


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_train_log_once_and_checkpoint_once(tmp_path):
    run = tmp_path / "ddp"
    output = finished(launch_two_processes(run, 2, tmp_path, checkpoint_every=100))
    assert output.count("done: step 2") == 1  # only the main process
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2]
    assert [p.name for p in list_step_dirs(run / "checkpoints")] == ["step_00000002"]
    state = list_step_dirs(run / "checkpoints")[0] / "training_state"
    assert sorted(p.name for p in state.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert "2 processes" in output


@pytest.mark.slow
def test_two_cpu_processes_killed_with_sigkill_resume_to_the_weights_of_a_straight_run(
    tmp_path,
):
    steps = 8
    straight = tmp_path / "straight"
    finished(launch_two_processes(straight, steps, tmp_path))

    # Finished at step 2, then continued with a higher --max-steps (the first case).
    killed = tmp_path / "killed"
    finished(launch_two_processes(killed, 2, tmp_path))
    proc = launch_two_processes(killed, steps, tmp_path)
    deadline = time.time() + 900
    while len(list_step_dirs(killed / "checkpoints")) < 4:
        assert proc.poll() is None, proc.communicate()[0]  # it resumed from step 2
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes
    proc.wait()
    survived = list_step_dirs(killed / "checkpoints")
    assert survived and 2 < int(survived[-1].name.split("_")[1]) < steps

    output = finished(launch_two_processes(killed, steps, tmp_path))
    assert "resuming from step" in output
    assert_same_weights(final_weights(straight), final_weights(killed))
    log = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]


def test_periodic_samples_of_a_conditional_run_are_conditioned_on_validation_sources(tmp_path):
    cfg = resolve(
        "tiny-translate",
        sets=[s for s in SMALL if not s.startswith("train.checkpoint")]
        + [
            "train.max_steps=2",
            "train.sample_every=2",
            "train.sample_count=3",
            "sampling.0.steps=2",
        ],
    )
    train(cfg, tmp_path / "run", accelerator=make_accelerator(cpu=True))
    rows = [
        json.loads(r)
        for r in (tmp_path / "run" / "samples" / "step_00000002.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 3
    assert all(r["condition"] and r["reference"] for r in rows)
