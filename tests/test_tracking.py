"""`--log-with`: Accelerate's TensorBoard and W&B trackers, read back from what they wrote."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.training import (
    SCALARS,
    Tracking,
    Trainer,
    hyperparameters,
    make_accelerator,
    parse_log_with,
)
from tests.test_train import SMALL, small_config

TRACKED = (
    "train.max_steps=4",
    "train.sample_every=2",
    "train.sample_count=2",
    "sampling.0.steps=2",
)


def tracked_run(run_dir: Path, tracker: str) -> list[dict]:
    config = small_config(*TRACKED)
    trainer = Trainer(config, run_dir, make_accelerator(cpu=True), log_with=[tracker])
    trainer.fit()
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def sample_texts(run_dir: Path, step: int) -> list[str]:
    path = run_dir / "samples" / f"step_{step:08d}.jsonl"
    return [json.loads(x)["text"] for x in path.read_text().splitlines()]


def test_tensorboard_events_hold_the_train_log_scalars_samples_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "my-run"
    log = tracked_run(run, "tensorboard")
    events = EventAccumulator(str(run / "logs" / "my-run"), size_guidance={"tensors": 0})
    events.Reload()
    assert [r["step"] for r in log] == [2, 4]
    for name in SCALARS:
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in logged] == [2, 4], name
        for (_, value), record in zip(logged, log, strict=True):
            assert value == pytest.approx(record[name], rel=1e-6), name
    text_events = events.Tensors("samples/text_summary")
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in text_events}
    assert set(texts) == {2, 4}
    for step, text in texts.items():
        for sample in sample_texts(run, step):
            assert sample.replace("<", "&lt;") in text
    hparams = list((run / "logs" / "my-run").glob("*/hparams.yml"))
    assert len(hparams) == 1
    import yaml

    stored = yaml.safe_load(hparams[0].read_text())
    assert stored["optim.blr"] == 0.012 and stored["model.hidden_size"] == 32
    assert stored["optim.adam_betas"] == "[0.9, 0.95]"


def wandb_records(path: str):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header, then
    32 KiB blocks of chunks (crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        if pos + 7 > len(data):
            return  # a file still being written ends mid-header
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            return  # ... or mid-chunk
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_wandb_records(path: str, timeout_s: float = 60.0) -> list:
    """The run's records once W&B's service has written them all (its `exit` record):
    `finish()` hands the last records to a separate process, which writes them a little
    later on a busy machine."""
    import time

    import wandb

    wandb.teardown()  # waits for the service to shut down, flushing the run's file
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, "the W&B run file never got its exit record"
        time.sleep(0.5)


def test_a_wandb_offline_run_holds_the_train_log_scalars_samples_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "my-run"
    log = tracked_run(run, "wandb")
    (file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = finished_wandb_records(file)
    history, config, name = {}, {}, None
    kinds = []
    for record in records:
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[record.history.step.num] = items
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "run":
            name = record.run.display_name
    assert name == "my-run", kinds
    assert config["optim.blr"] == 0.012 and config["train.max_steps"] == 4
    for record in log:
        for key in SCALARS:
            assert history[record["step"]][key] == pytest.approx(record[key], rel=1e-12), key
    for step in (2, 4):
        table = Path(file).parent / "files" / history[step]["samples/path"]
        rows = json.loads(table.read_text())
        assert rows["columns"] == ["id", "text"]
        assert [text for _, text in rows["data"]] == sample_texts(run, step)


def test_only_the_main_process_starts_trackers(tmp_path):
    tracking = Tracking(["tensorboard"], tmp_path / "run", is_main=False)
    tracking.start(small_config())
    tracking.log({"step": 1, "loss": 1.0})
    tracking.finish()
    assert not (tmp_path / "run").exists()


def test_hyperparameters_are_the_flattened_config_with_scalar_values():
    flat = hyperparameters(small_config())
    assert flat["model.depth"] == 2 and flat["data.validation"] == "testbed:grammar/validation"
    assert flat["train.micro_batch"] == "null" and flat["train.init_from"] == "{}"
    assert flat["distill.spans"] == json.dumps([0.0625, 0.125, 0.25, 0.5, 1.0])
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_log_with_takes_commas_and_repeats_once_each():
    assert parse_log_with(["tensorboard,wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    assert parse_log_with(None) == []


@pytest.mark.parametrize(
    "tracker, message",
    [
        ("tensorboard", "pip install 'elfctl[tensorboard]'"),
        ("wandb", "pip install 'elfctl[wandb]'"),
        ("wandbx", "Unknown tracker 'wandbx'"),
    ],
)
@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_missing_or_unknown_tracker_is_one_sentence_and_exit_2_before_any_work(
    tmp_path, monkeypatch, tracker, message, command
):
    monkeypatch.setitem(sys.modules, tracker, None)  # import of it fails: not installed
    run = tmp_path / "run"
    sets = [x for s in SMALL for x in ("--set", s)]
    argv = [command, "--preset", "tiny", "--run-dir", str(run), "--cpu", *sets]
    if command == "distill":
        argv += ["--teacher", str(tmp_path)]
    result = CliRunner().invoke(app, [*argv, "--log-with", tracker])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not run.exists()


def test_distill_logs_each_round_as_its_own_tracker_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from elfctl.config import resolve
    from elfctl.model import ELF, save_official_checkpoint
    from tests.conftest import randomize_
    from tests.test_distill import SMALL as DISTILL_SMALL

    cfg = resolve("tiny", sets=DISTILL_SMALL)
    weights = randomize_(ELF(cfg.model), seed=3, std=0.1).state_dict()
    teacher = save_official_checkpoint(tmp_path / "checkpoint_9", weights, weights, 9)
    run = tmp_path / "pd"
    args = ["distill", "--preset", "tiny", "--teacher", str(teacher), "--run-dir", str(run)]
    args += [a for s in DISTILL_SMALL for a in ("--set", s)]
    args += ["--max-steps", "2", "--cpu", "--log-with", "tensorboard"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for k in (1, 2):
        log = [
            json.loads(x) for x in (run / f"round_{k}" / "train_log.jsonl").read_text().splitlines()
        ]
        events = EventAccumulator(str(run / f"round_{k}" / "logs" / f"pd-round_{k}"))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("loss")]
        assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
