"""The ELF network, pinned formula by formula (docs/method.md section 3).

Each test computes the quantity a second, slow and obvious way and compares.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elfctl.config import ModelConfig, resolve
from elfctl.model import (
    ELF,
    Attention,
    RMSNorm,
    SwiGLU,
    apply_rope,
    infer_model_config,
    rope_tables,
    timestep_features,
)
from tests.conftest import randomize_, tiny_model_config


def test_timestep_features_use_the_raw_scalar_not_times_1000():
    t = torch.tensor([0.5, 0.0, 3.0])
    features = timestep_features(t)
    assert features.shape == (3, 256)
    for row, value in enumerate(t.tolist()):
        for i in (0, 1, 17, 127):
            arg = value * math.exp(-math.log(10000) * i / 128)
            assert features[row, i].item() == pytest.approx(math.cos(arg), abs=1e-6)
            assert features[row, 128 + i].item() == pytest.approx(math.sin(arg), abs=1e-6)
    # The first feature pair is (cos t, sin t): t = 0.5 is not scaled to 500.
    assert features[0, 0].item() == pytest.approx(math.cos(0.5))


def test_rmsnorm_is_x_over_rms_times_scale_in_fp32():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    expected = torch.tensor([[1 / rms, 2 * 2 / rms, 0.5 * 3 / rms, -4 / rms]])
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def slow_rope(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Rotate each pair (2j, 2j+1) of position p by angle p * 10000^(-2j/d), prefix untouched."""
    B, heads, L, d = x.shape
    out = x.clone()
    for pos in range(num_prefix, L):
        p = pos - num_prefix
        for j in range(d // 2):
            angle = p * 10000 ** (-2 * j / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., pos, 2 * j], x[..., pos, 2 * j + 1]
            out[..., pos, 2 * j] = a * c - b * s
            out[..., pos, 2 * j + 1] = a * s + b * c
    return out


def test_rope_rotates_adjacent_pairs_and_leaves_the_prefix_alone():
    num_prefix, S, d = 3, 5, 8
    x = torch.randn(2, 2, num_prefix + S, d)
    cos, sin = rope_tables(S, d, num_prefix)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated, slow_rope(x, num_prefix), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated[:, :, :num_prefix], x[:, :, :num_prefix])
    # Position 0 of the sequence is not rotated either (angle 0).
    torch.testing.assert_close(rotated[:, :, num_prefix], x[:, :, num_prefix])


def test_attention_splits_qkv_as_three_by_heads_by_head_dim():
    torch.manual_seed(0)
    H, heads, L = 8, 2, 5
    d = H // heads
    attn = randomize_(Attention(H, heads))
    x = torch.randn(1, L, H)
    cos, sin = rope_tables(L - 1, d, 1)

    # Slow: rows [0, H) of the qkv weight are q (head 0 then head 1), then k, then v.
    qkv = x[0] @ attn.qkv.weight.T + attn.qkv.bias  # (L, 3H)
    heads_out = []
    for h in range(heads):
        q = qkv[:, h * d : (h + 1) * d]
        k = qkv[:, H + h * d : H + (h + 1) * d]
        v = qkv[:, 2 * H + h * d : 2 * H + (h + 1) * d]
        q = attn.q_norm(q)
        k = attn.k_norm(k)
        q = slow_rope(q[None, None], 1)[0, 0]
        k = slow_rope(k[None, None], 1)[0, 0]
        weights = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
        heads_out.append(weights @ v)
    expected = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, cos, sin)[0], expected, atol=1e-5, rtol=1e-5)


def test_swiglu_width_is_two_thirds_of_four_h_and_gates_first_half_by_second():
    assert SwiGLU(768, 4.0).w3.in_features == 2048
    assert SwiGLU(768, 4.0).w12.out_features == 4096
    torch.manual_seed(0)
    mlp = randomize_(SwiGLU(6, 4.0))
    inner = int(6 * 4 * 2 / 3)
    x = torch.randn(3, 6)
    hidden = x @ mlp.w12.weight.T + mlp.w12.bias
    a, b = hidden[:, :inner], hidden[:, inner:]
    expected = (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def capture_block_input(model: ELF, *args, **kwargs) -> torch.Tensor:
    seen = {}

    def keep(module, inputs):
        seen["h"] = inputs[0]

    hook = model.blocks[0].register_forward_pre_hook(keep)
    model(*args, **kwargs)
    hook.remove()
    return seen["h"]


def test_prefix_is_time_then_sc_cfg_then_gated_mode_tokens_then_sequence():
    cfg = tiny_model_config()
    model = randomize_(ELF(cfg)).eval()
    B, S, C = 2, 5, cfg.latent_dim
    z = torch.randn(B, S, 2 * C)
    t = torch.tensor([0.3, 0.8])
    sc = torch.tensor([1.0, 3.0])
    gate = torch.tensor([0.0, 1.0])
    h = capture_block_input(model, z, t, sc_scale=sc, decode=gate)
    assert h.shape == (B, 12 + S, cfg.hidden_size)
    with torch.no_grad():
        time_tokens = model.t_emb_tokens + model.t_embedder(t)[:, None]
        sc_tokens = model.self_cond_cfg_tokens + model.self_cond_cfg_embedder(sc)[:, None]
        sequence = model.text_proj(model.self_cond_proj(z))
    torch.testing.assert_close(h[:, 0:4], time_tokens)
    torch.testing.assert_close(h[:, 4:8], sc_tokens)
    torch.testing.assert_close(h[0, 8:12], torch.zeros(4, cfg.hidden_size))  # gate off
    torch.testing.assert_close(h[1, 8:12], model.mode_tokens[0].detach())  # gate on
    torch.testing.assert_close(h[:, 12:], sequence)


def test_text_proj_is_a_bias_free_bottleneck_then_a_biased_linear():
    model = ELF(tiny_model_config())
    assert model.text_proj.proj1.bias is None
    assert model.text_proj.proj2.bias is not None
    assert model.text_proj.proj1.weight.shape == (8, 16)


def test_decoder_head_reads_the_last_hidden_state_with_gelu_tanh_in_fp32():
    cfg = tiny_model_config()
    model = randomize_(ELF(cfg)).eval()
    z = torch.randn(2, 5, 2 * cfg.latent_dim)
    seen = {}

    def keep(module, inputs, output):
        seen["h"] = output

    hook = model.blocks[-1].register_forward_hook(keep)
    x_hat, logits = model(z, torch.ones(2), sc_scale=1.0, decode=True)
    hook.remove()
    h = seen["h"][:, 12:]
    pre = h @ model.proj_kernel + model.proj_bias
    gelu_tanh = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
    expected = gelu_tanh @ model.unembed_kernel + model.unembed_bias
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 5, cfg.vocab_size) and logits.dtype == torch.float32
    final = model.final_layer
    torch.testing.assert_close(x_hat, final.linear(final.norm_final(h)))


def test_no_logits_unless_decoding():
    model = ELF(tiny_model_config()).eval()
    _, logits = model(torch.randn(1, 3, 32), torch.zeros(1), sc_scale=1.0)
    assert logits is None


def test_fresh_model_predicts_zero_because_the_final_layer_starts_at_zero():
    model = ELF(tiny_model_config())
    x_hat, _ = model(torch.randn(2, 4, 32), torch.rand(2), sc_scale=2.0)
    assert torch.count_nonzero(x_hat) == 0
    assert model.t_emb_tokens.std().item() == pytest.approx(0.02, rel=0.5)


def test_shorter_sequences_than_trained_use_positions_zero_to_s_minus_one():
    model = randomize_(ELF(tiny_model_config())).eval()
    for S in (1, 3, 7):
        x_hat, logits = model(torch.randn(2, S, 32), torch.rand(2), sc_scale=1.0, decode=True)
        assert x_hat.shape == (2, S, 16) and logits.shape == (2, S, 18)
    cos, _ = model.rope(3, torch.device("cpu"))
    assert cos.shape == (12 + 3, 16)


def test_bf16_autocast_keeps_heads_and_outputs_in_fp32():
    model = randomize_(ELF(tiny_model_config())).eval()
    z = torch.randn(2, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, logits = model(z, torch.rand(2), sc_scale=1.0, decode=True)
    assert x_hat.dtype == torch.float32 and logits.dtype == torch.float32
    ref_x, _ = model(z, torch.rand(2) * 0 + 0.5, sc_scale=1.0)
    assert torch.isfinite(x_hat).all() and torch.isfinite(ref_x).all()


def official_key_shapes(H, depth, heads, C=512, V=32100, bottleneck=128, inner=None):
    """The state-dict names and shapes of docs/method.md section 7, written out from the spec."""
    inner = inner or int(4 * H * 2 / 3)
    d = H // heads
    shapes = {
        "self_cond_proj.weight": (C, 2 * C),
        "self_cond_proj.bias": (C,),
        "text_proj.proj1.weight": (bottleneck, C),
        "text_proj.proj2.weight": (H, bottleneck),
        "text_proj.proj2.bias": (H,),
        "t_embedder.mlp_0.weight": (H, 256),
        "t_embedder.mlp_0.bias": (H,),
        "t_embedder.mlp_2.weight": (H, H),
        "t_embedder.mlp_2.bias": (H,),
        "t_emb_tokens": (1, 4, H),
        "self_cond_cfg_embedder.mlp_0.weight": (H, 256),
        "self_cond_cfg_embedder.mlp_0.bias": (H,),
        "self_cond_cfg_embedder.mlp_2.weight": (H, H),
        "self_cond_cfg_embedder.mlp_2.bias": (H,),
        "self_cond_cfg_tokens": (1, 4, H),
        "mode_tokens": (1, 4, H),
        "final_layer.norm_final.weight": (H,),
        "final_layer.linear.weight": (C, H),
        "final_layer.linear.bias": (C,),
        "proj_kernel": (H, C),
        "proj_bias": (C,),
        "unembed_kernel": (C, V),
        "unembed_bias": (V,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (H,),
                p + "attn.qkv.weight": (3 * H, H),
                p + "attn.qkv.bias": (3 * H,),
                p + "attn.q_norm.weight": (d,),
                p + "attn.k_norm.weight": (d,),
                p + "attn.proj.weight": (H, H),
                p + "attn.proj.bias": (H,),
                p + "norm2.weight": (H,),
                p + "mlp.w12.weight": (2 * inner, H),
                p + "mlp.w12.bias": (2 * inner,),
                p + "mlp.w3.weight": (H, inner),
                p + "mlp.w3.bias": (H,),
            }
        )
    return shapes


@pytest.mark.parametrize(
    "preset, size, tensors, params",
    [
        ("owt-b", (768, 12, 12), 167, 104_579_940),
        ("owt-m", (1056, 24, 16), 311, 342_540_036),
        ("owt-l", (1280, 32, 16), 407, 652_103_332),
    ],
)
def test_official_sizes_have_the_spec_names_shapes_and_parameter_counts(
    preset, size, tensors, params
):
    with torch.device("meta"):
        model = ELF(resolve(preset).model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_key_shapes(*size)
    assert len(shapes) == tensors
    assert sum(math.prod(s) for s in shapes.values()) == params


@pytest.mark.parametrize("preset", ["owt-b", "owt-m", "owt-l"])
def test_architecture_is_inferred_from_tensor_shapes(preset):
    expected = resolve(preset).model
    state = {
        k: torch.empty(s, device="meta")
        for k, s in official_key_shapes(
            expected.hidden_size, expected.depth, expected.num_heads
        ).items()
    }
    assert infer_model_config(state) == expected


def test_custom_sizes_come_from_config():
    cfg = ModelConfig(
        hidden_size=64,
        depth=3,
        num_heads=4,
        latent_dim=24,
        vocab_size=50,
        bottleneck=16,
        num_sc_tokens=0,
        self_cond=False,
    )
    model = ELF(cfg)
    assert not hasattr(model, "self_cond_proj") and not hasattr(model, "self_cond_cfg_tokens")
    assert model.num_prefix == 8
    x_hat, _ = model(torch.randn(2, 5, 24), torch.rand(2))
    assert x_hat.shape == (2, 5, 24)
    assert infer_model_config(model.state_dict()) == cfg


def test_gelu_tanh_is_torch_tanh_approximation():
    x = torch.linspace(-3, 3, 7)
    manual = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(F.gelu(x, approximate="tanh"), manual)
