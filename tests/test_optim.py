"""Muon + Adam, the lr schedule and the weight EMA (docs/method.md section 4).

Every update is checked against a slow float64 numpy computation written out here,
straight from the spec's formulas.
"""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from elfctl.config import OptimConfig
from elfctl.errors import UserError
from elfctl.training import (
    EMA,
    MuonAdam,
    build_optimizer,
    build_scheduler,
    learning_rate,
    lr_lambda,
    muon_update_scale,
    newton_schulz,
    parameter_kind,
    resolve_warmup_steps,
)

MUON_BETA = 0.95
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


# ---------------------------------------------------------------------------
# Slow references, straight from the spec


def reference_newton_schulz(matrix: np.ndarray) -> np.ndarray:
    """5 quintic Newton-Schulz steps in float64 on the rows <= cols orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = np.array(matrix, dtype=np.float64)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (np.sqrt((x**2).sum()) + 1e-8)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def grads_for(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


def reference_muon_updates(g1: np.ndarray, g2: np.ndarray):
    """Unscaled Muon updates NS(d_t) for t = 1, 2, the momentum formulas written out."""
    b = MUON_BETA
    m1 = (1 - b) * g1  # m_0 = 0
    d1 = b * m1 / (1 - b**2) + (1 - b) * g1 / (1 - b**1)
    m2 = b * m1 + (1 - b) * g2
    d2 = b * m2 / (1 - b**3) + (1 - b) * g2 / (1 - b**2)
    return reference_newton_schulz(d1), reference_newton_schulz(d2)


def one_param_optimizer(param, **group_flags):
    return MuonAdam([{"params": [param], **group_flags}], lr=0.1)


def take_step(optimizer, param, grad):
    param.grad = torch.as_tensor(grad, dtype=torch.float32)
    optimizer.step()


# ---------------------------------------------------------------------------
# Muon


@pytest.mark.parametrize(
    "shape, input_major, expected_scale",
    [
        ((8, 3), False, math.sqrt(8 / 3)),  # Linear (out=8, in=3): fan_out/fan_in = rows/cols
        ((3, 8), False, 1.0),  # Linear (out=3, in=8): fan-in wider, no boost
        ((3, 8), True, math.sqrt(8 / 3)),  # input-major (in=3, out=8): cols/rows
        ((8, 3), True, 1.0),  # input-major (in=8, out=3)
    ],
)
def test_muon_steps_match_hand_computed_reference_for_both_layouts(
    shape, input_major, expected_scale
):
    assert muon_update_scale(shape, input_major) == pytest.approx(expected_scale)
    lr = 0.1
    start = np.random.default_rng(0).standard_normal(shape)
    param = nn.Parameter(torch.tensor(start, dtype=torch.float32))
    optimizer = one_param_optimizer(param, use_muon=True, input_major=input_major)
    g1, g2 = grads_for(shape, seed=1)
    ortho1, ortho2 = reference_muon_updates(g1, g2)

    take_step(optimizer, param, g1)
    after_one = start - lr * expected_scale * ortho1
    np.testing.assert_allclose(param.detach().numpy(), after_one, rtol=1e-5, atol=1e-5)
    take_step(optimizer, param, g2)
    after_two = after_one - lr * expected_scale * ortho2
    np.testing.assert_allclose(param.detach().numpy(), after_two, rtol=1e-5, atol=1e-5)

    # The step's size pins which axis was taken as fan-out.
    applied = np.linalg.norm(after_one - after_two) / (lr * np.linalg.norm(ortho2))
    assert applied == pytest.approx(expected_scale, rel=1e-4)


def test_unembed_kernel_scale_uses_its_second_axis_as_fan_out():
    assert muon_update_scale((512, 32100), input_major=True) == pytest.approx(7.918, abs=1e-3)
    assert muon_update_scale((512, 32100), input_major=False) == 1.0


def test_newton_schulz_matches_float64_reference():
    matrix = np.random.default_rng(3).standard_normal((6, 10))
    ours = newton_schulz(torch.tensor(matrix, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(ours, reference_newton_schulz(matrix), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (100, 300)])
def test_newton_schulz_singular_values_land_in_the_quintic_band(shape):
    torch.manual_seed(0)
    singular_values = torch.linalg.svdvals(newton_schulz(torch.randn(shape)))
    assert singular_values.min() > 0.6
    assert singular_values.max() < 1.25


def test_newton_schulz_runs_in_fp32_for_bf16_input():
    out = newton_schulz(torch.randn(4, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (4, 6)


def test_bias_correction_differs_from_torch_muon_momentum_only_from_step_two():
    """torch.optim.Muon's Nesterov direction is (1-b) g_t + b m_t, uncorrected."""
    b = MUON_BETA
    g1, g2 = grads_for((8, 3), seed=6)
    ours1, ours2 = reference_muon_updates(g1, g2)
    m1 = (1 - b) * g1
    m2 = b * m1 + (1 - b) * g2
    torch1 = reference_newton_schulz((1 - b) * g1 + b * m1)
    torch2 = reference_newton_schulz((1 - b) * g2 + b * m2)
    # Both are multiples of g1 (equal up to the 1e-8 norm epsilon).
    np.testing.assert_allclose(ours1, torch1, rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(ours2 - torch2) > 0.05 * np.linalg.norm(ours2)


def test_newton_schulz_in_bf16_stays_close_to_fp32():
    matrix = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    fp32, bf16 = newton_schulz(matrix), newton_schulz(matrix, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).norm() < 0.05 * fp32.norm()

    param = nn.Parameter(matrix.clone())
    optimizer = MuonAdam([{"params": [param], "use_muon": True, "ns_dtype": "bfloat16"}])
    take_step(optimizer, param, np.ones((16, 48)))
    assert torch.isfinite(param).all() and not torch.equal(param.detach(), matrix)


def test_first_muon_step_agrees_with_torch_muon_for_linear_weights():
    shape, lr = (8, 3), 0.1
    start = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ours = nn.Parameter(start.clone())
    theirs = nn.Parameter(start.clone())
    ours_opt = one_param_optimizer(ours, use_muon=True)
    theirs_opt = torch.optim.Muon([theirs], lr=lr, momentum=MUON_BETA, weight_decay=0.0)
    grad = grads_for(shape, seed=6)[0]
    take_step(ours_opt, ours, grad)
    take_step(theirs_opt, theirs, grad)
    our_update, their_update = ours.detach() - start, theirs.detach() - start
    # Same scale convention for (out, in); torch runs Newton-Schulz in bf16, hence 5 %.
    assert (our_update - their_update).norm() < 0.05 * our_update.norm()


def test_muon_group_rejects_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdam([{"params": [nn.Parameter(torch.zeros(1, 4, 8))], "use_muon": True}])


# ---------------------------------------------------------------------------
# Adam


def test_adam_steps_match_hand_computed_bias_corrected_nesterov():
    lr = 0.1
    start = np.array([0.5, -1.0, 2.0])
    g1 = np.array([0.1, -0.2, 3.0])
    g2 = np.array([-0.3, 0.05, 1.0])
    param = nn.Parameter(torch.tensor(start, dtype=torch.float32))
    optimizer = one_param_optimizer(param)  # use_muon defaults to False

    b1, b2 = ADAM_B1, ADAM_B2
    m1 = (1 - b1) * g1
    v1 = (1 - b2) * g1**2
    d1 = b1 * m1 / (1 - b1**2) + (1 - b1) * g1 / (1 - b1)
    after_one = start - lr * d1 / (np.sqrt(v1 / (1 - b2)) + ADAM_EPS)
    m2 = b1 * m1 + (1 - b1) * g2
    v2 = b2 * v1 + (1 - b2) * g2**2
    d2 = b1 * m2 / (1 - b1**3) + (1 - b1) * g2 / (1 - b1**2)
    after_two = after_one - lr * d2 / (np.sqrt(v2 / (1 - b2**2)) + ADAM_EPS)

    take_step(optimizer, param, g1)
    np.testing.assert_allclose(param.detach().numpy(), after_one, rtol=1e-6, atol=1e-6)
    take_step(optimizer, param, g2)
    np.testing.assert_allclose(param.detach().numpy(), after_two, rtol=1e-6, atol=1e-6)


def test_weight_decay_is_decoupled_and_off_by_default():
    lr, weight_decay = 0.1, 0.5
    matrix = nn.Parameter(torch.ones(3, 4))
    vector = nn.Parameter(torch.ones(4))
    groups = [{"params": [matrix], "use_muon": True}, {"params": [vector]}]
    optimizer = MuonAdam(groups, lr=lr, weight_decay=weight_decay)
    # Zero gradients give a zero update from both Muon and Adam: only the decay acts.
    matrix.grad, vector.grad = torch.zeros(3, 4), torch.zeros(4)
    optimizer.step()
    torch.testing.assert_close(matrix.detach(), torch.full((3, 4), 1 - lr * weight_decay))
    torch.testing.assert_close(vector.detach(), torch.full((4,), 1 - lr * weight_decay))

    untouched = nn.Parameter(torch.ones(4))
    default = MuonAdam([untouched], lr=lr)
    untouched.grad = torch.zeros(4)
    default.step()
    torch.testing.assert_close(untouched.detach(), torch.ones(4))


# ---------------------------------------------------------------------------
# Grouping on an ELF-shaped model


class TinyTimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp_0 = nn.Linear(16, hidden)
        self.mlp_2 = nn.Linear(hidden, hidden)


class TinyTextProj(nn.Module):
    def __init__(self, latent, bottleneck, hidden):
        super().__init__()
        self.proj1 = nn.Linear(latent, bottleneck, bias=False)
        self.proj2 = nn.Linear(bottleneck, hidden)


class TinyAttention(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.RMSNorm(hidden // 2)
        self.k_norm = nn.RMSNorm(hidden // 2)
        self.proj = nn.Linear(hidden, hidden)


class TinyBlock(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.norm1 = nn.RMSNorm(hidden)
        self.attn = TinyAttention(hidden)
        self.norm2 = nn.RMSNorm(hidden)


class TinyELF(nn.Module):
    """Same parameter names and layouts as the real model (docs/method.md section 7)."""

    def __init__(self, hidden=8, latent=6, vocab=10):
        super().__init__()
        self.self_cond_proj = nn.Linear(2 * latent, latent)
        self.text_proj = TinyTextProj(latent, 4, hidden)
        self.t_embedder = TinyTimestepEmbedder(hidden)
        self.t_emb_tokens = nn.Parameter(torch.randn(1, 4, hidden) * 0.02)
        self.mode_tokens = nn.Parameter(torch.randn(1, 4, hidden) * 0.02)
        self.blocks = nn.ModuleList([TinyBlock(hidden) for _ in range(2)])
        self.proj_kernel = nn.Parameter(torch.randn(hidden, latent))  # (H, C) input-major
        self.proj_bias = nn.Parameter(torch.zeros(latent))
        self.unembed_kernel = nn.Parameter(torch.randn(latent, vocab))  # (C, V) input-major
        self.unembed_bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x):  # a loss in which every parameter gets a nonzero gradient
        every_param = sum((p.float().sin().sum() for p in self.parameters()), torch.zeros(()))
        return every_param + (x @ self.proj_kernel @ self.unembed_kernel).square().mean()


def test_grouping_sends_matrices_to_muon_and_marks_input_major_kernels():
    model = TinyELF()
    kinds = {name: parameter_kind(name, p) for name, p in model.named_parameters()}
    assert kinds["self_cond_proj.weight"] == "muon"
    assert kinds["text_proj.proj1.weight"] == "muon"
    assert kinds["t_embedder.mlp_0.weight"] == "muon"
    assert kinds["blocks.1.attn.qkv.weight"] == "muon"
    assert kinds["proj_kernel"] == "muon_input_major"
    assert kinds["unembed_kernel"] == "muon_input_major"
    for adam_name in [
        "self_cond_proj.bias",
        "t_emb_tokens",  # (1, 4, H) is 3-D: not a matrix
        "mode_tokens",
        "blocks.0.norm1.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.qkv.bias",
        "proj_bias",
        "unembed_bias",
    ]:
        assert kinds[adam_name] == "adam", adam_name
    # Wrapper prefixes do not change the decision.
    assert parameter_kind("module.unembed_kernel", model.unembed_kernel) == "muon_input_major"

    optimizer = build_optimizer(model, OptimConfig(), lr=1e-3)
    assert isinstance(optimizer, MuonAdam)
    group_of = {}
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            group_of[id(param)] = index
    flags = {
        name: (
            optimizer.param_groups[group_of[id(p)]]["use_muon"],
            optimizer.param_groups[group_of[id(p)]]["input_major"],
        )
        for name, p in model.named_parameters()
    }
    expected = {
        "muon": (True, False),
        "muon_input_major": (True, True),
        "adam": (False, False),
    }
    assert flags == {name: expected[kind] for name, kind in kinds.items()}


def test_build_optimizer_passes_config_through():
    cfg = OptimConfig(muon_momentum=0.9, muon_ns_steps=3, adam_betas=(0.8, 0.99), adam_eps=1e-6)
    optimizer = build_optimizer(TinyELF(), cfg, lr=2e-3)
    for group in optimizer.param_groups:
        assert group["lr"] == 2e-3
        assert group["muon_momentum"] == 0.9 and group["ns_steps"] == 3
        assert group["adam_betas"] == (0.8, 0.99) and group["adam_eps"] == 1e-6
        assert group["weight_decay"] == 0.0

    adamw = build_optimizer(TinyELF(), OptimConfig(name="adamw", weight_decay=0.1), lr=3e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 0.1
    assert adamw.param_groups[0]["betas"] == (0.9, 0.999)


def test_learning_rate_scales_linearly_with_global_batch():
    assert learning_rate(OptimConfig(blr=1e-3), 512) == pytest.approx(2e-3)
    assert learning_rate(OptimConfig(blr=1e-3), 256) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------
# Resume


def train_steps(model, optimizer, scheduler, inputs):
    for x in inputs:
        optimizer.zero_grad()
        model(x).backward()
        optimizer.step()
        scheduler.step()


def test_optimizer_and_scheduler_state_round_trip_gives_identical_next_steps():
    torch.manual_seed(0)
    inputs = [torch.randn(5, 8) for _ in range(5)]
    model = TinyELF()
    optimizer = build_optimizer(model, OptimConfig(), lr=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10, schedule="cosine")
    train_steps(model, optimizer, scheduler, inputs[:3])

    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what a resume does

    resumed = TinyELF()
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = build_optimizer(resumed, OptimConfig(), lr=0.01)
    resumed_scheduler = build_scheduler(resumed_optimizer, 2, 10, "cosine")
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])

    # Control: the same weights and lr with a fresh optimiser state take different steps.
    fresh = TinyELF()
    fresh.load_state_dict(saved["model"])
    fresh_optimizer = build_optimizer(fresh, OptimConfig(), lr=0.01)
    fresh_scheduler = build_scheduler(fresh_optimizer, 2, 10, "cosine")
    fresh_scheduler.load_state_dict(saved["scheduler"])

    train_steps(model, optimizer, scheduler, inputs[3:])
    train_steps(resumed, resumed_optimizer, resumed_scheduler, inputs[3:])
    train_steps(fresh, fresh_optimizer, fresh_scheduler, inputs[3:])
    continued, resumed_state = model.state_dict(), resumed.state_dict()
    for name, tensor in continued.items():
        assert not torch.equal(tensor, saved["model"][name]), f"{name} did not move"
        assert torch.equal(tensor, resumed_state[name]), name
    assert not torch.equal(continued["unembed_kernel"], fresh.state_dict()["unembed_kernel"])
    assert not torch.equal(continued["proj_bias"], fresh.state_dict()["proj_bias"])
    assert resumed_optimizer.state[resumed.unembed_kernel]["step"] == 5


def test_optimizer_works_under_accelerate():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = TinyELF()
    optimizer = build_optimizer(model, OptimConfig(), lr=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=4, schedule="constant")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    before = model.unembed_kernel.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        accelerator.backward(model(torch.randn(3, 8)))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    assert not torch.equal(before, model.unembed_kernel.detach())
    assert optimizer.state_dict()["state"]  # state is reachable through the wrapper


# ---------------------------------------------------------------------------
# Learning-rate schedule


def test_linear_warmup_starts_at_zero_then_constant():
    values = [lr_lambda(step, 4, None, "constant") for step in range(7)]
    assert values == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(0, 0, None, "constant") == 1.0  # no warm-up


def test_cosine_decays_to_zero_at_total_steps():
    assert lr_lambda(2, 4, 12, "cosine") == 0.5  # still warming up
    assert lr_lambda(4, 4, 12, "cosine") == 1.0
    assert lr_lambda(6, 4, 12, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_lambda(8, 4, 12, "cosine") == pytest.approx(0.5)
    assert lr_lambda(12, 4, 12, "cosine") == pytest.approx(0.0)
    assert lr_lambda(20, 4, 12, "cosine") == pytest.approx(0.0)


def test_scheduler_sets_the_lr_of_every_group():
    optimizer = build_optimizer(TinyELF(), OptimConfig(), lr=0.2)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=None, schedule="constant")
    seen = []
    for _ in range(6):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 0.05, 0.1, 0.15, 0.2, 0.2]
    assert seen == [[pytest.approx(lr)] * len(optimizer.param_groups) for lr in expected]


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="schedule"):
        lr_lambda(10, 4, 12, "linear")


def test_warmup_steps_come_from_steps_or_epochs():
    assert resolve_warmup_steps(OptimConfig(warmup_steps=5000), steps_per_epoch=100) == 5000
    assert resolve_warmup_steps(OptimConfig(warmup_epochs=0.5), steps_per_epoch=19001) == 9500
    assert resolve_warmup_steps(OptimConfig(), steps_per_epoch=100) == 0


# ---------------------------------------------------------------------------
# EMA


class TwoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([10.0]))


def set_params(model, w, b):
    with torch.no_grad():
        model.w.copy_(torch.tensor(w))
        model.b.copy_(torch.tensor(b))


def test_ema_with_fixed_decay_matches_hand_values():
    model = TwoWeights()
    ema = EMA(model, decay=0.9)
    set_params(model, [3.0, 0.0], [0.0])
    ema.update(model)
    # 0.9 * old + 0.1 * new
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.2, 1.8]))
    torch.testing.assert_close(ema.shadow["b"], torch.tensor([9.0]))
    ema.update(model)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.9 * 1.2 + 0.3, 0.9 * 1.8]))


def test_ema_warmup_ramps_decay_and_caps_it():
    model = TwoWeights()
    ema = EMA(model, decay=0.15, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # n = 0: (1 + 0) / (10 + 0)
    set_params(model, [3.0, 0.0], [0.0])
    ema.update(model)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([0.1 * 1 + 0.9 * 3, 0.2]))
    assert ema.current_decay() == pytest.approx(0.15)  # n = 1: min(0.15, 2 / 11)
    ema.update(model)
    expected = 0.15 * torch.tensor([2.8, 0.2]) + 0.85 * torch.tensor([3.0, 0.0])
    torch.testing.assert_close(ema.shadow["w"], expected)
    assert EMA(model, decay=0.9999, warmup=True).current_decay() == pytest.approx(0.1)


def test_ema_keeps_fp32_shadows_of_bf16_parameters():
    model = TwoWeights().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(tensor.dtype == torch.float32 for tensor in ema.shadow.values())
    ema.update(model)
    ema.copy_to(model)
    assert model.w.dtype == torch.bfloat16


def test_ema_state_round_trip_and_copy_to():
    model = TwoWeights()
    ema = EMA(model, decay=0.9, warmup=True)
    set_params(model, [3.0, 0.0], [0.0])
    ema.update(model)

    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMA(TwoWeights(), decay=0.5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.num_updates == 1 and restored.warmup and restored.decay == 0.9
    for name in ema.shadow:
        assert torch.equal(restored.shadow[name], ema.shadow[name])

    target = TwoWeights()
    restored.copy_to(target)
    torch.testing.assert_close(target.w.detach(), ema.shadow["w"])
    saved = restored.averaged_state_dict(target)
    assert set(saved) == {"w", "b"} and torch.equal(saved["b"], ema.shadow["b"])


def test_ema_refuses_a_state_from_another_model():
    ema = EMA(TwoWeights())
    with pytest.raises(UserError, match="do not match"):
        ema.load_state_dict({"decay": 0.9, "warmup": False, "num_updates": 0, "shadow": {}})
