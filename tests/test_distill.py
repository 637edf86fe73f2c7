"""Progressive distillation (docs/method.md section 8): the PD maths on toy teachers whose
velocity fields are known in closed form, the loss against a one-example-at-a-time
computation, and the curriculum (round chaining, resume, the CLI) on the test bed.
Beyond the official recipe (docs/distillation.md): the SDE teacher and the consistency
target, pinned the same ways."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from elfctl.config import ModelConfig, ObjectiveConfig, resolve
from elfctl.errors import UserError
from elfctl.model import ELF, list_step_dirs, save_official_checkpoint
from elfctl.training import (
    DistillRule,
    DistillTrainer,
    EMANetwork,
    PDDraws,
    consistency_target,
    distill,
    distill_loss,
    draw_pd,
    make_accelerator,
    parse_rounds,
    pd_inputs,
    pd_target,
    round_config,
    round_dir,
    student_step,
    substeps_for,
    teacher_times,
    teacher_trajectory,
)
from tests.conftest import randomize_, tiny_model_config

T_EPS = 0.05


# ---------------------------------------------------------------------------
# Toy teachers: callables with the model's signature and a `cfg`


class StraightTeacher:
    """x_hat = x0 everywhere: v = (x0 - z) / (1 - t) points straight at x0, so the ODE's
    solution is z(t) = x0 + (1 - t) / (1 - t_s) (z_s - x0) and Euler is exact on it."""

    def __init__(self, x0):
        self.x0, self.cfg = x0, ModelConfig(self_cond=True)

    def __call__(self, inputs, t, sc_scale=None, decode=False):
        return self.x0.expand(inputs.shape[0], -1, -1).clone(), None


class LinearTeacher:
    """x_hat = a z: v = (a - 1) z / (1 - t), so each Euler step multiplies z by
    1 + (a - 1) h / (1 - t). Records every call for the tests."""

    def __init__(self, a, C):
        self.a, self.C, self.calls = a, C, []
        self.cfg = ModelConfig(self_cond=True)

    def __call__(self, inputs, t, sc_scale=None, decode=False):
        z, x_prev = inputs[..., : self.C], inputs[..., self.C :]
        self.calls.append({"z": z.clone(), "x_prev": x_prev.clone(), "t": t.clone(), "w": sc_scale})
        return self.a * z, None


def hand_draws(B, S, C, u, inner, use_self_cond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return PDDraws(
        u=torch.tensor(u),
        eps=torch.randn(B, S, C, generator=gen),
        inner=torch.tensor(inner),
        is_decoder=torch.zeros(B, dtype=torch.bool),
        lam=torch.full((B, S, 1), 0.5),
        dec_noise=torch.randn(B, S, C, generator=gen),
        use_self_cond=torch.tensor(use_self_cond),
        sc_scale=torch.tensor([1.5, 3.0][:B]),
        drop_condition=torch.zeros(B, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------
# Curriculum arithmetic


def test_the_official_curriculum_gives_the_teacher_4_to_64_sub_steps():
    spans = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert [substeps_for(s, 64) for s in spans] == [4, 8, 16, 32, 64]
    assert substeps_for(1 / 128, 64) == 1


def test_rounds_parse_as_one_round_or_a_range_inside_the_curriculum():
    assert parse_rounds("3", 5) == [3]
    assert parse_rounds("2-4", 5) == [2, 3, 4]
    for bad in ("0", "4-6", "3-2", "x", "1-"):
        with pytest.raises(UserError):
            parse_rounds(bad, 5)


def test_a_round_config_records_its_round_and_its_own_length():
    cfg = resolve("tiny", sets=["distill.teacher=t", "distill.steps_per_round=7"])
    base_steps = cfg.train.max_steps
    r2 = round_config(cfg, 2)
    assert r2.distill.round == 2 and r2.train.max_steps == 7
    assert cfg.distill.round is None and cfg.train.max_steps == base_steps  # input unchanged
    by_epochs = round_config(resolve("tiny", sets=["distill.teacher=t"]), 1)
    assert by_epochs.train.max_steps is None and by_epochs.train.epochs == 1.0


# ---------------------------------------------------------------------------
# The PD maths


def test_sub_step_times_are_sorted_start_at_t_s_and_end_at_t_t():
    gen = torch.Generator().manual_seed(0)
    d = draw_pd(64, 2, 3, 16, ObjectiveConfig(), "cpu", gen)
    span = 0.25
    t_s = d.u * (1 - span)
    times = teacher_times(t_s, t_s + span, d.inner)
    assert times.shape == (64, 17)
    assert torch.equal(times[:, 0], t_s) and torch.equal(times[:, -1], t_s + span)
    assert (times.diff(dim=1) >= 0).all()
    assert (t_s >= 0).all() and (times[:, -1] <= 1).all()


def test_inner_times_are_the_draws_rescaled_into_the_span():
    times = teacher_times(torch.tensor([0.2]), torch.tensor([0.6]), torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(times, torch.tensor([[0.2, 0.3, 0.4, 0.6]]))


def test_straight_teacher_target_is_the_analytic_end_point_inverted():
    B, S, C = 2, 3, 4
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, S, C, generator=gen)
    z_s = torch.randn(B, S, C, generator=gen)
    t_s, t_t = torch.tensor([0.1, 0.3]), torch.tensor([0.35, 0.55])
    times = teacher_times(t_s, t_t, torch.tensor([[0.2, 0.7], [0.5, 0.6]]))
    no_cond = torch.zeros(B, S, dtype=torch.bool)
    x = torch.zeros(B, S, C)
    z_end, _, _ = teacher_trajectory(
        StraightTeacher(x0), z_s, torch.zeros_like(z_s), times, torch.ones(B), x, no_cond, T_EPS
    )
    analytic_end = x0 + ((1 - t_t) / (1 - t_s))[:, None, None] * (z_s - x0)
    torch.testing.assert_close(z_end, analytic_end)
    target = pd_target(z_s, analytic_end, t_s, t_t, torch.zeros_like(z_s))
    # Inverting the straight line from z_s through the end point recovers x0 itself.
    torch.testing.assert_close(target, x0.expand(B, -1, -1))


def test_one_student_step_to_the_target_lands_on_the_teachers_multi_step_end_point():
    B, S, C, a = 2, 3, 4, 0.6
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(B, S, C, generator=gen)
    t_s, t_t = torch.tensor([0.05, 0.4]), torch.tensor([0.3, 0.65])
    times = teacher_times(t_s, t_t, torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.4, 0.8]]))
    no_cond = torch.zeros(B, S, dtype=torch.bool)
    teacher = LinearTeacher(a, C)
    z_end, _, _ = teacher_trajectory(
        teacher, z_s, torch.zeros_like(z_s), times, torch.ones(B), z_s, no_cond, T_EPS
    )
    # By hand: each Euler step multiplies z by 1 + (a - 1) h_i / (1 - t_i).
    for b in range(B):
        factor = 1.0
        for i in range(3 + 1):
            t, t_next = times[b, i].item(), times[b, i + 1].item()
            factor *= 1 + (a - 1) * (t_next - t) / (1 - t)
        torch.testing.assert_close(z_end[b], factor * z_s[b])
    target = pd_target(z_s, z_end, t_s, t_t, torch.zeros_like(z_s))
    expected = z_s + ((1 - t_s) / (t_t - t_s))[:, None, None] * (z_end - z_s)
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(student_step(z_s, target, t_s, t_t, T_EPS), z_end)


def test_spans_below_a_thousandth_regress_onto_the_teachers_direct_prediction():
    z_s, z_end, direct = torch.zeros(2, 1, 1), torch.ones(2, 1, 1), torch.full((2, 1, 1), 7.0)
    t_s, t_t = torch.tensor([0.5, 0.5]), torch.tensor([0.5005, 0.75])
    target = pd_target(z_s, z_end, t_s, t_t, direct)
    assert target[:, 0, 0].tolist() == [7.0, pytest.approx(0.5 / 0.25)]


def test_teacher_sub_steps_chain_self_conditioning_and_share_the_students_first_one():
    B, S, C = 2, 3, 4
    teacher = LinearTeacher(0.5, C)
    x = torch.randn(B, S, C, generator=torch.Generator().manual_seed(3))
    no_cond = torch.zeros(B, S, dtype=torch.bool)
    # Row 0 takes the teacher's self-conditioning half, row 1 zeros.
    draws = hand_draws(B, S, C, [0.3, 0.6], [[0.2, 0.4, 0.9], [0.1, 0.5, 0.6]], [True, False])
    pd = pd_inputs(teacher, x, no_cond, draws, span=0.25, noise_scale=2.0, t_eps=T_EPS)
    first, *steps = teacher.calls  # the zero-self-condition call, then 4 sub-steps
    assert len(steps) == 4
    # The zero-self-condition call runs on the rows that take the half only: row 0.
    assert torch.equal(first["x_prev"], torch.zeros(1, S, C))
    assert torch.equal(first["z"], pd.z_s[:1]) and torch.equal(first["t"], pd.t_s[:1])
    # The half: row 0 = the teacher's x_hat from that call, row 1 = zeros.
    torch.testing.assert_close(pd.self_cond[0], 0.5 * pd.z_s[0])
    assert pd.self_cond[1].abs().sum() == 0
    assert torch.equal(steps[0]["x_prev"], pd.self_cond)  # the student gets the same half
    for i in range(1, 4):
        torch.testing.assert_close(steps[i]["x_prev"], 0.5 * steps[i - 1]["z"])
    ts = torch.stack([c["t"] for c in steps] + [pd.t_t], dim=1)
    torch.testing.assert_close(ts, pd.times)
    torch.testing.assert_close(ts[:, 0], torch.tensor([0.3, 0.6]) * (1 - 0.25))  # u (1 - span)
    assert torch.equal(first["w"], draws.sc_scale[:1])  # the SC-CFG scale reaches every call
    for call in steps:
        assert torch.equal(call["w"], draws.sc_scale)


def test_condition_positions_never_move():
    B, S, C = 2, 5, 4
    torch.manual_seed(0)
    teacher = randomize_(ELF(tiny_model_config(vocab_size=18)), std=0.3).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, S, C * 4, generator=gen)  # tiny_model_config has latent_dim 16
    cond = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    draws = draw_pd(B, S, 16, 8, ObjectiveConfig(self_cond_prob=1.0), "cpu", gen)
    pd = pd_inputs(teacher, x, cond, draws, span=0.5, noise_scale=2.0, t_eps=T_EPS)
    where = cond[..., None].expand_as(x)
    for name in ("z_s", "self_cond", "z_end", "target"):
        assert torch.equal(getattr(pd, name)[where], x[where]), name
    assert not torch.allclose(pd.z_end[~where], pd.z_s[~where])  # the rest did move


# ---------------------------------------------------------------------------
# The loss against a one-example-at-a-time computation


def slow_distill_loss(
    student, teacher, x, ids, cond, loss_mask, d, cfg, span, rule=None, target_net=None
):
    """Section 8 written out per example, with plain loops over the sub-steps (and, with a
    `rule`, the SDE teacher's churn and the consistency target written out the same way)."""
    rule = rule or DistillRule()
    losses = []
    C = x.shape[-1]
    for b in range(x.shape[0]):
        xb, cb, mb = x[b : b + 1], cond[b : b + 1, :, None], loss_mask[b].float()
        w = d.sc_scale[b : b + 1]
        zeros = torch.where(cb, xb, torch.zeros_like(xb))
        if d.is_decoder[b]:
            lam = d.lam[b : b + 1]
            z_dec = lam * xb + (1 - lam) * cfg.decoder_noise_scale * d.dec_noise[b : b + 1]
            no_self_cond = torch.zeros_like(xb)  # the whole row, condition positions too
            inputs = torch.cat([z_dec, no_self_cond], -1)
            _, logits = student(inputs, torch.ones(1), sc_scale=w, decode=1)
            ce = F.cross_entropy(logits[0], ids[b], reduction="none")
            losses.append((ce * mb).sum() / mb.sum())
            continue
        t_s = d.u[b] * (1 - span)
        t_t = t_s + span
        z_s = torch.where(cb, xb, t_s * xb + (1 - t_s) * cfg.noise_scale * d.eps[b : b + 1])
        with torch.no_grad():
            half = zeros
            if d.use_self_cond[b]:
                half, _ = teacher(torch.cat([z_s, zeros], -1), t_s[None], sc_scale=w)
                half = torch.where(cb, xb, half)
            times = [t_s] + [t_s + r * span for r in d.inner[b]] + [t_t]
            z, prev = z_s, half
            for i, (t, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
                if rule.teacher_sampler == "sde":
                    alpha = min(max(1 - rule.teacher_gamma * (t_next - t).item(), 0.0), 1.0)
                    z = alpha * z + (1 - alpha) * cfg.noise_scale * d.churn[b : b + 1, i]
                    z, t = torch.where(cb, xb, z), alpha * t
                x_hat, _ = teacher(torch.cat([z, prev], -1), t[None], sc_scale=w)
                x_hat = torch.where(cb, xb, x_hat)
                z = z + (t_next - t) * (x_hat - z) / max(1 - t.item(), T_EPS)
                z = torch.where(cb, xb, z)
                prev = x_hat
            target = z_s + (1 - t_s) / (t_t - t_s) * (z - z_s)
            if rule.target == "consistency":
                net = target_net or student
                target, _ = net(torch.cat([z, prev], -1), t_t[None], sc_scale=w)
                target = torch.where(cb, xb, target)
        pred, _ = student(torch.cat([z_s, half], -1), t_s[None], sc_scale=w, decode=0)
        squared = ((pred - target) ** 2).sum(-1)[0] / C
        losses.append((squared * mb).sum() / mb.sum())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("conditional", [False, True])
def test_loss_is_the_mean_over_examples_of_per_example_ce_or_pd_error(conditional):
    B, S, C, V = 6, 5, 16, 18
    gen = torch.Generator().manual_seed(5)
    student = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=2, std=0.15).eval()
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, V, (B, S), generator=gen)
    cond_len = torch.tensor([2, 0, 1, 0, 1, 0]) if conditional else torch.zeros(B, dtype=int)
    cond = torch.arange(S)[None] < cond_len[:, None]
    # Rows of different lengths: each example still weighs the same.
    valid = torch.arange(S)[None] < torch.tensor([5, 3, 4, 5, 2, 4])[:, None]
    loss_mask = valid & ~cond
    cfg = ObjectiveConfig()
    d = draw_pd(B, S, C, 4, cfg, "cpu", gen)
    d.is_decoder = torch.tensor([True, False, False, True, False, False])
    d.use_self_cond = torch.tensor([False, True, False, False, True, True])
    parts = distill_loss(student, teacher, x, ids, cond, loss_mask, d, cfg, 0.25, T_EPS)
    slow = slow_distill_loss(student, teacher, x, ids, cond, loss_mask, d, cfg, 0.25)
    torch.testing.assert_close(parts.loss, slow, rtol=1e-5, atol=1e-6)
    assert parts.ce_tokens.item() == 2 and parts.l2_tokens.item() == 4  # examples, not tokens
    torch.testing.assert_close((parts.ce_sum + parts.l2_sum) / B, slow.detach())
    # A given denominator replaces the batch size (the trainer's global example count).
    halved = distill_loss(student, teacher, x, ids, cond, loss_mask, d, cfg, 0.25, T_EPS, 2 * B)
    torch.testing.assert_close(halved.loss, slow / 2, rtol=1e-5, atol=1e-6)


RULES = [
    DistillRule("progressive", "sde", 1.5),
    DistillRule("consistency", "ode"),
    DistillRule("consistency", "sde", 2.0),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.target}-{r.teacher_sampler}")
def test_other_rules_give_the_loss_and_gradients_written_out_per_example(rule):
    B, S, C, V = 6, 5, 16, 18
    gen = torch.Generator().manual_seed(12)
    student = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=2, std=0.15).eval()
    twin = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=1, std=0.15)
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, V, (B, S), generator=gen)
    cond = torch.arange(S)[None] < torch.tensor([2, 0, 1, 0, 1, 0])[:, None]
    cfg = ObjectiveConfig()
    d = draw_pd(B, S, C, 3, cfg, "cpu", gen, churn=True)
    d.is_decoder = torch.tensor([True, False, False, False, False, False])
    d.use_self_cond = torch.tensor([False, True, False, False, True, True])
    args = (x, ids, cond, ~cond, d, cfg, 0.25)
    parts = distill_loss(student, teacher, *args, T_EPS, rule=rule)
    slow = slow_distill_loss(twin, teacher, *args, rule=rule)
    torch.testing.assert_close(parts.loss, slow, rtol=1e-5, atol=1e-6)
    official = distill_loss(student, teacher, *args, T_EPS)
    assert not torch.allclose(parts.loss, official.loss)  # the rule changed the target
    # The consistency target is the student's prediction without gradient: the gradients
    # are those of the written-out loss, whose target is computed under no_grad.
    parts.loss.backward()
    slow.backward()
    for (name, a), b in zip(student.named_parameters(), twin.parameters(), strict=True):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_consistency_target_can_come_from_a_target_network_that_gets_no_gradient():
    B, S, C, V = 4, 5, 16, 18
    gen = torch.Generator().manual_seed(15)
    student = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=2, std=0.15).eval()
    target_net = randomize_(ELF(tiny_model_config(vocab_size=V)), seed=3, std=0.15)
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, V, (B, S), generator=gen)
    no_cond, mask = torch.zeros(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    d = draw_pd(B, S, C, 2, ObjectiveConfig(), "cpu", gen)
    d.is_decoder = torch.zeros(B, dtype=torch.bool)
    rule = DistillRule("consistency")
    args = (x, ids, no_cond, mask, d, ObjectiveConfig(), 0.5)
    parts = distill_loss(student, teacher, *args, T_EPS, rule=rule, target_net=target_net)
    slow = slow_distill_loss(student, teacher, *args, rule=rule, target_net=target_net)
    torch.testing.assert_close(parts.loss, slow, rtol=1e-5, atol=1e-6)
    own = distill_loss(student, teacher, *args, T_EPS, rule=rule)
    assert not torch.allclose(parts.loss, own.loss)
    parts.loss.backward()
    assert all(p.grad is None for p in target_net.parameters())


def test_the_ema_network_is_the_model_run_with_its_ema_weights():
    model = randomize_(ELF(tiny_model_config()), seed=1, std=0.15)
    averaged = randomize_(ELF(tiny_model_config()), seed=2, std=0.15)
    shadow = {name: p.detach().clone() for name, p in averaged.named_parameters()}
    inputs, t = torch.randn(2, 5, 32), torch.tensor([0.3, 0.8])
    got, _ = EMANetwork(model, shadow)(inputs, t, sc_scale=torch.ones(2))
    want, _ = averaged(inputs, t, sc_scale=torch.ones(2))
    torch.testing.assert_close(got, want)
    assert EMANetwork(model, shadow).cfg is model.cfg


def test_the_sde_teacher_churns_before_each_sub_step_as_the_sde_sampler():
    # On the linear teacher x_hat = a z, by hand: back to t_b = alpha t with
    # z_b = alpha z + (1 - alpha) s eps_i, alpha = clip(1 - gamma h), then
    # z' = z_b + (t_next - t_b) (a - 1) z_b / (1 - t_b).
    B, S, C, a, gamma, s = 2, 3, 4, 0.6, 1.5, 2.0
    gen = torch.Generator().manual_seed(13)
    z_s = torch.randn(B, S, C, generator=gen)
    churn = torch.randn(B, 3, S, C, generator=gen)
    t_s, t_t = torch.tensor([0.05, 0.4]), torch.tensor([0.3, 0.65])
    times = teacher_times(t_s, t_t, torch.tensor([[0.2, 0.5], [0.3, 0.9]]))
    no_cond = torch.zeros(B, S, dtype=torch.bool)

    def end(gamma_):
        args = (z_s, torch.zeros_like(z_s), times, torch.ones(B), z_s, no_cond, T_EPS)
        return teacher_trajectory(LinearTeacher(a, C), *args, churn, gamma_, s)[0]

    z_end = end(gamma)
    for b in range(B):
        z = z_s[b]
        for i in range(3):
            t, t_next = times[b, i].item(), times[b, i + 1].item()
            alpha = min(max(1 - gamma * (t_next - t), 0.0), 1.0)
            z, t = alpha * z + (1 - alpha) * s * churn[b, i], alpha * t
            z = z + (t_next - t) * (a - 1) * z / (1 - t)
        torch.testing.assert_close(z_end[b], z)
    ode_end = end(0.0)
    plain, _, _ = teacher_trajectory(
        LinearTeacher(a, C), z_s, torch.zeros_like(z_s), times, torch.ones(B), z_s, no_cond, T_EPS
    )
    torch.testing.assert_close(ode_end, plain)  # no churn: the official Euler teacher


def test_the_churn_noise_is_drawn_after_every_official_draw():
    official = draw_pd(4, 3, 2, 5, ObjectiveConfig(), "cpu", torch.Generator().manual_seed(1))
    churned = draw_pd(4, 3, 2, 5, ObjectiveConfig(), "cpu", torch.Generator().manual_seed(1), True)
    for name in ("u", "eps", "inner", "lam", "dec_noise", "sc_scale"):
        assert torch.equal(getattr(official, name), getattr(churned, name)), name
    assert official.churn is None and churned.churn.shape == (4, 5, 3, 2)
    assert churned.rows(torch.tensor([2])).churn.shape == (1, 5, 3, 2)


def test_the_consistency_target_is_the_students_own_prediction_where_the_path_ends():
    B, S, C, a = 3, 2, 4, 0.7
    student = LinearTeacher(a, C)
    gen = torch.Generator().manual_seed(14)
    z_end, x_prev = torch.randn(B, S, C, generator=gen), torch.randn(B, S, C, generator=gen)
    x = torch.randn(B, S, C, generator=gen)
    cond = torch.tensor([[True, False], [False, False], [False, False]])
    t_t, w = torch.tensor([0.3, 0.9, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    target = consistency_target(student, z_end, x_prev, t_t, w, x, cond)
    (call,) = student.calls
    assert torch.equal(call["x_prev"], x_prev) and torch.equal(call["t"], t_t)
    assert torch.equal(call["w"], w)
    torch.testing.assert_close(target[0, 1], a * z_end[0, 1])
    assert torch.equal(target[0, 0], x[0, 0])  # condition positions carry x
    torch.testing.assert_close(target[1], a * z_end[1])
    assert torch.equal(target[2], z_end[2])  # at t = 1 the path's end is the target


def test_the_teacher_runs_only_on_the_rows_that_use_it():
    # Decoder rows never see the teacher; the zero-self-condition call covers only the PD
    # rows that take the teacher's half. Same loss as computing everything for every row.
    B, S, C = 6, 5, 16
    gen = torch.Generator().manual_seed(7)
    student = randomize_(ELF(tiny_model_config()), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config()), seed=2, std=0.15).eval()
    rows_seen = []
    teacher.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    d = replace(
        draw_pd(B, S, C, 4, ObjectiveConfig(), "cpu", gen),
        is_decoder=torch.tensor([True, False, False, True, False, False]),
        use_self_cond=torch.tensor([True, True, False, False, True, False]),
    )
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, 18, (B, S), generator=gen)
    no_cond, mask = torch.zeros(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    parts = distill_loss(student, teacher, x, ids, no_cond, mask, d, ObjectiveConfig(), 0.25, T_EPS)
    assert rows_seen == [2, 4, 4, 4, 4]  # rows 1 and 4 take the half; 4 PD rows x 4 sub-steps
    slow = slow_distill_loss(student, teacher, x, ids, no_cond, mask, d, ObjectiveConfig(), 0.25)
    torch.testing.assert_close(parts.loss, slow, rtol=1e-5, atol=1e-6)


def test_a_batch_of_decoder_rows_only_needs_no_teacher():
    B, S, C = 3, 4, 16
    gen = torch.Generator().manual_seed(8)
    student = randomize_(ELF(tiny_model_config()), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config()), seed=2, std=0.15).eval()
    teacher.register_forward_hook(lambda *a: pytest.fail("the teacher ran"))
    d = replace(draw_pd(B, S, C, 4, ObjectiveConfig(), "cpu", gen), is_decoder=torch.ones(B) > 0)
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, 18, (B, S), generator=gen)
    no_cond, mask = torch.zeros(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    parts = distill_loss(student, teacher, x, ids, no_cond, mask, d, ObjectiveConfig(), 0.5, T_EPS)
    assert parts.l2_tokens.item() == 0 and torch.isfinite(parts.loss)


def test_conditional_decoder_rows_of_distillation_corrupt_the_whole_row():
    # Section 8's decoder rows are section 4's: lam x + (1 - lam) n s at every position,
    # condition positions included, and a zero self-conditioning half over the whole row.
    B, S, C = 4, 5, 16
    gen = torch.Generator().manual_seed(9)
    student = randomize_(ELF(tiny_model_config()), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config()), seed=2, std=0.15).eval()
    cfg = ObjectiveConfig(decoder_noise_scale=1.0)
    d = replace(
        draw_pd(B, S, C, 2, cfg, "cpu", gen),
        is_decoder=torch.tensor([True, False, True, False]),
        drop_condition=torch.tensor([False, False, True, False]),
    )
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, 18, (B, S), generator=gen)
    cond = torch.arange(S)[None] < torch.tensor([2, 2, 3, 1])[:, None]
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    distill_loss(student, teacher, x, ids, cond, ~cond, d, cfg, 0.5, T_EPS)
    (inputs,) = seen
    for b in (0, 2):
        for p in range(S):
            clean = x[b, p] * (0.0 if d.drop_condition[b] and cond[b, p] else 1.0)
            lam = float(d.lam[b, p, 0])
            expected = lam * clean + (1 - lam) * 1.0 * d.dec_noise[b, p]
            torch.testing.assert_close(inputs[b, p, :C], expected, msg=f"row {b} pos {p}")
            assert torch.equal(inputs[b, p, C:], torch.zeros(C)), f"row {b} pos {p}"
    for b in (1, 3):  # PD rows keep the clean condition in z_s and in the half
        where = cond[b]
        torch.testing.assert_close(inputs[b, where, :C], x[b, where])
        torch.testing.assert_close(inputs[b, where, C:], x[b, where])


def test_gradients_reach_the_student_and_never_the_teacher():
    B, S, C = 4, 5, 16
    gen = torch.Generator().manual_seed(6)
    student = randomize_(ELF(tiny_model_config()), seed=1, std=0.15)
    teacher = randomize_(ELF(tiny_model_config()), seed=2, std=0.15)
    d = replace(
        draw_pd(B, S, C, 2, ObjectiveConfig(), "cpu", gen),
        is_decoder=torch.tensor([True, False, False, False]),
    )
    x = torch.randn(B, S, C, generator=gen)
    ids = torch.randint(0, 18, (B, S), generator=gen)
    no_cond, mask = torch.zeros(B, S, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    parts = distill_loss(student, teacher, x, ids, no_cond, mask, d, ObjectiveConfig(), 0.5, T_EPS)
    parts.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.final_layer.linear.weight.grad.abs().sum() > 0
    assert student.unembed_kernel.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# The curriculum on the test bed

SMALL = [
    "model.hidden_size=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.bottleneck=16",
    "train.global_batch=8",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=3",
    "optim.warmup_steps=0",
    "distill.spans=[0.25, 0.5]",
    "distill.teacher_resolution=8",
    "distill.steps_per_round=3",
]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """An official-format teacher whose raw and EMA weights differ (the EMA ones teach)."""
    cfg = resolve("tiny", sets=SMALL)
    torch.manual_seed(0)
    ema = randomize_(ELF(cfg.model), seed=10, std=0.1).state_dict()
    raw = randomize_(ELF(cfg.model), seed=11, std=0.1).state_dict()
    path = tmp_path_factory.mktemp("teacher") / "checkpoint_500"
    return save_official_checkpoint(path, raw, ema, 500), ema


def small_config(teacher, *extra):
    return resolve("tiny", sets=SMALL + [f"distill.teacher={teacher}", *extra])


def newest_ema(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_step_dirs(run / "checkpoints")[-1] / "model.safetensors"))


def test_round_two_starts_from_round_ones_ema_weights_with_a_fresh_optimiser(
    tmp_path, teacher_file
):
    path, teacher_ema = teacher_file
    cfg = small_config(path)
    acc = make_accelerator(cpu=True)
    results = distill(cfg, tmp_path / "pd", [1], accelerator=acc)
    assert results[0].step == 3 and not results[0].skipped
    round_one = newest_ema(round_dir(tmp_path / "pd", 1))

    trainer = DistillTrainer(round_config(cfg, 2), round_dir(tmp_path / "pd", 2), acc)
    assert trainer.step == 0 and trainer.ema.num_updates == 0
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.scheduler.last_epoch == 0
    for name, tensor in trainer.raw_model.state_dict().items():
        torch.testing.assert_close(tensor, round_one[name])  # round 1's EMA, not its raw weights
        torch.testing.assert_close(trainer.ema.shadow.get(name, tensor), round_one[name])
        torch.testing.assert_close(trainer.teacher.state_dict()[name], teacher_ema[name])
    assert trainer.span == 0.5 and trainer.substeps == 4


def test_round_one_starts_from_the_teachers_ema_weights(tmp_path, teacher_file):
    path, teacher_ema = teacher_file
    trainer = DistillTrainer(
        round_config(small_config(path), 1), tmp_path / "r1", make_accelerator(cpu=True)
    )
    for name, tensor in trainer.raw_model.state_dict().items():
        torch.testing.assert_close(tensor, teacher_ema[name])
    assert trainer.substeps == 2
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_a_consistency_round_takes_its_target_from_the_students_ema_weights(tmp_path, teacher_file):
    path, _ = teacher_file
    acc = make_accelerator(cpu=True)
    consistency = small_config(path, "distill.target=consistency")
    trainer = DistillTrainer(round_config(consistency, 1), tmp_path / "cd", acc)
    net = trainer.target_network()
    assert isinstance(net, EMANetwork) and net.weights is trainer.ema.shadow
    itself = small_config(path, "distill.target=consistency", "distill.target_network=student")
    assert DistillTrainer(round_config(itself, 1), tmp_path / "s", acc).target_network() is None
    official = DistillTrainer(round_config(small_config(path), 1), tmp_path / "pd", acc)
    assert official.target_network() is None


def test_a_round_refuses_to_start_before_the_previous_one_finished(tmp_path, teacher_file):
    path, _ = teacher_file
    acc = make_accelerator(cpu=True)
    with pytest.raises(UserError, match="holds no checkpoint"):
        distill(small_config(path), tmp_path / "pd", [2], accelerator=acc)

    def kill_after_the_step_2_checkpoint(report):
        if report.checkpoint is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(small_config(path), tmp_path / "pd", [1], on_step=kill_after_the_step_2_checkpoint)
    with pytest.raises(UserError, match=r"Round 1 .* is not finished \(step 2 of 3\)"):
        distill(small_config(path), tmp_path / "pd", [2], accelerator=acc)


@pytest.mark.parametrize(
    "rule",
    [[], ["distill.target=consistency", "distill.teacher_sampler=sde"]],
    ids=["official", "consistency-ema-sde"],
)
def test_a_killed_curriculum_resumes_in_its_round_and_matches_an_unbroken_one(
    tmp_path, teacher_file, rule
):
    path, _ = teacher_file
    cfg = small_config(path, *rule)
    acc = make_accelerator(cpu=True)

    class Killed(Exception):
        pass

    def kill_in_round_two(report):
        if (
            report.step == 2
            and report.checkpoint is not None
            and "round_2" in str(report.checkpoint)
        ):
            raise Killed

    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        distill(cfg, broken, accelerator=acc, on_step=kill_in_round_two)
    assert [p.name for p in list_step_dirs(broken / "round_2" / "checkpoints")] == ["step_00000002"]

    results = distill(cfg, broken, accelerator=acc)
    assert [(r.round, r.skipped) for r in results] == [(1, True), (2, False)]
    assert results[1].result.resumed_from == 2 and results[1].step == 3

    unbroken = tmp_path / "unbroken"
    shutil.copytree(broken / "round_1", unbroken / "round_1")
    distill(cfg, unbroken, [2], accelerator=acc)
    a, b = newest_ema(broken / "round_2"), newest_ema(unbroken / "round_2")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)
    log = [json.loads(x) for x in (broken / "round_2" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)


def test_distill_command_trains_rounds_whose_students_elfctl_sample_loads(tmp_path, teacher_file):
    from elfctl.cli import app

    path, _ = teacher_file
    run = tmp_path / "pd"
    args = ["distill", "--preset", "tiny", "--teacher", str(path), "--run-dir", str(run)]
    args += [a for s in SMALL for a in ("--set", s)] + ["--max-steps", "1", "--cpu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [r["teacher_substeps"] for r in summary["rounds"]] == [2, 4]

    again = CliRunner().invoke(app, args[:-1] + ["--round", "2"])
    assert again.exit_code == 0, again.output
    assert "round 2: already finished" in again.output

    sample_dir = tmp_path / "samples"
    sampled = CliRunner().invoke(
        app,
        ["sample", "--repo", str(run / "round_2"), "--steps", "2", "--num-samples", "2"]
        + ["--out", str(sample_dir), "--cpu"],
    )
    assert sampled.exit_code == 0, sampled.output
    assert len((sample_dir / "samples.jsonl").read_text().splitlines()) == 2


def test_a_round_the_time_cap_stops_says_so_and_how_to_go_on(tmp_path, teacher_file):
    from elfctl.cli import app

    path, _ = teacher_file
    args = ["distill", "--preset", "tiny", "--teacher", str(path), "--run-dir", str(tmp_path)]
    args += [a for s in SMALL for a in ("--set", s)] + ["--max-steps", "5", "--cpu"]
    result = CliRunner().invoke(app, args + ["--set", "train.max_minutes=0.0001"])
    assert result.exit_code == 0, result.output
    assert "round 1: stopped at step 1/3" in result.output  # SMALL: 3 steps a round
    assert "train.max_minutes=0.0001 stopped it: run the same command again" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rounds", "1-9"], "outside the curriculum"),
        (["--rounds", "1", "--round", "1"], "not both"),
        (["--set", "distill.spans=[0.5, 1.5]"], "spans[1]"),
        (["--set", "distill.target=flow"], "distill.target must be one of progressive"),
        (["--set", "distill.teacher_sampler=heun"], "teacher_sampler must be one of ode, sde"),
        (["--set", "distill.teacher_gamma=-1"], "teacher_gamma must be at least 0"),
        (["--set", "distill.target_network=teacher"], "target_network must be one of ema"),
    ],
)
def test_distill_command_rejects_bad_input_with_one_sentence(tmp_path, extra, message):
    from elfctl.cli import app

    args = ["distill", "--preset", "tiny", "--teacher", "x", "--run-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args + extra)
    assert result.exit_code == 2 and message in result.output, result.output


def test_distill_command_needs_a_teacher(tmp_path):
    from elfctl.cli import app

    result = CliRunner().invoke(app, ["distill", "--preset", "tiny", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "No teacher" in result.output


def test_owt_b_pd_preset_holds_the_curriculum_and_the_few_step_table():
    cfg = resolve("owt-b-pd")
    assert cfg.distill.teacher == "embedded-language-flows/ELF-B-owt-torch"
    assert cfg.distill.spans == [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert cfg.distill.teacher_resolution == 64 and cfg.distill.epochs_per_round == 1.0
    assert cfg.optim.warmup_epochs == 0.1 and cfg.train.global_batch == 512
    table = {s.name: s for s in cfg.sampling}
    assert list(table) == ["sde-1", "sde-2", "sde-4", "sde-8", "sde-16", "sde-32"]
    ppl = [136.10, 68.25, 34.33, 23.18, 22.12, 21.32]
    entropy = [5.26, 5.24, 5.16, 5.07, 5.06, 5.04]
    for (name, s), p, e in zip(table.items(), ppl, entropy, strict=True):
        assert s.steps == int(name.split("-")[1]) and s.method == "sde"
        assert (s.gamma, s.sc_cfg) == ((1.5, 2.5) if s.steps <= 8 else (2.0, 2.0))
        assert s.time_schedule == "logit_normal" and s.cfg == 1.0
        assert s.paper == {"gen_ppl": p, "entropy": e}
    base = resolve("owt-b")
    assert cfg.model == base.model and cfg.encoder == base.encoder and cfg.data == base.data
    assert cfg.objective == base.objective
