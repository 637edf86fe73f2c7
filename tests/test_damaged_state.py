"""Damaged run state is named, never a traceback.

A file the program wrote for itself (an unfinished sample run's batches and job.json,
a finished run's run.json, checkpoints, training state, eval.json, sweep.json, the data
cache) can still be cut short by a full disk or a bad copy. A damaged sample batch is
sampled again, and the run says which; anything else is one sentence naming the file
and what to do, with exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import Config, resolve
from elfctl.convert import export
from elfctl.errors import UserError
from elfctl.model import infer_model_config, list_step_dirs, load_checkpoint, save_model_checkpoint
from elfctl.runs import UNFINISHED_DIR
from elfctl.training import make_accelerator, train
from tests.conftest import build_word_tokenizer
from tests.test_checkpoints import official_state, write_official

runner = CliRunner()
STEPS, BATCH, N = 2, 2, 6  # three batches


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    tok = build_word_tokenizer(root / "tok")
    state = {k: 10 * v for k, v in official_state(0, V=len(tok)).items()}  # varied samples
    return write_official(root / "checkpoint_300", state, step=300), root / "tok"


def sample_args(model_files, out, *extra):
    ckpt, tok = model_files
    args = ["--repo", ckpt, "--tokenizer", tok, "--num-samples", N, "--batch-size", BATCH]
    args += ["--length", 8, "--steps", STEPS, "--seed", 3, "--out", out, *extra]
    return ["sample", *[str(a) for a in args]]


class Interrupted(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def interrupted_run(model_files, out, finished_batches, monkeypatch):
    """A sample run stopped just before its batch number `finished_batches` + 1 is renamed
    into place: what a kill leaves behind (job.json and whole batch files)."""
    replace, renamed = os.replace, []

    def stopping_replace(src, dst):
        if os.path.basename(str(dst)).startswith("batch_"):
            if len(renamed) == finished_batches:
                raise Interrupted
            renamed.append(dst)
        return replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", stopping_replace)
        with pytest.raises(Interrupted):
            runner.invoke(app, sample_args(model_files, out), catch_exceptions=False)
    return sorted((out / UNFINISHED_DIR).glob("batch_*.jsonl"))


def assert_one_sentence(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def straight(model_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = runner.invoke(app, sample_args(model_files, out))
    assert result.exit_code == 0, result.output
    return (out / "samples.jsonl").read_bytes()


# ----------------------------------------------------------------------------- sample runs


@pytest.mark.parametrize(
    "damage",
    ["cut mid-line", "cut at a line end", "empty", "a row without an id", "not UTF-8"],
)
def test_a_damaged_batch_file_is_sampled_again_and_named(
    tmp_path, model_files, straight, monkeypatch, damage
):
    out = tmp_path / "run"
    batches = interrupted_run(model_files, out, 2, monkeypatch)
    assert len(batches) == 2
    victim = batches[1]
    text = victim.read_text()
    victim.write_bytes(
        {
            "cut mid-line": text[: len(text) // 2].encode(),
            "cut at a line end": text.splitlines(keepends=True)[0].encode(),
            "empty": b"",
            "a row without an id": text.replace('"id"', '"ID"').encode(),
            "not UTF-8": b"\xff\xfe" + text.encode(),
        }[damage]
    )

    resumed = runner.invoke(app, sample_args(model_files, out))
    assert resumed.exit_code == 0, resumed.output
    assert f"resampling damaged batch file(s): {victim.name}" in resumed.output
    assert "2 of 6 samples already done" in resumed.output  # the whole first batch is kept
    assert (out / "samples.jsonl").read_bytes() == straight
    info = json.loads((out / "run.json").read_text())
    assert info["resampled_batches"] == [victim.name]
    assert info["resumed_samples"] == 2 and info["sampled_samples"] == 4


@pytest.mark.parametrize("content", ["{not json", "", '["a list"]'])
def test_a_damaged_job_json_is_one_sentence_naming_it_and_force_starts_over(
    tmp_path, model_files, straight, monkeypatch, content
):
    out = tmp_path / "run"
    interrupted_run(model_files, out, 1, monkeypatch)
    job = out / UNFINISHED_DIR / "job.json"
    job.write_text(content)

    result = runner.invoke(app, sample_args(model_files, out))
    assert_one_sentence(result, str(job), "is damaged", "--force")
    assert job.read_text() == content  # nothing the user might want is touched

    forced = runner.invoke(app, sample_args(model_files, out, "--force"))
    assert forced.exit_code == 0, forced.output
    assert (out / "samples.jsonl").read_bytes() == straight


def test_a_damaged_run_json_of_a_finished_run_is_named(tmp_path, model_files):
    """eval reuses a finished run of the same settings: its run.json must be readable."""
    from elfctl.runs import SampleJob, load_for_sampling

    out = tmp_path / "run"
    assert runner.invoke(app, sample_args(model_files, out)).exit_code == 0
    (out / "run.json").write_text('{"elfctl_version": "0.1')
    ckpt, tok = model_files
    loaded = load_for_sampling(str(ckpt), tokenizer=str(tok))
    job = SampleJob(setting=resolve("tiny").sampling[0], num_samples=N, length=8)
    with pytest.raises(UserError) as caught:
        job.finished(loaded, out)
    message = str(caught.value)
    assert str(out / "run.json") in message and "not valid JSON" in message, message
    assert "--force" in message


# ----------------------------------------------------------------------------- checkpoints


def saved_checkpoint(root: Path) -> Path:
    ema = official_state(3)
    cfg = Config(name="tiny-test")
    cfg.model = infer_model_config(ema)
    return save_model_checkpoint(root / "checkpoints" / "step_00000010", ema, cfg, step=10)


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "file, damage, reason",
    [
        ("model.safetensors", "cut", "Error while deserializing header"),
        ("model.safetensors", "empty", "header too small"),
        ("config.yaml", "model: [768, {unclosed", "not valid YAML"),
        ("config.yaml", "just a sentence", "not a YAML mapping"),
        ("meta.json", '{"step": 1', "not valid JSON"),
        ("config.yaml", "missing", "is missing"),
    ],
)
def test_a_damaged_checkpoint_names_the_file_and_the_way_out(tmp_path, file, damage, reason):
    step_dir = saved_checkpoint(tmp_path)
    path = step_dir / file
    if damage == "cut":
        cut(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        path.write_text(damage)
    with pytest.raises(UserError) as caught:
        load_checkpoint(str(step_dir))
    message = str(caught.value)
    assert str(path) in message and reason in message, message
    assert f"delete {step_dir}" in message


def test_sampling_from_a_damaged_checkpoint_exits_2(tmp_path, model_files):
    step_dir = saved_checkpoint(tmp_path)
    cut(step_dir / "model.safetensors")
    result = runner.invoke(app, ["sample", "--repo", str(step_dir), "--cpu"])
    assert_one_sentence(result, "model.safetensors", "is damaged")


SMALL = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.checkpoint_every=2",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve("tiny", sets=[*SMALL, "train.max_steps=2"])
    train(cfg, run, accelerator=make_accelerator(cpu=True))
    return run


@pytest.mark.parametrize(
    "file, damage",
    [
        ("training_state/optimizer.pt", "cut"),
        ("training_state/model_raw.pt", "empty"),
        ("training_state/trainer.json", "{"),
        ("training_state/rng_rank0.pt", "missing"),
        ("model.safetensors", "cut"),
    ],
)
def test_resuming_from_damaged_training_state_names_the_file(tmp_path, trained_run, file, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = list_step_dirs(run / "checkpoints")[-1]
    path = checkpoint / file
    if damage == "cut":
        cut(path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "missing":
        path.unlink()
    else:
        path.write_text(damage)
    cfg = resolve("tiny", sets=[*SMALL, "train.max_steps=4"])
    with pytest.raises(UserError) as caught:
        train(cfg, run, accelerator=make_accelerator(cpu=True))
    message = str(caught.value)
    assert str(path) in message, message
    assert f"delete {checkpoint}" in message and "--resume never" in message


def test_a_run_directory_whose_config_yaml_is_not_yaml_is_named(tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text("model: {hidden_size: [")
    cfg = resolve("tiny", sets=[*SMALL, "train.max_steps=4"])
    with pytest.raises(UserError, match="config.yaml is damaged \\(not valid YAML\\)"):
        train(cfg, run, accelerator=make_accelerator(cpu=True))


# ----------------------------------------------------------------------------- eval, sweep, cache


def test_a_damaged_eval_json_given_to_export_is_named(tmp_path):
    saved_checkpoint(tmp_path / "run")
    bad = tmp_path / "eval.json"
    bad.write_text('{"rows": [')
    with pytest.raises(UserError, match="eval.json is damaged \\(not valid JSON") as caught:
        export(str(tmp_path / "run"), tmp_path / "out", eval_files=[bad])
    assert "elfctl eval" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_damaged_sweep_json_is_named_by_show(tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text('{"rows": [{"steps": 8')
    result = runner.invoke(app, ["show", str(tmp_path / "sweep")])
    assert_one_sentence(result, "sweep.json is damaged", "--force")


def test_a_damaged_data_cache_entry_is_named_with_how_to_rebuild_it(tmp_path):
    from elfctl.data.pipeline import MANIFEST, cached_rows

    entry = tmp_path / "cache" / "key"
    entry.mkdir(parents=True)
    (entry / MANIFEST).write_text('{"source": "x.txt"')
    with pytest.raises(UserError) as caught:
        cached_rows(tmp_path / "cache", "key", {"source": "x.txt"}, build=None, may_build=True)
    assert str(entry / MANIFEST) in str(caught.value)
    assert f"delete {entry}" in str(caught.value)
