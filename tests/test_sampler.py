"""The sampler (docs/method.md section 5) against a slow loop written out step by step."""

from __future__ import annotations

import torch

from elfctl.model import ELF
from elfctl.sampling import (
    Condition,
    SamplerSettings,
    decode,
    generate,
    mask_after_eos,
    sample_latents,
    shift_condition,
)
from tests.conftest import randomize_, tiny_model_config


def make_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(ELF(tiny_model_config()), seed=seed, std=0.15).eval()


def slow_sample(model, eps, steps, method, gamma, sc, s, grid, churn_noise, cond=None, g=1.0):
    """One model call per step, plain Python; cond = (latents, mask) or None."""
    B = eps.shape[0]

    def put_cond(x):
        return x if cond is None else torch.where(cond[1][..., None], cond[0], x)

    def model_xv(z, x_prev, t):
        tt, scs = torch.full((B,), float(t)), torch.full((B,), float(sc))
        x_c, _ = model(torch.cat([z, x_prev], -1), tt, sc_scale=scs)
        v_c = (x_c - z) / max(1 - float(t), 0.05)
        if cond is None or g == 1.0:
            x_hat, v = x_c, v_c
        else:
            keep = (~cond[1])[..., None].float()
            z_u = z * keep
            x_u, _ = model(torch.cat([z_u, x_prev * keep], -1), tt, sc_scale=scs)
            v_u = (x_u - z_u) / max(1 - float(t), 0.05)
            x_hat, v = x_u + g * (x_c - x_u), v_u + g * (v_c - v_u)
        if cond is not None:
            x_hat = put_cond(x_hat)
            v = v * (~cond[1])[..., None]
        return x_hat, v

    z = put_cond(s * eps)
    x_prev = put_cond(torch.zeros_like(z))
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        if method == "sde" and i < steps - 1:
            alpha = min(max(1 - gamma * (t_next - t), 0.0), 1.0)
            z = put_cond(alpha * z + (1 - alpha) * s * churn_noise[i])
            t = alpha * t
        x_hat, v = model_xv(z, x_prev, t)
        z = put_cond(z + (t_next - t) * v)
        x_prev = x_hat
    return z


def test_ode_sampler_matches_the_slow_loop():
    model = make_model()
    eps = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1))
    settings = SamplerSettings(steps=5, method="ode", sc_cfg=2.5, time_schedule="uniform")
    with torch.no_grad():
        fast = sample_latents(model, settings, eps)
        slow = slow_sample(model, eps, 5, "ode", 0, 2.5, 2.0, torch.linspace(0, 1, 6), None)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_sde_sampler_matches_the_slow_loop_and_ends_with_an_ode_step():
    model = make_model()
    eps = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    steps, gamma = 4, 1.5
    settings = SamplerSettings(steps=steps, method="sde", gamma=gamma, sc_cfg=3.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        fast = sample_latents(model, settings, eps, generator=gen)
    # Replay the same random stream: first the logit-normal grid, then one churn draw per
    # step except the last (which is an ODE step and draws nothing).
    replay = torch.Generator().manual_seed(7)
    inner = torch.sigmoid(torch.randn(steps - 1, generator=replay) * 0.8 - 1.5).sort().values
    grid = torch.cat([torch.zeros(1), inner, torch.ones(1)])
    churn = [torch.randn(eps.shape, generator=replay) for _ in range(steps - 1)]
    with torch.no_grad():
        slow = slow_sample(model, eps, steps, "sde", gamma, 3.0, 2.0, grid, churn)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_single_step_sde_is_an_ode_step():
    model = make_model()
    eps = torch.randn(2, 4, 16)
    with torch.no_grad():
        sde = sample_latents(model, SamplerSettings(1, "sde", 1.5, 3.0, 1.0, "uniform"), eps)
        ode = sample_latents(model, SamplerSettings(1, "ode", 0.0, 3.0, 1.0, "uniform"), eps)
    torch.testing.assert_close(sde, ode)


def make_condition(B=2, S=6, C=16):
    latents = torch.randn(B, S, C, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([2, 3])
    mask = torch.arange(S)[None, :] < lengths[:, None]
    return Condition(latents * mask[..., None], mask, lengths, max_input_length=3)


def test_cfg_is_one_batched_forward_equal_to_two_separate_forwards():
    model = make_model()
    cond = make_condition()
    eps = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    settings = SamplerSettings(steps=4, method="ode", sc_cfg=1.0, cfg=2.0, time_schedule="uniform")
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        fast = sample_latents(model, settings, eps, condition=cond)
    hook.remove()
    assert calls == [4] * 4  # one forward per step, both branches batched (2B rows)
    with torch.no_grad():
        slow = slow_sample(
            model,
            eps,
            4,
            "ode",
            0,
            1.0,
            2.0,
            torch.linspace(0, 1, 5),
            None,
            cond=(cond.latents, cond.mask),
            g=2.0,
        )
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_one_forward_per_step_without_cfg_plus_one_decode():
    model = make_model()
    tok_calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: tok_calls.append(a[0].shape[0]), with_kwargs=True
    )

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def batch_decode(self, rows, skip_special_tokens):
            return [" ".join(map(str, r)) for r in rows]

    generate(model, Tok(), steps=6, num_samples=3, length=5, seed=0, precision="fp32")
    hook.remove()
    assert tok_calls == [3] * 7


def test_condition_positions_never_change_and_the_unconditional_branch_sees_zeros():
    model = make_model()
    cond = make_condition()
    seen = []

    def spy(module, args, kwargs):
        seen.append(args[0].detach().clone())

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    settings = SamplerSettings(steps=3, method="sde", gamma=1.0, sc_cfg=1.0, cfg=2.0)
    with torch.no_grad():
        z = sample_latents(model, settings, torch.randn(2, 6, 16), torch.Generator(), cond)
    hook.remove()
    m = cond.mask
    for inputs in seen:
        cond_rows, uncond_rows = inputs[:2], inputs[2:]
        torch.testing.assert_close(cond_rows[..., :16][m], cond.latents[m])  # z
        torch.testing.assert_close(cond_rows[..., 16:][m], cond.latents[m])  # x_prev
        assert torch.count_nonzero(uncond_rows[m]) == 0
    torch.testing.assert_close(z[m], cond.latents[m])


def test_everything_from_the_first_eos_on_becomes_pad():
    tokens = torch.tensor([[5, 6, 1, 7, 1], [1, 4, 4, 4, 4], [3, 3, 3, 3, 3]])
    expected = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 0, 0, 0], [3, 3, 3, 3, 3]])
    torch.testing.assert_close(mask_after_eos(tokens, eos_id=1, pad_id=0), expected)


def test_conditional_outputs_shift_left_by_the_condition_and_keep_the_target_budget():
    tokens = torch.tensor([[9, 9, 4, 5, 6, 7], [9, 9, 9, 4, 5, 6]])
    cond = make_condition()  # lengths 2 and 3, max_input_length 3 -> 3 target tokens
    out = shift_condition(tokens, cond, pad_id=0)
    torch.testing.assert_close(out, torch.tensor([[4, 5, 6], [4, 5, 6]]))


def test_decode_reads_the_argmax_at_t1_with_a_zero_self_condition():
    model = make_model()
    z = torch.randn(2, 4, 16)
    with torch.no_grad():
        _, logits = model(
            torch.cat([z, torch.zeros_like(z)], -1), torch.ones(2), sc_scale=2.0, decode=True
        )
        torch.testing.assert_close(decode(model, z, 2.0), logits.argmax(-1))


def test_same_seed_same_samples_and_explicit_noise_reproduces_exactly(word_tokenizer):
    model = randomize_(ELF(tiny_model_config(vocab_size=len(word_tokenizer)))).eval()
    kwargs = dict(
        steps=4,
        method="sde",
        gamma=1.5,
        sc_cfg=3.0,
        cfg=1.0,
        time_schedule="logit_normal",
        num_samples=3,
        length=6,
        precision="fp32",
    )
    a = generate(model, word_tokenizer, seed=11, **kwargs)
    b = generate(model, word_tokenizer, seed=11, **kwargs)
    assert a.tokens == b.tokens and a.texts == b.texts
    noise = torch.randn(3, 6, 16)
    c = generate(model, word_tokenizer, seed=1, noise=noise, **kwargs)
    d = generate(model, word_tokenizer, seed=1, noise=noise, **kwargs)
    assert c.tokens == d.tokens
    assert all(isinstance(t, str) for t in a.texts)


def test_the_step_loop_never_reads_a_tensor_back_to_the_host(monkeypatch):
    """On a GPU any of these would be a host sync inside the loop; here they must not run."""
    model = make_model()
    cond = make_condition()

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the sampling loop")

        return fail

    settings = SamplerSettings(steps=3, method="sde", gamma=1.5, sc_cfg=2.0, cfg=2.0)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    with torch.no_grad():
        z = sample_latents(model, settings, torch.randn(2, 6, 16), torch.Generator(), cond)
    monkeypatch.undo()
    assert torch.isfinite(z).all()
