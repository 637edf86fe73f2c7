"""The training objective (docs/method.md section 4), piece by piece and as a whole.

`elf_loss` is checked against `slow_loss`, which treats one example at a time with
the spec's formulas written out plainly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elfctl.config import ObjectiveConfig
from elfctl.model import ELF
from elfctl.training import (
    Draws,
    decoder_input,
    draw,
    drop_labels,
    elf_loss,
    guided_target,
    keep_condition,
)
from tests.conftest import randomize_, tiny_model_config

C, S, B = 16, 6, 6


def test_condition_positions_keep_the_clean_latent():
    z, x = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    cond = torch.tensor([[True, False, False]])
    out = keep_condition(z, x, cond)
    assert out[0, 0].tolist() == [1, 1] and out[0, 1:].abs().sum() == 0


def test_label_drop_zeroes_only_the_condition_of_dropped_rows():
    x = torch.ones(2, 3, 1)
    cond = torch.tensor([[True, True, False], [True, False, False]])
    out = drop_labels(x, cond, torch.tensor([True, False]))
    assert out[:, :, 0].tolist() == [[0, 0, 1], [1, 1, 1]]


def test_decoder_input_mixes_per_token_and_scales_the_noise():
    x = torch.tensor([[[2.0], [4.0]]])
    noise = torch.tensor([[[1.0], [-1.0]]])
    lam = torch.tensor([[[0.25], [1.0]]])
    out = decoder_input(x, noise, lam, 5.0)
    assert out[0, :, 0].tolist() == [0.25 * 2 + 0.75 * 5.0, 4.0]


def test_sc_cfg_target_adds_the_scaled_difference_only_where_self_conditioning_is_used():
    v_star = torch.zeros(2, 1, 1)
    v_cond, v_uncond = torch.full((2, 1, 1), 3.0), torch.full((2, 1, 1), 1.0)
    w = torch.tensor([2.0, 4.0])
    out = guided_target(v_star, v_cond, v_uncond, w, torch.tensor([1.0, 0.0]))
    assert out[:, 0, 0].tolist() == [(1 - 1 / 2) * 2.0, 0.0]


def test_draws_follow_the_configured_distributions():
    cfg = ObjectiveConfig(label_drop_prob=0.1)
    d = draw(20000, 2, 1, cfg, "cpu", torch.Generator().manual_seed(0))
    assert d.is_decoder.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert d.use_self_cond.float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert d.drop_condition.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert d.lam.median().item() == pytest.approx(1 / (1 + math.exp(-0.8)), abs=0.01)
    assert 0.5 <= d.sc_scale.min().item() and d.sc_scale.max().item() <= 5.0
    # log-uniform in shifted space: log(1 + w) is uniform on [log 1.5, log 6]
    mid = (math.log(1.5) + math.log(6.0)) / 2
    assert torch.log1p(d.sc_scale).median().item() == pytest.approx(mid, abs=0.02)


def make_case(seed=0, conditional=True):
    gen = torch.Generator().manual_seed(seed)
    model = randomize_(ELF(tiny_model_config(vocab_size=18)), seed=seed, std=0.15)
    x = torch.randn(B, S, C, generator=gen)
    input_ids = torch.randint(0, 18, (B, S), generator=gen)
    cond_len = torch.tensor([2, 0, 1, 3, 0, 2]) if conditional else torch.zeros(B, dtype=torch.long)
    cond = torch.arange(S)[None] < cond_len[:, None]
    valid = torch.arange(S)[None] < torch.tensor([6, 4, 5, 6, 3, 6])[:, None]
    loss_mask = valid & ~cond
    draws = Draws(
        t=torch.rand(B, generator=gen),
        eps=torch.randn(B, S, C, generator=gen),
        is_decoder=torch.tensor([True, False, False, True, False, False]),
        lam=torch.rand(B, S, 1, generator=gen),
        dec_noise=torch.randn(B, S, C, generator=gen),
        use_self_cond=torch.tensor([True, True, False, False, True, False]),
        sc_scale=torch.tensor([0.7, 1.5, 4.0, 2.0, 0.5, 3.0]),
        drop_condition=torch.tensor([False, False, True, False, False, True]),
    )
    return model, x, input_ids, cond, loss_mask, draws


def slow_loss(model, x, input_ids, cond, loss_mask, d, cfg, t_eps=0.05):
    """One example at a time, every formula spelled out."""
    total = 0.0
    for b in range(x.shape[0]):
        xb, cb = x[b : b + 1].clone(), cond[b : b + 1]
        if d.drop_condition[b]:
            xb[cb] = 0.0
        t, w = d.t[b : b + 1], d.sc_scale[b : b + 1]
        tb = float(t)
        z = tb * xb + (1 - tb) * cfg.noise_scale * d.eps[b : b + 1]
        z[cb] = xb[cb]
        zeros = torch.zeros_like(xb)
        zeros[cb] = xb[cb]
        if d.is_decoder[b]:
            lam = d.lam[b : b + 1]
            z_dec = lam * xb + (1 - lam) * cfg.decoder_noise_scale * d.dec_noise[b : b + 1]
            no_self_cond = torch.zeros_like(xb)  # the whole row, condition positions too
            inputs = torch.cat([z_dec, no_self_cond], -1)
            _, logits = model(inputs, torch.ones(1), sc_scale=w, decode=torch.ones(1))
            per_token = F.cross_entropy(logits[0], input_ids[b], reduction="none")
        else:
            with torch.no_grad():
                x_u, _ = model(torch.cat([z, zeros], -1), t, sc_scale=w)
                x_u[cb] = xb[cb]
                x_c, _ = model(torch.cat([z, x_u], -1), t, sc_scale=w)
            denom = max(1 - tb, t_eps)
            v_star = (xb - z) / denom
            v_u, v_c = (x_u - z) / denom, (x_c - z) / denom
            if d.use_self_cond[b]:
                x_prev = x_u
                target = v_star + (1 - 1 / float(w)) * (v_c - v_u)
            else:
                x_prev, target = zeros, v_star
            x_hat, _ = model(torch.cat([z, x_prev], -1), t, sc_scale=w, decode=torch.zeros(1))
            per_token = ((x_hat - z) / denom - target).pow(2).mean(-1)[0]
        total = total + (per_token * loss_mask[b]).sum()
    return total / loss_mask.sum()


@pytest.mark.parametrize("conditional", [True, False])
def test_loss_matches_the_per_example_computation(conditional):
    model, x, ids, cond, loss_mask, draws = make_case(conditional=conditional)
    cfg = ObjectiveConfig(decoder_noise_scale=5.0)
    parts = elf_loss(model, x, ids, cond, loss_mask, draws, cfg, t_eps=0.05)
    expected = slow_loss(model, x, ids, cond, loss_mask, draws, cfg)
    torch.testing.assert_close(parts.loss, expected, atol=1e-5, rtol=1e-5)
    decoder_tokens = (loss_mask & draws.is_decoder[:, None]).sum()
    assert parts.ce_tokens == decoder_tokens
    assert parts.l2_tokens == loss_mask.sum() - decoder_tokens
    torch.testing.assert_close(parts.loss, (parts.ce_sum + parts.l2_sum) / loss_mask.sum())


def test_loss_has_a_single_denominator_the_loss_mask_token_count():
    model, x, ids, cond, loss_mask, draws = make_case()
    cfg = ObjectiveConfig()
    parts = elf_loss(model, x, ids, cond, loss_mask, draws, cfg, 0.05)
    # Not a mean of two means: the branches share one denominator.
    mean_of_means = (parts.ce_sum / parts.ce_tokens + parts.l2_sum / parts.l2_tokens) / 2
    assert not torch.isclose(parts.loss, mean_of_means)
    scaled = elf_loss(model, x, ids, cond, loss_mask, draws, cfg, 0.05, denominator=100.0)
    torch.testing.assert_close(scaled.loss, (parts.ce_sum + parts.l2_sum) / 100.0)


def test_gradients_reach_every_parameter_through_one_mixed_forward():
    model, x, ids, cond, loss_mask, draws = make_case()
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, k: calls.append(torch.is_grad_enabled()), with_kwargs=True
    )
    elf_loss(model, x, ids, cond, loss_mask, draws, ObjectiveConfig(), 0.05).loss.backward()
    assert calls == [False, False, True]  # two no-grad self-conditioning passes, one grad pass
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_padding_and_condition_tokens_do_not_count():
    model, x, ids, cond, loss_mask, draws = make_case()
    cfg = ObjectiveConfig()
    base = elf_loss(model, x, ids, cond, loss_mask, draws, cfg, 0.05)
    ids2 = ids.clone()
    ids2[~loss_mask] = (ids2[~loss_mask] + 1) % 18  # change only tokens outside the mask
    other = elf_loss(model, x, ids2, cond, loss_mask, draws, cfg, 0.05)
    torch.testing.assert_close(base.loss, other.loss)


def grad_forward_inputs(model, run):
    """The (inputs, t, decode) of the one gradient forward `run()` makes through `model`."""
    seen = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append((args[0].detach().clone(), args[1].clone(), kwargs["decode"].clone()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_conditional_decoder_rows_corrupt_the_whole_row_and_get_no_self_condition():
    """Section 4: a decoder row's input is lam x + (1 - lam) n s at EVERY position, condition
    positions included (not restored to the clean condition), and its self-conditioning half
    is zero everywhere; denoiser rows keep x at condition positions in z_t and x_prev."""
    model, x, ids, cond, loss_mask, draws = make_case(conditional=True)
    cfg = ObjectiveConfig(decoder_noise_scale=5.0)
    inputs, t_in, decode = grad_forward_inputs(
        model, lambda: elf_loss(model, x, ids, cond, loss_mask, draws, cfg, t_eps=0.05)
    )
    z_in, x_prev_in = inputs[..., :C], inputs[..., C:]
    assert any(draws.is_decoder[b] and cond[b].any() for b in range(B))  # the case is covered
    for b in range(B):
        for p in range(S):
            clean = x[b, p] * (0.0 if draws.drop_condition[b] and cond[b, p] else 1.0)
            if draws.is_decoder[b]:
                lam = float(draws.lam[b, p, 0])
                expected = lam * clean + (1 - lam) * 5.0 * draws.dec_noise[b, p]
                torch.testing.assert_close(z_in[b, p], expected, msg=f"z_dec row {b} pos {p}")
                assert torch.equal(x_prev_in[b, p], torch.zeros(C)), f"x_prev row {b} pos {p}"
            elif cond[b, p]:
                torch.testing.assert_close(z_in[b, p], clean, msg=f"z_t row {b} pos {p}")
                torch.testing.assert_close(x_prev_in[b, p], clean, msg=f"x_prev row {b} pos {p}")
        assert t_in[b] == (1.0 if draws.is_decoder[b] else draws.t[b])
        assert decode[b] == float(draws.is_decoder[b])
