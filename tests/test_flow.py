"""Flow maths (docs/method.md sections 4-5) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from elfctl.model import flow


def test_noising_interpolates_from_scaled_noise_at_t0_to_data_at_t1():
    x = torch.tensor([[[1.0, -2.0]], [[3.0, 4.0]]])  # (B=2, S=1, C=2)
    eps = torch.tensor([[[0.5, 0.5]], [[-1.0, 2.0]]])
    t = torch.tensor([0.25, 1.0])
    z = flow.add_noise(x, eps, t, s=2.0)
    # row 0: 0.25 x + 0.75 * 2 * eps; row 1: x
    torch.testing.assert_close(z[0], torch.tensor([[0.25 + 0.75, -0.5 + 0.75]]))
    torch.testing.assert_close(z[1], x[1])


def test_velocity_divides_by_one_minus_t_but_never_by_less_than_t_eps():
    x_hat = torch.full((2, 1, 1), 3.0)
    z = torch.full((2, 1, 1), 1.0)
    t = torch.tensor([0.5, 0.99])
    v = flow.velocity(x_hat, z, t, t_eps=0.05)
    assert v[0].item() == pytest.approx(2.0 / 0.5)
    assert v[1].item() == pytest.approx(2.0 / 0.05)  # 1 - 0.99 = 0.01 < t_eps


def test_ode_step_is_euler():
    z, v = torch.tensor([1.0, 2.0]), torch.tensor([10.0, -10.0])
    torch.testing.assert_close(
        flow.ode_step(z, v, torch.tensor(0.2), torch.tensor(0.3)), torch.tensor([2.0, 1.0])
    )


def test_sde_churn_goes_back_by_gamma_h_and_renoises():
    z, eps = torch.tensor([1.0]), torch.tensor([0.5])
    t, t_next = torch.tensor(0.5), torch.tensor(0.7)
    z_back, t_back = flow.sde_back(z, t, t_next, gamma=1.5, s=2.0, eps=eps)
    alpha = 1 - 1.5 * 0.2
    assert t_back.item() == pytest.approx(alpha * 0.5)
    assert z_back.item() == pytest.approx(alpha * 1.0 + (1 - alpha) * 2.0 * 0.5)


def test_sde_churn_alpha_is_clipped_to_zero_for_big_steps():
    z_back, t_back = flow.sde_back(
        torch.tensor([7.0]), torch.tensor(0.2), torch.tensor(0.9), 2.0, 2.0, torch.tensor([0.3])
    )
    assert t_back.item() == 0.0 and z_back.item() == pytest.approx(0.6)


def test_uniform_grid_is_linspace():
    torch.testing.assert_close(flow.time_grid(4, "uniform"), torch.tensor([0, 0.25, 0.5, 0.75, 1]))


def test_logit_normal_grid_is_zero_sorted_draws_one():
    gen = torch.Generator().manual_seed(3)
    grid = flow.time_grid(6, "logit_normal", -1.5, 0.8, generator=gen)
    draws = torch.randn(5, generator=torch.Generator().manual_seed(3))
    inner = torch.sigmoid(draws * 0.8 - 1.5).sort().values
    assert grid.shape == (7,)
    assert grid[0].item() == 0.0 and grid[-1].item() == 1.0
    torch.testing.assert_close(grid[1:-1], inner)
    assert (grid[1:] >= grid[:-1]).all()


def test_logit_normal_time_has_the_right_median():
    t = flow.sample_time((20000,), "logit_normal", -1.5, 0.8, torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(1.5)), abs=0.01)


def test_sc_cfg_scale_is_log_uniform_in_shifted_space():
    u = torch.tensor([0.0, 0.5, 1.0])
    w = flow.log_uniform_shifted(u, 0.5, 5.0)
    # a = 1.5, b = 6: w = 1.5 * 4^u - 1
    torch.testing.assert_close(w, torch.tensor([0.5, 2.0, 5.0]))
