"""Fine-tuning (`elfctl train --init SOURCE`): weights in, everything else fresh."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import resolve
from elfctl.errors import UserError
from elfctl.model import file_sha256, list_step_dirs, save_official_checkpoint
from elfctl.training import Trainer, make_accelerator, train
from tests.test_train import SMALL, small_config

runner = CliRunner()


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    """A 3-step tiny run whose EMA and raw weights differ (EMA warm-up, lr > 0)."""
    run = tmp_path_factory.mktemp("init") / "run"
    train(small_config("train.max_steps=3"), run, accelerator=make_accelerator(cpu=True))
    return run


def newest(run):
    return list_step_dirs(run / "checkpoints")[-1]


def assert_exactly(state, expected):
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name].cpu(), expected[name]), name


def test_step_zero_weights_equal_the_init_checkpoints_ema_weights_exactly(tmp_path, init_run):
    ckpt = newest(init_run)
    cfg = small_config("train.max_steps=2", f"train.init={init_run}")
    trainer = Trainer(cfg, tmp_path / "ft", make_accelerator(cpu=True))
    ema = load_file(str(ckpt / "model.safetensors"))
    assert_exactly(trainer.raw_model.state_dict(), ema)
    # Fresh optimiser, step count, schedule and EMA (whose shadow starts at the same weights).
    assert trainer.step == 0 and not trainer.optimizer.state_dict()["state"]
    assert trainer.scheduler.last_epoch == 0 and trainer.ema.num_updates == 0
    assert_exactly({k: v for k, v in trainer.ema.shadow.items()}, ema)
    assert trainer.cfg.train.init_from == {
        "source": str(init_run),
        "path": str(ckpt),
        "format": "elfctl",
        "step": 3,
        "sha256": file_sha256(ckpt / "model.safetensors"),
        "weights": "ema",
    }


def test_raw_init_weights_are_the_checkpoints_raw_training_weights(tmp_path, init_run):
    raw_file = newest(init_run) / "training_state" / "model_raw.pt"
    cfg = small_config(f"train.init={init_run}", "train.init_weights=raw")
    trainer = Trainer(cfg, tmp_path / "ft", make_accelerator(cpu=True))
    raw = torch.load(raw_file, weights_only=True)
    assert_exactly(trainer.raw_model.state_dict(), raw)
    ema = load_file(str(newest(init_run) / "model.safetensors"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two really differ
    assert trainer.cfg.train.init_from["sha256"] == file_sha256(raw_file)


def test_an_official_checkpoint_file_initialises_from_its_ema_params(tmp_path, init_run):
    ema = load_file(str(newest(init_run) / "model.safetensors"))
    params = {k: v + 1.0 for k, v in ema.items()}
    official = save_official_checkpoint(tmp_path / "hub" / "checkpoint_700", params, ema, 700)
    cfg = small_config(f"train.init={official}")
    trainer = Trainer(cfg, tmp_path / "ft", make_accelerator(cpu=True))
    assert_exactly(trainer.raw_model.state_dict(), ema)
    assert trainer.cfg.train.init_from["step"] == 700
    assert trainer.cfg.train.init_from["format"] == "official"
    raw_cfg = small_config(f"train.init={official}", "train.init_weights=raw")
    raw_trainer = Trainer(raw_cfg, tmp_path / "ft2", make_accelerator(cpu=True))
    assert_exactly(raw_trainer.raw_model.state_dict(), params)


def test_an_unconditional_checkpoint_fine_tunes_on_conditional_data(tmp_path, init_run):
    cfg = resolve("tiny-translate", sets=SMALL + [f"train.init={init_run}", "train.max_steps=1"])
    result = train(cfg, tmp_path / "ft", accelerator=make_accelerator(cpu=True))
    assert result.step == 1


def test_the_run_config_records_provenance_and_a_resume_needs_no_init_checkpoint(
    tmp_path, init_run
):
    copied = tmp_path / "copy"
    shutil.copytree(init_run, copied)
    run = tmp_path / "ft"
    sets = [f"train.init={copied}"]
    train(small_config("train.max_steps=2", *sets), run, accelerator=make_accelerator(cpu=True))
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["init"] == str(copied) and saved["init_from"]["step"] == 3
    shutil.rmtree(copied)  # a resume takes its weights from its own checkpoint
    result = train(
        small_config("train.max_steps=4", *sets), run, accelerator=make_accelerator(cpu=True)
    )
    assert result.resumed_from == 2 and result.step == 4
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["train"]["init_from"]
        == (saved["init_from"])
    )


def test_a_config_that_contradicts_the_checkpoints_architecture_names_the_mismatch(
    tmp_path, init_run
):
    cfg = small_config(f"train.init={init_run}", "model.depth=3", "model.hidden_size=64")
    with pytest.raises(UserError, match=r"model\.hidden_size=32 \(config: 64\).*model\.depth=2"):
        Trainer(cfg, tmp_path / "ft", make_accelerator(cpu=True))


def invoke_train(run_dir, *args):
    sets = [x for s in SMALL for x in ("--set", s)]
    argv = ["train", "--preset", "tiny", "--run-dir", str(run_dir), "--cpu", *sets, *args]
    return runner.invoke(app, argv)


def test_train_init_from_the_cli_prints_the_checkpoint_and_trains(tmp_path, init_run):
    run = tmp_path / "ft"
    result = invoke_train(run, "--init", str(init_run), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert f"fine-tuning from {init_run}: ema weights of step 3" in result.output
    assert (run / "checkpoints" / "step_00000001" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "model.depth=3"], "has model.depth=2 (config: 3)"),
        (["--init-weights", "best"], "--init-weights must be ema or raw"),
    ],
)
def test_bad_init_requests_are_one_sentence_exit_2_and_leave_no_run_dir(
    tmp_path, init_run, extra, message
):
    run = tmp_path / "ft"
    result = invoke_train(run, "--init", str(init_run), "--max-steps", "1", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "error:" in line] == [
        line for line in result.output.splitlines() if message in line
    ]
    assert not run.exists()


def test_an_init_checkpoint_that_does_not_exist_is_a_clear_error(tmp_path):
    run = tmp_path / "ft"
    result = invoke_train(run, "--init", str(tmp_path / "nowhere"), "--max-steps", "1")
    assert result.exit_code == 2 and "Checkpoint not found" in result.output
    assert not run.exists()
