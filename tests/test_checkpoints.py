"""Finding and loading checkpoints (docs/method.md section 7)."""

from __future__ import annotations

import pytest
import torch

import elfctl
from elfctl.config import Config
from elfctl.errors import UserError
from elfctl.model import (
    build_model,
    load_checkpoint,
    resolve_checkpoint,
    save_model_checkpoint,
    save_official_checkpoint,
)
from tests.test_model import official_key_shapes

TINY = dict(H=32, depth=2, heads=2, C=16, V=18, bottleneck=8)


def official_state(seed=0, scale=0.1, **sizes):
    """A random state dict built from the spec's key list, not from our model."""
    sizes = {**TINY, **sizes}
    gen = torch.Generator().manual_seed(seed)
    shapes = official_key_shapes(
        sizes["H"], sizes["depth"], sizes["heads"], sizes["C"], sizes["V"], sizes["bottleneck"]
    )
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def write_official(path, ema, step=100, params=None):
    torch.save(
        {
            "params": params if params is not None else ema,
            "ema_params1": ema,
            "opt_state": {},
            "lr_scheduler": {},
            "step": step,
            "epoch": 1,
            "dropout_rng": torch.zeros(2, dtype=torch.int64),
            "grad_accum_buffers": None,
        },
        path,
    )
    return path


def test_official_checkpoint_loads_strictly_with_the_ema_weights(tmp_path):
    ema, raw = official_state(0), official_state(1)
    write_official(tmp_path / "checkpoint_100", ema, params=raw)
    model = elfctl.load_model(str(tmp_path / "checkpoint_100"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ema[name])
    assert not model.training
    assert model.cfg.hidden_size == 32 and model.cfg.vocab_size == 18


def test_a_directory_resolves_to_its_highest_step(tmp_path):
    for step in (100, 2000, 300):
        write_official(tmp_path / f"checkpoint_{step}", official_state(step), step)
    path, fmt = resolve_checkpoint(str(tmp_path))
    assert path.name == "checkpoint_2000" and fmt == "official"
    assert load_checkpoint(str(tmp_path)).step == 2000


def test_missing_local_path_is_a_not_found_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint("./runs/does-not-exist")


def test_a_file_without_ema_params_is_not_an_elf_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint_1")
    with pytest.raises(UserError, match="not an ELF checkpoint: no 'ema_params1'"):
        load_checkpoint(str(tmp_path / "checkpoint_1"))


def test_garbage_is_reported_without_unpickling(tmp_path):
    (tmp_path / "checkpoint_5").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="weights_only=True"):
        load_checkpoint(str(tmp_path / "checkpoint_5"))


def test_a_missing_tensor_is_named(tmp_path):
    ema = official_state()
    del ema["blocks.1.attn.k_norm.weight"]
    write_official(tmp_path / "checkpoint_1", ema)
    with pytest.raises(UserError, match=r"missing tensor\(s\) blocks.1.attn.k_norm.weight"):
        elfctl.load_model(str(tmp_path / "checkpoint_1"))


def test_an_extra_tensor_is_named(tmp_path):
    ema = official_state()
    ema["blocks.0.attn.rope_cache"] = torch.zeros(3)
    write_official(tmp_path / "checkpoint_1", ema)
    with pytest.raises(UserError, match="unexpected tensor"):
        elfctl.load_model(str(tmp_path / "checkpoint_1"))


def test_a_vocabulary_mismatch_names_the_tensor(tmp_path):
    ema = official_state()
    write_official(tmp_path / "checkpoint_1", ema)
    cfg = Config()
    cfg.model = elfctl.load_model(str(tmp_path / "checkpoint_1")).cfg
    cfg.model.vocab_size = 20
    with pytest.raises(UserError, match=r"unembed_kernel has shape \(16, 18\).*vocabulary"):
        elfctl.load_model(str(tmp_path / "checkpoint_1"), config=cfg)


def test_a_wrong_shape_names_the_tensor():
    ema = official_state()
    from elfctl.model import infer_model_config

    cfg = infer_model_config(ema)
    ema["blocks.0.mlp.w3.bias"] = torch.zeros(7)
    with pytest.raises(UserError, match=r"blocks.0.mlp.w3.bias has shape \(7,\)"):
        build_model(ema, cfg)


def test_our_format_round_trips_and_ignores_unfinished_writes(tmp_path):
    ema = official_state(3)
    from elfctl.model import infer_model_config

    cfg = Config(name="tiny-test")
    cfg.model = infer_model_config(ema)
    run = tmp_path / "run"
    save_model_checkpoint(run / "checkpoints" / "step_00000010", ema, cfg, step=10)
    newer = run / "checkpoints" / "step_00000020"
    newer.mkdir()  # an interrupted write: no meta.json
    (newer / "model.safetensors").write_bytes(b"partial")
    ckpt = load_checkpoint(str(run))
    assert ckpt.step == 10 and ckpt.format == "elfctl" and ckpt.config.name == "tiny-test"
    model = elfctl.load_model(str(run))
    torch.testing.assert_close(model.state_dict()["unembed_bias"], ema["unembed_bias"])


def test_official_writer_output_is_read_back(tmp_path):
    ema = official_state(4)
    save_official_checkpoint(tmp_path / "checkpoint_7", ema, ema, step=7)
    ckpt = load_checkpoint(str(tmp_path / "checkpoint_7"))
    assert ckpt.step == 7 and ckpt.format == "official"
    torch.testing.assert_close(ckpt.state_dict["proj_kernel"], ema["proj_kernel"])


def test_load_model_carries_the_config_that_describes_the_checkpoint(tmp_path):
    ema = official_state(3)
    from elfctl.model import infer_model_config

    cfg = Config(name="tiny-test")
    cfg.encoder.tokenizer = "my-tokenizer"
    cfg.model = infer_model_config(ema)
    save_model_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000010", ema, cfg, step=10)
    ours = elfctl.load_model(str(tmp_path / "run"))
    assert ours.config.name == "tiny-test" and ours.config.encoder.tokenizer == "my-tokenizer"
    assert ours.config.model == ours.cfg
    write_official(tmp_path / "checkpoint_100", official_state(0))
    official = elfctl.load_model(str(tmp_path / "checkpoint_100"))
    assert official.config.model == official.cfg and official.config.encoder.tokenizer == "t5-small"
