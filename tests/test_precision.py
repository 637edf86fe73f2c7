"""Which precision a run uses (elfctl/precision.py): the rule is pure, so no GPU is needed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import Config, preset_names, resolve
from elfctl.errors import UserError
from elfctl.precision import resolve_sampling, resolve_training, training_precision

OFFICIAL = ["owt-b", "owt-m", "owt-l", "xsum-b", "de-en-b", "owt-b-pd"]


def test_every_official_preset_defaults_to_bf16_on_a_gpu():
    for name in OFFICIAL:
        assert resolve(name).train.gpu_precision == "bf16", name
    assert {resolve(n).train.gpu_precision for n in preset_names()} <= {"bf16", "fp32"}
    assert Config().train.gpu_precision == "bf16"  # custom configs: the official recipe


def test_a_plain_run_on_a_gpu_takes_the_presets_default():
    p = resolve_training(None, None, resolve("owt-b").train.gpu_precision, "cuda", True)
    assert (p.mode, p.name) == ("bf16", "bf16-autocast")
    assert "train.gpu_precision" in p.reason
    fp32 = resolve_training(None, None, "fp32", "cuda", True)
    assert fp32.mode == "no" and fp32.name == "fp32"


def test_the_cpu_and_gpus_without_bf16_stay_fp32():
    assert resolve_training(None, None, "bf16", "cpu", False).mode == "no"
    assert resolve_training(None, None, "bf16", "cuda", False).mode == "no"
    assert resolve_training(None, None, "bf16", "mps", False).mode == "no"
    assert "no bf16" in resolve_training(None, None, "bf16", "cuda", False).reason


@pytest.mark.parametrize("env, mode", [("bf16", "bf16"), ("fp16", "fp16"), ("BF16", "bf16")])
def test_accelerates_choice_overrides_the_preset(env, mode):
    p = resolve_training(None, env, "fp32", "cuda", True)
    assert p.mode == mode and "Accelerate" in p.reason


def test_accelerates_no_is_not_a_choice_since_accelerate_launch_always_sets_it():
    # `accelerate launch` exports ACCELERATE_MIXED_PRECISION=no when nothing was chosen.
    assert resolve_training(None, "no", "bf16", "cuda", True).mode == "bf16"
    assert resolve_training(None, "no", "bf16", "cpu", False).mode == "no"


def test_the_mixed_precision_flag_wins_over_everything():
    assert resolve_training("no", "bf16", "bf16", "cuda", True).mode == "no"
    assert resolve_training("bf16", None, "fp32", "cuda", True).mode == "bf16"
    assert resolve_training("bf16", None, "bf16", "cpu", False).mode == "bf16"  # asked for
    assert resolve_training("no", None, "bf16", "cuda", True).reason == "--mixed-precision"
    with pytest.raises(UserError, match="--mixed-precision must be no or bf16"):
        resolve_training("fp8", None, "bf16", "cuda", True)


def test_sampling_auto_follows_the_configs_gpu_default_and_flags_win():
    assert resolve_sampling("auto", "bf16", "cuda", True).sampling == "bf16"
    assert resolve_sampling("auto", "fp32", "cuda", True).sampling == "fp32"
    assert resolve_sampling("auto", "bf16", "cpu", False).sampling == "fp32"
    assert resolve_sampling("auto", "bf16", "cuda", False).sampling == "fp32"
    assert resolve_sampling("fp32", "bf16", "cuda", True).sampling == "fp32"
    assert resolve_sampling("bf16", "fp32", "cpu", False).sampling == "bf16"
    with pytest.raises(UserError, match="--precision must be auto, bf16 or fp32"):
        resolve_sampling("half", "bf16", "cuda", True)


def test_on_this_machine_the_environment_reaches_the_rule(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert training_precision(True, None, "bf16").describe() == "fp32 (fp32 on cpu)"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training_precision(True, None, "fp32").mode == "bf16"
    assert training_precision(True, "no", "bf16").mode == "no"


SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=1",
    "optim.warmup_steps=1",
]


def test_train_prints_the_precision_at_start_and_records_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    run = tmp_path / "run"
    sets = [x for s in SMALL for x in ("--set", s)]
    args = ["train", "--preset", "tiny", "--run-dir", str(run), "--max-steps", "1", "--cpu"]
    result = CliRunner().invoke(app, args + sets)
    assert result.exit_code == 0, result.output
    assert "precision fp32 (fp32 on cpu)" in result.output
    (record,) = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert record["precision"] == "fp32"
    meta = json.loads((run / "checkpoints" / "step_00000001" / "meta.json").read_text())
    assert meta["precision"] == "fp32"

    sampled = CliRunner().invoke(
        app, ["sample", "--repo", str(run), "--num-samples", "2", "--steps", "2", "--cpu",
              "--out", str(tmp_path / "s"), "--json"]
    )  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    assert "precision fp32 (fp32 on cpu)" in sampled.output
    info = json.loads((tmp_path / "s" / "run.json").read_text())
    assert (info["dtype"], info["precision_reason"]) == ("fp32", "fp32 on cpu")
