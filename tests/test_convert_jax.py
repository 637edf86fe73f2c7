"""`elfctl convert-jax`: JAX/Flax ELF checkpoints (Orbax, msgpack) and the JAX T5 encoder.

The converted model's forward must equal `tests/jax_reference.py`, an independent NumPy
forward that reads the JAX-layout arrays with `x @ kernel`; a missing or extra transpose
(even of a square matrix) breaks that equality. Checkpoints are written here by the real
tools where they are installed (orbax-checkpoint + JAX, flax) and, always, by plain
tensorstore / msgpack writers that follow the on-disk formats of docs/method.md section 7.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import ml_dtypes
import msgpack
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import ModelConfig
from elfctl.convert import (
    convert_checkpoint,
    convert_t5_encoder,
    expected_jax_shapes,
    parameter_count,
    torch_name,
    torch_shapes,
)
from elfctl.errors import UserError
from elfctl.model import load_checkpoint, load_model
from tests.jax_reference import elf_forward, nest, random_elf_tree, random_t5_tree, t5_forward

# Small but complete: 4 heads of width 8, C 8 != bottleneck 6, V 20, both SwiGLU halves.
CFG = ModelConfig(hidden_size=32, depth=2, num_heads=4, bottleneck=6, latent_dim=8, vocab_size=20)
SIZES = {  # name: (config, tensors, parameters) from docs/method.md section 7
    "ELF-B": (ModelConfig(hidden_size=768, depth=12, num_heads=12), 167, 104_579_940),
    "ELF-M": (ModelConfig(hidden_size=1056, depth=24, num_heads=16), 311, 342_540_036),
    "ELF-L": (ModelConfig(hidden_size=1280, depth=32, num_heads=16), 407, 652_103_332),
}


def jax_state(seed: int = 0, step: int = 1234, dtype=np.float32) -> dict:
    """A training state as the official JAX code saves it: weights, optimizer, step."""
    params = random_elf_tree(CFG, seed=seed)
    ema = random_elf_tree(CFG, seed=seed + 100)
    cast = {k: v.astype(dtype) for k, v in ema.items()}
    return {
        "params": nest({k: v.astype(dtype) for k, v in params.items()}),
        "ema_params1": nest(cast),
        "opt_state": ({"mu": nest(params), "count": np.int32(3)}, None),  # skipped when read
        "step": np.int64(step),
        "epoch": 2,
    }


def flat_of(state: dict, subtree: str) -> dict[str, np.ndarray]:
    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else k
            yield from walk(v, name) if isinstance(v, dict) else [(name, v)]

    return dict(walk(state[subtree], ""))


# ----------------------------------------------------------------------------- writers


def flax_msgpack_bytes(tree, max_chunk_bytes: int = 2**30) -> bytes:
    """Flax's `to_bytes` encoding, written out: ExtType 1 arrays, ExtType 3 numpy scalars,
    tuples as {'0': ..}, arrays over the chunk limit as a chunked-array dict."""

    def array_payload(a: np.ndarray) -> bytes:
        return msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)

    def default(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, array_payload(x))
        if isinstance(x, np.generic):
            return msgpack.ExtType(3, array_payload(np.asarray(x)))
        raise TypeError(type(x))

    def prepare(x):
        if isinstance(x, dict):
            return {k: prepare(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return {str(i): prepare(v) for i, v in enumerate(x)}
        if isinstance(x, np.ndarray) and x.nbytes > max_chunk_bytes:
            per_chunk = max(1, max_chunk_bytes // x.dtype.itemsize)
            flat = x.reshape(-1)
            chunks = [flat[i : i + per_chunk] for i in range(0, flat.size, per_chunk)]
            return {
                "__msgpack_chunked_array__": True,
                "shape": {str(i): d for i, d in enumerate(x.shape)},
                "chunks": {str(i): c for i, c in enumerate(chunks)},
            }
        return x

    return msgpack.packb(prepare(tree), default=default, strict_types=True)


def write_tensorstore_orbax(path: Path, state: dict, ocdbt: bool = True, metadata: bool = True):
    """The Orbax layout written with tensorstore alone: zarr v2 leaves named by dotted path
    (inside one OCDBT store, or one folder each) and the `_METADATA` tree."""
    import tensorstore as ts

    path.mkdir(parents=True)
    context = ts.Context()
    transaction = ts.Transaction()  # one OCDBT commit for all leaves
    tree_metadata = {}

    def leaves(node, keys):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, keys + (str(k),))
        elif isinstance(node, tuple):
            for i, v in enumerate(node):
                yield from leaves(v, keys + (str(i),))
        else:
            yield keys, node

    for keys, value in leaves(state, ()):
        key_meta = [{"key": k, "key_type": 2} for k in keys]
        if value is None:
            tree_metadata[str(keys)] = {
                "key_metadata": key_meta,
                "value_metadata": {"value_type": "None", "skip_deserialize": True},
            }
            continue
        array = np.asarray(value)
        dotted = ".".join(keys)
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{path}/", "path": dotted + "/"}
        else:
            kvstore = {"driver": "file", "path": f"{path}/{dotted}/"}
        dtype = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str
        spec = {
            "driver": "zarr",
            "kvstore": kvstore,
            "metadata": {
                "shape": list(array.shape),
                "chunks": list(array.shape),
                "dtype": dtype,
                "compressor": {"id": "zstd", "level": 1},
            },
        }
        store = ts.open(spec, create=True, context=context, transaction=transaction).result()
        store.write(array).result()
        value_type = "scalar" if array.ndim == 0 else "np.ndarray"
        tree_metadata[str(keys)] = {
            "key_metadata": key_meta,
            "value_metadata": {"value_type": value_type, "skip_deserialize": False},
        }
    transaction.commit_sync()
    if metadata:
        (path / "_METADATA").write_text(
            json.dumps({"tree_metadata": tree_metadata, "use_ocdbt": ocdbt, "use_zarr3": False})
        )
    (path / "_CHECKPOINT_METADATA").write_text("{}")


# ----------------------------------------------------------------------------- checks


def assert_forward_matches(dst, jax_flat: dict[str, np.ndarray], weights: str = "ema"):
    """The converted model at `dst` against the NumPy forward on the JAX-layout arrays."""
    if weights == "ema":
        model = load_model(str(dst))
    else:
        from elfctl.model import build_model

        ckpt = load_checkpoint(str(dst), weights=weights)
        model = build_model(ckpt.state_dict, ckpt.model_config).eval()
    rng = np.random.default_rng(7)
    z = rng.standard_normal((2, 5, 2 * CFG.latent_dim)).astype(np.float32)
    t = np.array([0.25, 0.9], np.float32)
    sc = np.array([1.0, 3.0], np.float32)
    for decode in (False, True):
        with torch.no_grad():
            x_hat, logits = model(
                torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(sc), decode=decode
            )
        ref_x, ref_logits = elf_forward(jax_flat, z, t, sc, decode, CFG)
        np.testing.assert_allclose(x_hat.numpy(), ref_x, rtol=1e-5, atol=1e-5)
        if decode:
            np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-5, atol=1e-5)


def as_float32(flat):
    return {k: np.asarray(v).astype(np.float32) for k, v in flat.items()}


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("size", SIZES)
def test_tensor_table_has_the_official_tensor_and_parameter_counts(size):
    cfg, tensors, parameters = SIZES[size]
    assert len(expected_jax_shapes(cfg)) == tensors
    assert parameter_count(cfg) == parameters


@pytest.mark.parametrize("cfg", [CFG, SIZES["ELF-B"][0], SIZES["ELF-L"][0]])
def test_mapped_table_is_exactly_the_models_state_dict(cfg):
    from elfctl.model import ELF

    with torch.device("meta"):
        model = ELF(cfg)
    model_table = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert torch_shapes(cfg) == model_table


def test_only_dense_kernels_are_renamed_and_transposed():
    assert torch_name("blocks_11/attn/qkv/kernel") == ("blocks.11.attn.qkv.weight", True)
    assert torch_name("blocks_0/mlp/w12/bias") == ("blocks.0.mlp.w12.bias", False)
    assert torch_name("blocks_3/attn/q_norm/weight") == ("blocks.3.attn.q_norm.weight", False)
    assert torch_name("t_embedder/mlp_0/kernel") == ("t_embedder.mlp_0.weight", True)
    assert torch_name("text_proj/proj1/kernel") == ("text_proj.proj1.weight", True)
    assert torch_name("final_layer/linear/kernel") == ("final_layer.linear.weight", True)
    for raw in ("proj_kernel", "unembed_kernel", "proj_bias", "mode_tokens", "t_emb_tokens"):
        assert torch_name(raw) == (raw, False)


# ----------------------------------------------------------------------------- msgpack


def test_msgpack_written_with_the_flax_encoding_converts_to_the_same_forward(tmp_path):
    state = jax_state(step=4321)
    src = tmp_path / "checkpoint_4321"
    # A tiny chunk limit makes the larger arrays take Flax's chunked-array form.
    src.write_bytes(flax_msgpack_bytes(state, max_chunk_bytes=256))
    result = convert_checkpoint(src, tmp_path / "out", weights="both")
    assert result.step == 4321 and result.source_kind == "msgpack"
    assert result.tensors == 2 * len(expected_jax_shapes(CFG))
    assert result.parameters == parameter_count(CFG)
    assert (tmp_path / "out" / "checkpoint_4321").is_file()
    assert_forward_matches(tmp_path / "out", flat_of(state, "ema_params1"))
    assert_forward_matches(tmp_path / "out", flat_of(state, "params"), weights="params")


def test_bfloat16_leaves_convert_to_their_exact_float32_values(tmp_path):
    state = jax_state(dtype=ml_dtypes.bfloat16)
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(state))
    result = convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out")
    assert result.source_dtypes == ["bfloat16"]
    blob = torch.load(tmp_path / "out" / "checkpoint_1234", weights_only=True)
    ema = flat_of(state, "ema_params1")
    qkv = blob["ema_params1"]["blocks.1.attn.qkv.weight"]
    assert qkv.dtype == torch.float32
    assert torch.equal(qkv, torch.from_numpy(ema["blocks_1/attn/qkv/kernel"].astype(np.float32).T))
    assert_forward_matches(tmp_path / "out", as_float32(ema))


def test_flax_to_bytes_output_converts(tmp_path, monkeypatch):
    serialization = pytest.importorskip("flax.serialization")
    jnp = pytest.importorskip("jax.numpy")
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 512)  # force real Flax chunking
    state = jax_state(step=77)
    state["ema_params1"]["blocks_0"]["mlp"]["w12"]["kernel"] = jnp.asarray(
        state["ema_params1"]["blocks_0"]["mlp"]["w12"]["kernel"], dtype=jnp.bfloat16
    )
    (tmp_path / "flax.msgpack").write_bytes(serialization.to_bytes(state))
    result = convert_checkpoint(tmp_path / "flax.msgpack", tmp_path / "out")
    assert result.step == 77 and result.source_dtypes == ["bfloat16", "float32"]
    assert_forward_matches(tmp_path / "out", as_float32(flat_of(state, "ema_params1")))


# ----------------------------------------------------------------------------- Orbax


@pytest.mark.parametrize(
    "ocdbt, zarr3",
    [(True, False), (False, False), (True, True)],
    ids=["ocdbt", "per-leaf", "zarr3"],
)
def test_orbax_checkpoint_written_by_orbax_converts_to_the_same_forward(tmp_path, ocdbt, zarr3):
    ocp = pytest.importorskip("orbax.checkpoint")
    jnp = pytest.importorskip("jax.numpy")
    state = jax_state(step=900)
    # Orbax stores jax bfloat16 arrays as zarr dtype 'bfloat16'.
    state["ema_params1"]["t_emb_tokens"] = jnp.asarray(
        state["ema_params1"]["t_emb_tokens"], jnp.bfloat16
    )
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3)
    checkpointer = ocp.Checkpointer(handler)
    checkpointer.save(tmp_path / "run" / "checkpoint_900", state)
    result = convert_checkpoint(tmp_path / "run", tmp_path / "out", fmt="elfctl", preset=None)
    assert result.step == 900 and result.source_kind == "orbax"
    assert result.source_dtypes == ["bfloat16", "float32"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert load_checkpoint(str(tmp_path / "out")).step == 900
    assert_forward_matches(tmp_path / "out", as_float32(flat_of(state, "ema_params1")))


def test_orbax_checkpoint_manager_folder_converts_its_newest_step(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    manager = ocp.CheckpointManager(tmp_path / "run")
    for seed, step in enumerate((10, 30, 20)):
        manager.save(step, args=ocp.args.StandardSave(jax_state(seed, step)))
    manager.wait_until_finished()
    assert (tmp_path / "run" / "30" / "default" / "_METADATA").is_file()  # item one level down
    result = convert_checkpoint(tmp_path / "run", tmp_path / "out")
    assert result.step == 30
    assert_forward_matches(tmp_path / "out", flat_of(jax_state(1, 30), "ema_params1"))


@pytest.mark.parametrize("ocdbt", [True, False], ids=["ocdbt", "per-leaf"])
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "listing"])
def test_orbax_layout_written_by_tensorstore_converts_without_jax(tmp_path, ocdbt, metadata):
    state = jax_state(step=55)
    state["ema_params1"]["unembed_kernel"] = state["ema_params1"]["unembed_kernel"].astype(
        ml_dtypes.bfloat16
    )
    src = tmp_path / "checkpoint_55"
    write_tensorstore_orbax(src, state, ocdbt=ocdbt, metadata=metadata)
    calls = []
    result = convert_checkpoint(src, tmp_path / "out", progress=lambda *a: calls.append(a))
    assert result.step == 55
    n_read = len(expected_jax_shapes(CFG)) + 1  # the EMA weights and the step, nothing else
    assert calls == [(i, n_read, "tensors") for i in range(1, n_read + 1)]
    assert_forward_matches(tmp_path / "out", as_float32(flat_of(state, "ema_params1")))


def test_a_folder_of_several_steps_converts_the_newest(tmp_path):
    run = tmp_path / "run"
    for seed, step in enumerate((5, 100, 20)):
        write_tensorstore_orbax(run / f"checkpoint_{step}", jax_state(seed, step), ocdbt=True)
    (run / "checkpoint_400.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save: ignored
    result = convert_checkpoint(run, tmp_path / "out")
    assert result.step == 100
    assert_forward_matches(tmp_path / "out", flat_of(jax_state(1, 100), "ema_params1"))


def test_a_hub_repo_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """Offline: the repo sits in a Hugging Face cache, read by the real snapshot code."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--some-org--ELF-tiny-owt"
    write_tensorstore_orbax(repo / "snapshots" / ("a" * 40) / "checkpoint_7", jax_state(step=7))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = convert_checkpoint("some-org/ELF-tiny-owt", tmp_path / "out")
    assert result.step == 7
    assert_forward_matches(tmp_path / "out", flat_of(jax_state(step=7), "ema_params1"))
    with pytest.raises(UserError, match="not in the local cache"):
        convert_checkpoint("some-org/not-cached", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- validation


PROBLEM_WORD = {"missing": "missing", "extra": "unexpected", "wrong shape": "wrong shape"}


def _break(state, how):
    ema = state["ema_params1"]
    if how == "missing":
        del ema["blocks_1"]["attn"]["k_norm"]
        return "ema_params1/blocks_1/attn/k_norm/weight"
    if how == "extra":
        ema["blocks_0"]["attn"]["extra_gate"] = {"kernel": np.ones((4, 4), np.float32)}
        return "ema_params1/blocks_0/attn/extra_gate/kernel"
    ema["blocks_1"]["mlp"]["w3"]["kernel"] = np.ones((CFG.hidden_size, 42), np.float32)
    return "ema_params1/blocks_1/mlp/w3/kernel is [32, 42]"


@pytest.mark.parametrize("how", ["missing", "extra", "wrong shape"])
@pytest.mark.parametrize("layout", ["msgpack", "orbax"])
def test_a_missing_extra_or_misshapen_tensor_is_named_and_nothing_is_written(tmp_path, how, layout):
    state = jax_state()
    expected_message = _break(state, how)
    if layout == "msgpack":
        src = tmp_path / "ckpt.msgpack"
        src.write_bytes(flax_msgpack_bytes(state))
    else:
        src = tmp_path / "checkpoint_3"
        write_tensorstore_orbax(src, state, ocdbt=True)
    with pytest.raises(UserError, match=PROBLEM_WORD[how]) as error:
        convert_checkpoint(src, tmp_path / "out")
    assert expected_message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_preset_fixes_the_architecture_to_check_against(tmp_path):
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(jax_state()))
    with pytest.raises(UserError, match="ELF architecture .H 768.*wrong shape"):
        convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", preset="owt-b")
    assert not (tmp_path / "out").exists()


def test_an_all_zero_final_layer_is_reported_as_untrained(tmp_path):
    state = jax_state()
    state["ema_params1"]["final_layer"]["linear"]["kernel"][:] = 0.0
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(state))
    with pytest.raises(UserError, match="final_layer/linear/kernel is all zeros.*untrained"):
        convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", allow_untrained=True)
    assert any("untrained" in w for w in result.warnings)
    assert (tmp_path / "out" / "checkpoint_1234").is_file()


def test_missing_ema_weights_suggest_params(tmp_path):
    state = jax_state()
    del state["ema_params1"]
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(state))
    with pytest.raises(UserError, match="no 'ema_params1'.*--weights params"):
        convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out")
    result = convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", weights="params")
    assert_forward_matches(tmp_path / "out", flat_of(state, "params"))
    assert result.weights == "params"


def test_existing_destination_needs_force(tmp_path):
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(jax_state(step=3)))
    convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", fmt="elfctl")
    with pytest.raises(UserError, match="already exists.*--force"):
        convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", fmt="elfctl")
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(jax_state(seed=5, step=3)))
    convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", fmt="elfctl", force=True)
    assert_forward_matches(tmp_path / "out", flat_of(jax_state(seed=5), "ema_params1"))


def test_a_folder_with_a_newer_official_checkpoint_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint_9999").write_bytes(b"newer")
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(jax_state()))
    with pytest.raises(UserError, match="checkpoint_9999.*loaders would pick"):
        convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out", force=True)


def test_a_dropped_transpose_would_be_caught_by_the_forward_check(tmp_path):
    """Guards the main check's power: one square kernel left untransposed must fail it."""
    state = jax_state()
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(state))
    convert_checkpoint(tmp_path / "ckpt.msgpack", tmp_path / "out")
    path = tmp_path / "out" / "checkpoint_1234"
    blob = torch.load(path, weights_only=True)
    square = blob["ema_params1"]["blocks.0.attn.proj.weight"]  # (H, H)
    blob["ema_params1"]["blocks.0.attn.proj.weight"] = square.T.contiguous()
    torch.save(blob, path)
    with pytest.raises(AssertionError):
        assert_forward_matches(tmp_path / "out", flat_of(state, "ema_params1"))


# ----------------------------------------------------------------------------- the CLI


def test_cli_converts_and_prints_a_json_summary(tmp_path):
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes(jax_state(step=12)))
    runner = CliRunner()
    done = runner.invoke(app, ["convert-jax", str(tmp_path / "ckpt.msgpack"), str(tmp_path / "o")])
    assert done.exit_code == 0, done.output
    assert "reading: " in done.output  # the plain progress line (not a terminal)
    assert f"Converted {len(expected_jax_shapes(CFG))} tensors" in done.output
    again = runner.invoke(
        app,
        ["convert-jax", str(tmp_path / "ckpt.msgpack"), str(tmp_path / "o"), "--json", "--force"],
    )
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["step"] == 12 and summary["weights"] == "ema"
    assert summary["source_dtype"] == "float32" and summary["output_dtype"] == "float32"
    assert summary["parameters"] == parameter_count(CFG)


def test_cli_bad_input_exits_2_with_one_sentence(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"\x01\x02\x03")
    done = CliRunner().invoke(app, ["convert-jax", str(tmp_path / "junk.bin"), str(tmp_path / "o")])
    assert done.exit_code == 2
    assert "not a Flax msgpack checkpoint" in done.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["official", "elfctl"])
def test_converted_checkpoint_samples_with_elfctl_sample(tmp_path, fmt):
    from tests.conftest import build_word_tokenizer

    tokenizer = build_word_tokenizer(tmp_path / "tok")
    cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": len(tokenizer)})
    ema = nest(random_elf_tree(cfg, seed=3))
    (tmp_path / "ckpt.msgpack").write_bytes(flax_msgpack_bytes({"ema_params1": ema, "step": 8}))
    runner = CliRunner()
    done = runner.invoke(
        app, ["convert-jax", str(tmp_path / "ckpt.msgpack"), str(tmp_path / "c"), "--format", fmt]
    )
    assert done.exit_code == 0, done.output
    args = ["sample", "--repo", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "tok")]
    args += ["--num-samples", "2", "--length", "6", "--steps", "2", "--out", str(tmp_path / "s")]
    sampled = runner.invoke(app, args)
    assert sampled.exit_code == 0, sampled.output
    rows = (tmp_path / "s" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert json.loads((tmp_path / "s" / "run.json").read_text())["checkpoint"]["step"] == 8


# ----------------------------------------------------------------------------- T5 encoder


def _write_t5_pickle(path: Path, flat: dict, nested: bool = True, under_params: bool = True):
    tree = nest(flat) if nested else dict(flat)
    path.write_bytes(pickle.dumps({"params": tree} if under_params else tree))


@pytest.mark.parametrize(
    "nested, dtype",
    [(True, np.float32), (False, np.float32), (True, ml_dtypes.bfloat16)],
    ids=["nested", "flat-names", "bfloat16"],
)
def test_t5_pickle_converts_to_a_strictly_loading_encoder_with_the_same_states(
    tmp_path, nested, dtype
):
    from transformers import T5EncoderModel

    flat = {k: v.astype(dtype) for k, v in random_t5_tree(seed=1).items()}
    _write_t5_pickle(tmp_path / "t5.pkl", flat, nested=nested, under_params=nested)
    summary = convert_t5_encoder(tmp_path / "t5.pkl", tmp_path / "enc")
    assert summary["layers"] == 2 and summary["tensors"] == len(flat)
    model, info = T5EncoderModel.from_pretrained(str(tmp_path / "enc"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = np.random.default_rng(3).integers(0, 40, size=(2, 21))  # beyond the exact buckets
    with torch.no_grad():
        hidden = model.eval()(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, t5_forward(as_float32(flat), ids), rtol=1e-5, atol=1e-5)


def test_t5_compare_reports_the_largest_differences(tmp_path):
    _write_t5_pickle(tmp_path / "a.pkl", random_t5_tree(seed=1))
    convert_t5_encoder(tmp_path / "a.pkl", tmp_path / "ref")
    same = convert_t5_encoder(tmp_path / "a.pkl", tmp_path / "enc", compare=str(tmp_path / "ref"))
    assert same["max_weight_diff"] == 0.0 and same["max_hidden_diff"] == 0.0
    other = random_t5_tree(seed=1)
    other["encoder/block_1/layer_1/DenseReluDense/wo/kernel"][2, 3] += 0.5
    _write_t5_pickle(tmp_path / "b.pkl", other)
    diff = convert_t5_encoder(tmp_path / "b.pkl", tmp_path / "enc2", compare=str(tmp_path / "ref"))
    assert diff["max_weight_diff"] == pytest.approx(0.5)
    assert diff["max_weight_diff_tensor"] == "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert diff["max_hidden_diff"] > 0


def test_t5_pickle_of_jax_arrays_converts_without_unpickling_jax(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    flat = random_t5_tree(seed=2)
    tree = {k: jnp.asarray(v) for k, v in flat.items()}
    (tmp_path / "t5.pkl").write_bytes(pickle.dumps({"params": nest(tree)}))
    convert_t5_encoder(tmp_path / "t5.pkl", tmp_path / "enc")
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(tmp_path / "enc")).eval()
    ids = np.arange(12)[None] % 40
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, t5_forward(flat, ids), rtol=1e-5, atol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_t5_pickle_with_any_other_object_is_refused(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"params": {"x": _Exploit()}}))
    with pytest.raises(UserError, match="only arrays and dicts"):
        convert_t5_encoder(tmp_path / "evil.pkl", tmp_path / "enc")
    assert not (tmp_path / "enc").exists()


@pytest.mark.parametrize("how", ["missing", "extra", "wrong shape"])
def test_t5_missing_extra_or_misshapen_tensor_is_named(tmp_path, how):
    flat = random_t5_tree()
    if how == "missing":
        del flat["encoder/block_1/layer_0/SelfAttention/k/kernel"]
        name = "encoder.block.1.layer.0.SelfAttention.k.weight"
    elif how == "extra":
        flat["encoder/block_1/layer_0/SelfAttention/gate/kernel"] = np.ones((2, 2), np.float32)
        name = "encoder/block_1/layer_0/SelfAttention/gate/kernel"
    else:
        flat["encoder/block_0/layer_1/DenseReluDense/wo/kernel"] = np.ones((5, 16), np.float32)
        name = "encoder/block_0/layer_1/DenseReluDense/wo/kernel is [5, 16], expected [24, 16]"
    _write_t5_pickle(tmp_path / "t5.pkl", flat)
    with pytest.raises(UserError, match=PROBLEM_WORD[how]) as error:
        convert_t5_encoder(tmp_path / "t5.pkl", tmp_path / "enc")
    assert name in str(error.value)
    assert not (tmp_path / "enc").exists()
