"""Typed configuration: presets, layering, validation, and the CLI around them."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import Config, from_dict, preset_names, resolve, to_dict
from elfctl.errors import UserError

OFFICIAL = ["owt-b", "owt-m", "owt-l", "xsum-b", "de-en-b"]


def test_every_official_preset_exists_and_validates():
    assert set(OFFICIAL + ["tiny"]) <= set(preset_names())
    for name in preset_names():
        cfg = resolve(name)
        assert cfg.name == name and cfg.sampling
        assert from_dict(to_dict(cfg)) == cfg  # round-trips through plain data


def test_official_presets_carry_the_papers_settings():
    owt = resolve("owt-b")
    assert (owt.model.hidden_size, owt.model.depth, owt.model.num_heads) == (768, 12, 12)
    assert owt.data.train == "embedded-language-flows/openwebtext-t5"
    assert owt.data.max_length == 1024 and owt.data.pad_token == "pad"
    assert owt.objective.decoder_noise_scale == 5.0 and owt.optim.warmup_epochs == 0.5
    assert owt.optim.blr * owt.train.global_batch / 256 == pytest.approx(2e-3)
    sde32, sde64 = owt.sampling
    assert (sde32.method, sde32.steps, sde32.gamma, sde32.sc_cfg) == ("sde", 32, 1.5, 3.0)
    assert (sde64.steps, sde64.gamma) == (64, 1.0)
    assert sde32.paper == {"gen_ppl": 24.1, "entropy": 5.15}
    assert resolve("owt-m").train.epochs == 4 and resolve("owt-l").train.epochs == 3
    for name, lengths in (("xsum-b", (1088, 1024)), ("de-en-b", (128, 64))):
        cfg = resolve(name)
        assert (cfg.data.max_length, cfg.data.max_input_length) == lengths
        assert cfg.data.pad_token == "eos" and cfg.objective.label_drop_prob == 0.1
        assert cfg.objective.decoder_noise_scale == 1.0 and cfg.optim.warmup_steps == 5000
        (ode,) = cfg.sampling
        assert (ode.method, ode.steps, ode.cfg, ode.sc_cfg) == ("ode", 64, 2.0, 1.0)


def test_layers_apply_in_order_preset_file_flags_sets(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("train: {seed: 5, max_steps: 10}\noptim: {blr: 0.5}\n")
    cfg = resolve("owt-b", file, {"train.max_steps": 20}, ["train.max_steps=30", "model.depth=2"])
    assert cfg.train.seed == 5 and cfg.optim.blr == 0.5
    assert cfg.train.max_steps == 30 and cfg.model.depth == 2
    assert cfg.model.hidden_size == 768  # untouched preset values survive


def test_set_can_reach_into_a_list_of_sampling_settings():
    cfg = resolve("owt-b", sets=["sampling.1.steps=16"])
    assert cfg.sampling[1].steps == 16 and cfg.sampling[1].gamma == 1.0
    assert cfg.sampling[0].steps == 32


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.hiden_size=3"], "Unknown config key 'model.hiden_size'"),
        (["model.depth=deep"], "'model.depth' must be an integer"),
        (["data.pad_token=zero"], "'data.pad_token' must be one of"),
        (["train.compile=maybe"], "'train.compile' must be true or false"),
        (["nonsense=1"], "Unknown config key 'nonsense'"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(sets, message):
    with pytest.raises(UserError, match=message):
        resolve("owt-b", sets=sets)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(UserError, match="Unknown preset 'owt-x'; available presets: de-en-b"):
        resolve("owt-x")


def test_cli_print_config_and_errors_exit_2(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--preset", "owt-m", "--print-config"])
    assert shown.exit_code == 0 and "hidden_size: 1056" in shown.output
    bad = runner.invoke(app, ["train", "--preset", "owt-b", "--set", "optim.nam=adamw"])
    assert bad.exit_code == 2 and "Unknown config key 'optim.nam'" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "not found" in missing.output
    listed = runner.invoke(app, ["train", "--help"])
    assert all(name in listed.output for name in OFFICIAL + ["tiny"])


@pytest.mark.parametrize("command", [["train"], ["distill", "--teacher", "x"]])
def test_training_commands_share_their_flag_checks(command, tmp_path):
    runner = CliRunner()
    bare = runner.invoke(app, command + ["--run-dir", str(tmp_path)])
    assert bare.exit_code == 2 and "Give --preset NAME or --config FILE" in bare.output
    assert "tiny" in bare.output  # the presets are listed
    args = command + ["--preset", "tiny", "--mixed-precision", "fp8", "--run-dir", str(tmp_path)]
    fp8 = runner.invoke(app, args)
    assert fp8.exit_code == 2 and "--mixed-precision must be no or bf16" in fp8.output
    assert not any(tmp_path.iterdir())  # nothing was started


def test_defaults_are_elf_b_on_t5_small():
    cfg = Config()
    assert cfg.model.vocab_size == 32100 and cfg.model.latent_dim == 512
    assert cfg.encoder.latent_std == 0.2 and cfg.encoder.tokenizer == "t5-small"


@pytest.mark.slow
def test_presets_ship_inside_a_non_editable_wheel(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("elfctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for preset in OFFICIAL + ["tiny"]:
        assert f"elfctl/presets/{preset}.yaml" in names


@pytest.mark.parametrize(
    "text, line, column, what",
    [
        ("model:\n  depth: 4\n   hidden_size: 8\n", 3, 15, "mapping values are not allowed here"),
        ("train: {seed: 1\nmodel: {}\n", 2, 6, "expected ',' or '}', but got ':'"),
        ("data:\n  train: 'unclosed\n", 3, 1, "found unexpected end of stream"),
    ],
)
def test_malformed_yaml_is_one_sentence_with_file_line_and_column(
    tmp_path, text, line, column, what
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        resolve(config_file=path)
    assert str(e.value) == f"{path}, line {line}, column {column}: {what}."
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--print-config"])
    assert result.exit_code == 2
    assert f"{path}, line {line}, column {column}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
