"""`elfctl export`: the official layout (strict-loadable, official key names), ours, the card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.model import ELF, list_step_dirs
from elfctl.training import make_accelerator, train
from tests.test_train import small_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(small_config("train.max_steps=3"), run, accelerator=make_accelerator(cpu=True))
    return run


def official_names(depth: int) -> set[str]:
    """docs/method.md section 7's state-dict names, written out by hand."""
    names = {
        "self_cond_proj.weight",
        "self_cond_proj.bias",
        "text_proj.proj1.weight",
        "text_proj.proj2.weight",
        "text_proj.proj2.bias",
        "t_embedder.mlp_0.weight",
        "t_embedder.mlp_0.bias",
        "t_embedder.mlp_2.weight",
        "t_embedder.mlp_2.bias",
        "t_emb_tokens",
        "self_cond_cfg_embedder.mlp_0.weight",
        "self_cond_cfg_embedder.mlp_0.bias",
        "self_cond_cfg_embedder.mlp_2.weight",
        "self_cond_cfg_embedder.mlp_2.bias",
        "self_cond_cfg_tokens",
        "mode_tokens",
        "final_layer.norm_final.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "proj_kernel",
        "proj_bias",
        "unembed_kernel",
        "unembed_bias",
    }
    for i in range(depth):
        block = [
            "norm1.weight",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.q_norm.weight",
            "attn.k_norm.weight",
            "attn.proj.weight",
            "attn.proj.bias",
            "norm2.weight",
            "mlp.w12.weight",
            "mlp.w12.bias",
            "mlp.w3.weight",
            "mlp.w3.bias",
        ]
        names |= {f"blocks.{i}.{name}" for name in block}
    return names


def export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


def test_official_export_is_one_checkpoint_file_the_official_model_loads_strictly(
    tmp_path, trained_run
):
    out = tmp_path / "out"
    result = export(trained_run, out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoint_3", "config.yaml"]
    blob = torch.load(out / "checkpoint_3", map_location="cpu", weights_only=True)
    assert blob["step"] == 3 and {"params", "ema_params1", "opt_state"} <= set(blob)
    newest = list_step_dirs(trained_run / "checkpoints")[-1]
    ema = load_file(str(newest / "model.safetensors"))
    raw = torch.load(newest / "training_state" / "model_raw.pt", weights_only=True)
    for key, expected in (("ema_params1", ema), ("params", raw)):
        assert set(blob[key]) == official_names(depth=2)
        for name, tensor in expected.items():
            assert torch.equal(blob[key][name], tensor), (key, name)
        model = ELF(small_config().model)
        model.load_state_dict(blob[key], strict=True)


def test_elfctl_export_is_our_checkpoint_layout_with_the_ema_weights(tmp_path, trained_run):
    out = tmp_path / "out"
    result = export(trained_run, out, "--format", "elfctl")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.yaml", "meta.json", "model.safetensors"]
    newest = list_step_dirs(trained_run / "checkpoints")[-1]
    exported, ema = (
        load_file(str(out / "model.safetensors")),
        load_file(str(newest / "model.safetensors")),
    )
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((out / "meta.json").read_text())["step"] == 3


def sample(repo, out):
    args = ["sample", "--repo", repo, "--num-samples", 6, "--batch-size", 3, "--steps", 3]
    result = runner.invoke(app, [*map(str, args), "--out", str(out), "--seed", "4"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["official", "elfctl"])
def test_sampling_the_export_gives_the_samples_of_the_run_it_came_from(tmp_path, trained_run, fmt):
    out = tmp_path / "exported"
    assert export(trained_run, out, "--format", fmt).exit_code == 0
    from_run = sample(trained_run, tmp_path / "from-run")
    from_export = sample(out, tmp_path / "from-export")
    assert [r["tokens"] for r in from_export] == [r["tokens"] for r in from_run]
    assert [r["text"] for r in from_export] == [r["text"] for r in from_run]
    info = json.loads((tmp_path / "from-export" / "run.json").read_text())
    assert info["checkpoint"]["step"] == 3 and info["tokenizer"] == "testbed:grammar/tokenizer"


def test_the_model_card_describes_the_model_and_carries_eval_figures(tmp_path, trained_run):
    evaluation = tmp_path / "eval.json"
    row = {"setting": "sde-32", "n": 256, "metrics": {"gen_ppl": {"value": 41.25, "paper": 24.1}}}
    evaluation.write_text(json.dumps({"preset": "tiny", "seed": 0, "rows": [row]}))
    out = tmp_path / "out"
    assert export(trained_run, out, "--eval", evaluation).exit_code == 0
    card = (out / "README.md").read_text()
    for expected in [
        "| hidden size H | 32 |",
        "| depth | 2 |",
        "| vocabulary V | 58 |",
        "tokenizer: `testbed:grammar/tokenizer`",
        "frozen encoder: `testbed:grammar/encoder`",
        "latent statistics: mean -0.023, std 1",
        "steps: 3 at a global batch of 8",
        "`sde-32`: SDE 32 steps, gamma 1.5, SC-CFG 3, CFG 1",
        "| sde-32 | 256 | gen_ppl | 41.25 | 24.1 |",
    ]:
        assert expected in card, expected
    params = sum(t.numel() for t in ELF(small_config().model).state_dict().values())
    assert f"| parameters | {params:,} |" in card
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert yaml.safe_load((out / "config.yaml").read_text()) == saved


def test_a_fine_tuned_runs_card_names_where_its_weights_came_from(tmp_path, trained_run):
    tuned = tmp_path / "tuned"
    cfg = small_config("train.max_steps=1", f"train.init={trained_run}")
    train(cfg, tuned, accelerator=make_accelerator(cpu=True))
    assert export(tuned, tmp_path / "out").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"fine-tuned from `{trained_run}` (ema weights of step 3, sha256 `" in card


def test_an_existing_folder_is_replaced_only_with_force(tmp_path, trained_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = export(trained_run, out)
    assert result.exit_code == 2 and "pass --force" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert export(trained_run, out, "--force").exit_code == 0
    assert not (out / "mine.txt").exists() and (out / "checkpoint_3").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "jax"], "--format must be official or elfctl"),
        (["--push-to-hub", "no-org"], "--push-to-hub expects a repo id ORG/NAME"),
    ],
)
def test_bad_export_requests_are_one_sentence_and_write_nothing(
    tmp_path, trained_run, args, message
):
    result = export(trained_run, tmp_path / "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = export(tmp_path / "nowhere", tmp_path / "out")
    assert result.exit_code == 2 and "Checkpoint not found" in result.output


def test_a_config_yaml_of_another_tool_beside_an_official_checkpoint_is_not_read(
    tmp_path, trained_run
):
    from elfctl.model import load_checkpoint

    out = tmp_path / "out"
    assert export(trained_run, out).exit_code == 0
    assert load_checkpoint(str(out)).config.encoder.tokenizer == "testbed:grammar/tokenizer"
    (out / "config.yaml").write_text("learning_rate: 0.1\nmodel_type: other\n")
    ckpt = load_checkpoint(str(out))
    assert ckpt.config is None and ckpt.model_config.hidden_size == 32  # read off the shapes
