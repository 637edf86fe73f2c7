"""Each sample's randomness is a function of (seed, sample id, settings) only (streams.py)."""

from __future__ import annotations

import torch

from elfctl.model import flow
from elfctl.sampling import SamplerSettings, SampleStreams, generate, sample_key, sample_latents
from tests.test_sampler import make_model, slow_sample

SDE = dict(
    steps=5,
    method="sde",
    gamma=1.5,
    sc_cfg=3.0,
    cfg=1.0,
    time_schedule="logit_normal",
    length=6,
    precision="fp32",
)


class Tok:
    pad_token_id, eos_token_id = 0, 1

    def batch_decode(self, rows, skip_special_tokens):
        return [" ".join(map(str, r)) for r in rows]


def test_sample_keys_differ_by_seed_id_and_purpose_and_fit_a_generator_seed():
    keys = {sample_key(s, i, p) for s in (0, 1) for i in range(50) for p in ("sample", "grid")}
    assert len(keys) == 200
    assert all(0 <= k < 2**63 for k in keys)
    assert sample_key(3, 7) == sample_key(3, 7)


def varied_model():
    """Random weights big enough that samples decode to different tokens."""
    from elfctl.model import ELF
    from tests.conftest import randomize_, tiny_model_config

    return randomize_(ELF(tiny_model_config()), seed=3, std=1.0).eval()


def latents(model, settings, ids, batch_size, seed=4, grid="per-sample"):
    out = []
    for start in range(0, len(ids), batch_size):
        streams = SampleStreams(seed, ids[start : start + batch_size], grid=grid)
        with torch.no_grad():
            out.append(sample_latents(model, settings, streams.normal((6, 16)), streams))
    return torch.cat(out)


def test_draws_are_bit_identical_and_latents_equal_to_rounding_at_batch_8_3_and_1():
    """What is exactly invariant: every random draw. The network's arithmetic may differ by
    an ulp between batch shapes (BLAS picks kernels by shape), so the final latents agree
    to float rounding and the decoded tokens (argmax) agree exactly (next test)."""
    whole = SampleStreams(4, range(8))
    part = SampleStreams(4, range(3, 6))
    assert torch.equal(whole.normal((6, 16))[3:6], part.normal((6, 16)))
    grids = whole.time_grids(5, "logit_normal", -1.5, 0.8)
    assert torch.equal(grids[3:6], part.time_grids(5, "logit_normal", -1.5, 0.8))
    assert torch.equal(whole.normal((6, 16))[3:6], part.normal((6, 16)))  # churn

    model = make_model()
    settings = SamplerSettings(steps=5, method="sde", gamma=1.5, sc_cfg=3.0)
    ids = list(range(8))
    by_8 = latents(model, settings, ids, 8)
    torch.testing.assert_close(by_8, latents(model, settings, ids, 3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(by_8, latents(model, settings, ids, 1), atol=1e-6, rtol=1e-6)


def test_samples_do_not_depend_on_the_batch_size():
    model = varied_model()
    by_8 = generate(model, Tok(), **SDE, num_samples=8, seed=4, batch_size=8)
    by_3 = generate(model, Tok(), **SDE, num_samples=8, seed=4, batch_size=3)
    by_1 = generate(model, Tok(), **SDE, num_samples=8, seed=4, batch_size=1)
    assert by_8.tokens == by_3.tokens == by_1.tokens
    assert len({tuple(t) for t in by_8.tokens}) > 1  # the samples differ from one another


def test_a_sample_is_the_same_wherever_it_sits_in_the_run():
    """Sample 5 alone (ids 5..5) equals sample 5 of a run of 8: its id keys its stream."""
    model = varied_model()
    whole = generate(model, Tok(), **SDE, num_samples=8, seed=4, batch_size=3)
    alone = generate(model, Tok(), **SDE, num_samples=1, seed=4, first_id=5)
    assert alone.tokens == whole.tokens[5:6]
    other_seed = generate(model, Tok(), **SDE, num_samples=8, seed=5, batch_size=3)
    assert other_seed.tokens != whole.tokens


def test_each_sample_draws_noise_then_its_grid_then_churn_from_its_own_stream():
    """The fast batched loop equals the slow loop fed with each sample's stream by hand."""
    model = make_model()
    steps, seed, S, C = 4, 9, 6, 16
    settings = SamplerSettings(steps=steps, method="sde", gamma=1.5, sc_cfg=3.0)
    streams = SampleStreams(seed, [3, 10], grid="per-sample")
    eps = streams.normal((S, C))
    with torch.no_grad():
        fast = sample_latents(model, settings, eps, streams)
    for row, sample_id in enumerate([3, 10]):
        gen = torch.Generator().manual_seed(sample_key(seed, sample_id))
        noise = torch.randn(1, S, C, generator=gen)
        inner = torch.sigmoid(torch.randn(steps - 1, generator=gen) * 0.8 - 1.5).sort().values
        grid = torch.cat([torch.zeros(1), inner, torch.ones(1)])
        churn = [torch.randn(1, S, C, generator=gen) for _ in range(steps - 1)]
        with torch.no_grad():
            slow = slow_sample(model, noise, steps, "sde", 1.5, 3.0, 2.0, grid, churn)
        torch.testing.assert_close(eps[row : row + 1], noise)
        torch.testing.assert_close(fast[row : row + 1], slow, atol=1e-5, rtol=1e-5)


def test_per_sample_grids_differ_per_row_and_each_is_zero_sorted_logit_normal_one():
    streams = SampleStreams(0, range(64))
    grids = streams.time_grids(8, "logit_normal", -1.5, 0.8)
    assert grids.shape == (64, 9)
    assert (grids[:, 0] == 0).all() and (grids[:, -1] == 1).all()
    assert (grids[:, 1:] >= grids[:, :-1]).all()
    assert len({tuple(g.tolist()) for g in grids}) == 64
    # The same marginal as the official per-batch grid: sorted sigmoid(N(-1.5, 0.8)) draws.
    many = SampleStreams(1, range(4000)).time_grids(2, "logit_normal", -1.5, 0.8)[:, 1]
    median = torch.sigmoid(torch.tensor(-1.5)).item()
    assert abs(many.median().item() - median) < 0.01


def test_a_per_batch_grid_is_shared_by_the_batch_and_keyed_by_its_first_sample():
    grids = SampleStreams(0, [8, 9, 10], grid="per-batch").time_grids(6, "logit_normal", -1.5, 0.8)
    assert (grids == grids[0]).all()
    gen = torch.Generator().manual_seed(sample_key(0, 8, "batch-grid"))
    expected = flow.time_grid(6, "logit_normal", -1.5, 0.8, generator=gen)
    torch.testing.assert_close(grids[0], expected)
    other = SampleStreams(0, [11, 12], grid="per-batch").time_grids(6, "logit_normal", -1.5, 0.8)
    assert not torch.equal(other[0], grids[0])


def test_per_batch_grids_are_reproducible_but_depend_on_the_batch_size():
    model = make_model()
    settings = SamplerSettings(steps=5, method="sde", gamma=1.5, sc_cfg=3.0)
    ids = list(range(6))
    by_3 = latents(model, settings, ids, 3, grid="per-batch")
    assert torch.equal(by_3, latents(model, settings, ids, 3, grid="per-batch"))
    by_2 = latents(model, settings, ids, 2, grid="per-batch")
    # The first batch of both starts at sample 0: the same grid and noise, the same result.
    torch.testing.assert_close(by_3[:2], by_2[:2])
    assert not torch.allclose(by_3[2:], by_2[2:])  # sample 2 gets batch [2, 3]'s grid
    assert not torch.allclose(by_3, latents(model, settings, ids, 3, grid="per-sample"))


def test_uniform_grids_are_linspace_for_every_row():
    grids = SampleStreams(0, range(3)).time_grids(4, "uniform", -1.5, 0.8)
    torch.testing.assert_close(grids, torch.linspace(0, 1, 5).expand(3, 5))


def test_the_per_sample_loop_never_reads_a_tensor_back_to_the_host(monkeypatch):
    model = make_model()
    streams = SampleStreams(0, range(2))
    noise = streams.normal((6, 16))

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the sampling loop")

        return fail

    settings = SamplerSettings(steps=3, method="sde", gamma=1.5, sc_cfg=2.0)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    with torch.no_grad():
        z = sample_latents(model, settings, noise, streams)
    monkeypatch.undo()
    assert torch.isfinite(z).all()
