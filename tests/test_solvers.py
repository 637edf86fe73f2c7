"""The sampler's step rules (elfctl/sampling/solvers.py) against slow, obviously correct loops,
against the exact flow of Gaussian data (where the ODE's solution is known), and the grids."""

from __future__ import annotations

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from elfctl.errors import UserError
from elfctl.model import ELF, flow
from elfctl.sampling import (
    SOLVERS,
    Condition,
    KnownTokens,
    SamplerSettings,
    SampleStreams,
    check_sampler,
    check_schedule,
    forwards_for,
    sample_latents,
    solver,
    solvers,
)
from tests.conftest import randomize_, tiny_model_config

S = 2.0  # the noise scale


def make_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(ELF(tiny_model_config()), seed=seed, std=0.15).eval()


# ----------------------------------------------------------------------------- exact flow


class GaussianDenoiser(torch.nn.Module):
    """The exact x-predictor E[x | z_t] when every coordinate of x is N(mu, sd^2):
    z_t = t x + (1 - t) s eps gives x_hat = mu + t sd^2 (z - t mu) / (t^2 sd^2 + (1-t)^2 s^2).
    Its probability-flow ODE keeps (z - t mu) / sigma_t fixed, sigma_t^2 = t^2 sd^2 +
    (1-t)^2 s^2, so z_1 = mu + sd z_0 / s exactly."""

    def __init__(self, mu=0.7, sd=0.5, width=4):
        super().__init__()
        self.mu, self.sd = mu, sd
        self.cfg = SimpleNamespace(self_cond=True, t_eps=1e-12, latent_dim=width)
        self.calls = 0

    def forward(self, inputs, t, sc_scale=None, decode=False):
        self.calls += 1
        z = inputs[..., : self.cfg.latent_dim]
        t = t.reshape(-1, 1, 1).to(z.dtype)
        var = t**2 * self.sd**2 + (1 - t) ** 2 * S**2
        return self.mu + t * self.sd**2 * (z - t * self.mu) / var, None


def exact_error(method: str, steps: int) -> float:
    model = GaussianDenoiser()
    noise = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    settings = SamplerSettings(steps=steps, method=method, gamma=0.0, time_schedule="uniform")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        z = sample_latents(model, settings, noise)
    finally:
        torch.set_default_dtype(previous)
    exact = model.mu + model.sd * noise
    return (z - exact).abs().max().item()


@pytest.mark.parametrize("method, order", [("ode", 1), ("heun", 2)])
def test_sampler_error_on_the_exact_gaussian_flow_shrinks_with_the_solvers_order(method, order):
    errors = [exact_error(method, n) for n in (16, 32, 64)]
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    for ratio in ratios:  # halving h divides the error by 2**order
        assert 2**order * 0.8 < ratio < 2**order * 1.25, (errors, ratios)


def rule_error(method: str, steps: int, t_a=0.1, t_b=0.9) -> float:
    """One rule alone from t_a to t_b on a grid uniform in lambda (DPM-Solver's variable;
    a grid uniform in t from 0 to 1 has lambda steps of log 2 at both ends at every N, which
    is why the whole sampler's dpm2m converges more slowly there)."""
    model = GaussianDenoiser()
    u = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def exact(t):
        return t * model.mu + math.sqrt(t**2 * model.sd**2 + (1 - t) ** 2 * S**2) * u

    def evaluate(z, x_prev, t):
        x_hat, _ = model(z, t)
        return x_hat, flow.velocity(x_hat, z, t, model.cfg.t_eps)

    stepper = solvers.Stepper(evaluate, lambda z, t: z, None, model.cfg.t_eps, S)
    lam_a, lam_b = math.log(t_a / (1 - t_a)), math.log(t_b / (1 - t_b))
    lam = torch.linspace(lam_a, lam_b, steps + 1, dtype=torch.float64)
    times = torch.sigmoid(lam)
    # The multistep rule starts from an exact previous prediction one step before t_a, so
    # that every step is second order (the sampler's first step is first order).
    t_before = torch.sigmoid(lam[0] - (lam[1] - lam[0])).expand(8)
    x_before, _ = model(exact(float(t_before[0])), t_before)
    state = solvers.State(exact(t_a), x_before, t_before)
    for i in range(steps):
        t, t_next = times[i].expand(8), times[i + 1].expand(8)
        state = solver(method).step(stepper, state, t, t_next)
    return (state.z - exact(t_b)).abs().max().item()


@pytest.mark.parametrize("method, order", [("ode", 1), ("heun", 2), ("dpm2m", 2)])
def test_each_rules_error_on_the_exact_gaussian_flow_shrinks_with_its_order(method, order):
    # dpm2m's leading error term is small on this flow and changes sign near 32 steps, so
    # its ratio reaches 4 only from a few hundred steps on (3.52, 3.78, 3.90 measured).
    errors = [rule_error(method, n) for n in (256, 512, 1024)]
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    for ratio in ratios:  # halving h divides the error by 2**order
        assert 2**order * 0.9 < ratio < 2**order * 1.1, (errors, ratios)


def test_second_order_solvers_beat_euler_at_equal_forwards_on_the_exact_flow():
    # Measured on this flow: at 15 forwards Euler 0.213, Heun (8 steps) 0.168, dpm2m 0.032;
    # at 31 forwards Euler 0.104, Heun (16 steps) 0.041.
    assert exact_error("dpm2m", 15) < exact_error("ode", 15) / 3
    assert exact_error("heun", 8) < exact_error("ode", 15)  # 2 x 7 + 1 = 15 forwards
    assert exact_error("heun", 16) < exact_error("ode", 31) / 2


# ----------------------------------------------------------------------------- slow loops


def slow_heun_or_dpm(model, eps, grid, method, sc=2.0, churn=None, gamma=0.0, cond=None, g=1.0):
    """The rules written out from their textbook form, one sample at a time in plain floats
    for the times; cond = (latents, mask) holds conditions; churn noise per step (or None)."""

    def put(x):
        return x if cond is None else torch.where(cond[1][..., None], cond[0], x)

    def x_and_v(z, x_prev, t):
        B = z.shape[0]
        tt, scs = torch.full((B,), t), torch.full((B,), sc)
        x_c, _ = model(torch.cat([z, x_prev], -1), tt, sc_scale=scs)
        if cond is not None and g != 1.0:
            keep = (~cond[1])[..., None].float()
            x_u, _ = model(torch.cat([z * keep, x_prev * keep], -1), tt, sc_scale=scs)
            v_c = (x_c - z) / max(1 - t, 0.05)
            v_u = (x_u - z * keep) / max(1 - t, 0.05)
            x_hat, v = x_u + g * (x_c - x_u), v_u + g * (v_c - v_u)
        else:
            x_hat, v = x_c, (x_c - z) / max(1 - t, 0.05)
        if cond is not None:
            x_hat, v = put(x_hat), v * (~cond[1])[..., None]
        return x_hat, v

    def lam(t):
        return math.log(t / ((1 - t) * S))

    z, x_prev, t_prev = put(S * eps), put(torch.zeros_like(eps)), None
    steps = len(grid) - 1
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        last = i == steps - 1
        if churn is not None and not last:
            alpha = min(max(1 - gamma * (t_next - t), 0.0), 1.0)
            z, t = put(alpha * z + (1 - alpha) * S * churn[i]), alpha * t
        if last:
            x_hat, v = x_and_v(z, x_prev, t)
            z, x_prev = put(z + (t_next - t) * v), x_hat
        elif method == "heun":
            x1, v1 = x_and_v(z, x_prev, t)
            z1 = put(z + (t_next - t) * v1)
            x2, v2 = x_and_v(z1, x1, t_next)
            z, x_prev = put(z + (t_next - t) * (v1 + v2) / 2), x2
        else:  # DPM-Solver++(2M): alpha_t = t, sigma_t = (1 - t) s, in its exponential form
            x_hat, _ = x_and_v(z, x_prev, t)
            d = x_hat
            if t == 0:  # lambda(0) = -inf: h = inf, e^-h = 0
                decay = 0.0
            else:
                h = lam(t_next) - lam(t)
                decay = math.exp(-h)
                if t_prev is not None and t_prev > 0 and lam(t) - lam(t_prev) > 0:
                    r = (lam(t) - lam(t_prev)) / h
                    d = (1 + 1 / (2 * r)) * x_hat - 1 / (2 * r) * x_prev
            sigma, sigma_next = (1 - t) * S, (1 - t_next) * S
            z = put(sigma_next / sigma * z - t_next * (decay - 1) * d)
            x_prev, t_prev = x_hat, t
    return z


@pytest.mark.parametrize("method", ["heun", "dpm2m"])
def test_deterministic_rules_match_their_textbook_form(method):
    model = make_model()
    eps = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    settings = SamplerSettings(steps=5, method=method, sc_cfg=2.0, time_schedule="uniform")
    with torch.no_grad():
        fast = sample_latents(model, settings, eps)
        slow = slow_heun_or_dpm(model, eps, torch.linspace(0, 1, 6).tolist(), method)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def make_condition(B=2, S_=6, C=16):
    latents = torch.randn(B, S_, C, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([2, 3])
    mask = torch.arange(S_)[None, :] < lengths[:, None]
    return Condition(latents * mask[..., None], mask, lengths, max_input_length=3)


@pytest.mark.parametrize("method", ["heun-sde", "dpm2m-sde"])
def test_churned_rules_match_their_textbook_form_with_a_condition_and_cfg(method):
    model = make_model()
    cond = make_condition()
    eps = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    steps, gamma = 4, 1.2
    settings = SamplerSettings(
        steps=steps, method=method, gamma=gamma, sc_cfg=1.0, cfg=2.0, time_schedule="uniform"
    )
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        fast = sample_latents(model, settings, eps, generator=gen, condition=cond)
    replay = torch.Generator().manual_seed(9)  # a uniform grid draws nothing: churn only
    churn = [torch.randn(eps.shape, generator=replay) for _ in range(steps - 1)]
    with torch.no_grad():
        slow = slow_heun_or_dpm(
            model,
            eps,
            torch.linspace(0, 1, steps + 1).tolist(),
            method.removesuffix("-sde"),
            sc=1.0,
            churn=churn,
            gamma=gamma,
            cond=(cond.latents, cond.mask),
            g=2.0,
        )
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[cond.mask], cond.latents[cond.mask])


# ----------------------------------------------------------------------------- costs, reductions


@pytest.mark.parametrize("method", list(SOLVERS))
def test_each_step_reports_its_true_forwards_and_a_cfg_pair_is_one(method):
    model = make_model()
    cond = make_condition()
    rows = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True
    )
    counted: list[int] = []
    settings = SamplerSettings(steps=5, method=method, gamma=1.0, sc_cfg=1.0, cfg=2.0)
    with torch.no_grad():
        sample_latents(model, settings, torch.randn(2, 6, 16), None, cond, forwards=counted)
    hook.remove()
    assert rows == [4] * len(rows)  # both CFG branches in each forward
    assert counted == [len(rows)] == [forwards_for(method, 5)]
    assert forwards_for(method, 5) == (9 if method.startswith("heun") else 5)


@pytest.mark.parametrize("method", list(SOLVERS))
def test_steps_for_a_budget_is_the_most_steps_that_fit(method):
    rule = solver(method)
    for budget in range(1, 40):
        n = rule.steps_for(budget)
        assert rule.forwards(n) <= budget < rule.forwards(n + 1)


@pytest.mark.parametrize("method", list(SOLVERS))
def test_one_step_of_any_sampler_is_one_euler_step(method):
    model = make_model()
    eps = torch.randn(2, 4, 16)
    with torch.no_grad():
        got = sample_latents(model, SamplerSettings(1, method, 1.5, 3.0, 1.0, "uniform"), eps)
        ode = sample_latents(model, SamplerSettings(1, "ode", 0.0, 3.0, 1.0, "uniform"), eps)
    torch.testing.assert_close(got, ode)


@pytest.mark.parametrize("method", ["sde", "heun-sde", "dpm2m-sde"])
def test_no_churn_is_the_deterministic_rule(method):
    model = make_model()
    eps = torch.randn(2, 4, 16)
    deterministic = {"sde": "ode"}.get(method, method.removesuffix("-sde"))
    with torch.no_grad():
        a = sample_latents(model, SamplerSettings(4, method, 0.0, 2.0, 1.0, "uniform"), eps)
        b = sample_latents(model, SamplerSettings(4, deterministic, 0.0, 2.0, 1.0, "uniform"), eps)
    torch.testing.assert_close(a, b)


def test_dpm2m_first_step_is_euler_and_the_previous_prediction_changes_later_steps():
    model = make_model()
    eps = torch.randn(2, 4, 16)
    with torch.no_grad():
        for steps in (2,):  # step 1 has no previous point, step 2 is the last (Euler)
            a = sample_latents(model, SamplerSettings(steps, "dpm2m", 0, 2.0, 1.0, "uniform"), eps)
            b = sample_latents(model, SamplerSettings(steps, "ode", 0, 2.0, 1.0, "uniform"), eps)
            torch.testing.assert_close(a, b)
        a = sample_latents(model, SamplerSettings(4, "dpm2m", 0, 2.0, 1.0, "uniform"), eps)
        b = sample_latents(model, SamplerSettings(4, "ode", 0, 2.0, 1.0, "uniform"), eps)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("method", list(SOLVERS))
def test_known_tokens_stay_held_and_trajectories_record_every_step(method):
    model = make_model()
    B, L, C = 2, 6, 16
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :2] = True
    latents = torch.randn(B, L, C) * mask[..., None]
    known = KnownTokens(
        ids=torch.zeros(B, L, dtype=torch.long),
        mask=mask,
        latents=latents,
        end=torch.tensor([2, 2]),
    )
    seen = []

    def recorder(step, t, x_hat):
        seen.append((step, t.clone(), x_hat[mask].clone()))

    streams = SampleStreams(0, [0, 1])
    settings = SamplerSettings(5, method, 1.5, 3.0, 1.0, "quantile")
    with torch.no_grad():
        z = sample_latents(model, settings, torch.randn(B, L, C), streams, None, known, recorder)
    torch.testing.assert_close(z[mask], latents[mask])
    assert [step for step, _, _ in seen] == list(range(5))
    for _, t, held in seen:
        torch.testing.assert_close(held, latents[mask])
        assert ((t >= 0) & (t <= 1)).all()


def test_unknown_samplers_and_schedules_are_one_sentence():
    with pytest.raises(UserError, match="must be one of ode, sde, heun"):
        check_sampler("euler")
    with pytest.raises(UserError, match="unknown time schedule 'cosine'"):
        check_schedule("cosine")
    with pytest.raises(UserError, match="takes 2 parameters"):
        check_schedule("quantile:1")
    with pytest.raises(UserError, match="STD must be positive"):
        check_schedule("quantile:-1:0")
    check_sampler(None), check_schedule(None), check_schedule("karras:5")


# ----------------------------------------------------------------------------- grids


def test_the_quantile_grid_is_the_logit_normal_laws_quantiles():
    grid = flow.deterministic_grid(8, "quantile:-1.2:0.9")
    inner = [1 / (1 + math.exp(-(-1.2 + 0.9 * NormalDist().inv_cdf(i / 8)))) for i in range(1, 8)]
    assert grid[0] == 0 and grid[-1] == 1
    torch.testing.assert_close(grid[1:-1], torch.tensor(inner), atol=1e-6, rtol=0)
    # Without parameters: the training law's (p_mean, p_std).
    torch.testing.assert_close(
        flow.deterministic_grid(8, "quantile"), flow.deterministic_grid(8, "quantile:-1.5:0.8")
    )


def test_the_karras_grid_is_linear_in_sigma_to_the_one_over_rho():
    grid = flow.deterministic_grid(7, "karras:5").double()
    sigma = (1 - grid[1:-1]) / grid[1:-1]
    torch.testing.assert_close(sigma[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    root = sigma ** (1 / 5)
    steps = root[1:] - root[:-1]
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-4, atol=0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid[1:] > grid[:-1]).all()


@pytest.mark.parametrize("schedule", ["uniform", "quantile", "karras", "quantile:0:1"])
def test_deterministic_grids_draw_nothing_from_the_streams(schedule):
    streams = SampleStreams(3, [0, 1, 2])
    grids = streams.time_grids(6, schedule, -1.5, 0.8)
    torch.testing.assert_close(grids, flow.deterministic_grid(6, schedule).expand(3, -1))
    fresh = SampleStreams(3, [0, 1, 2])
    torch.testing.assert_close(streams.normal((4,)), fresh.normal((4,)))
