"""Rows that leave a batch mid-trajectory (a served client that disconnects): they stop costing
forwards at once, and the rows that stay sample exactly what they would have sampled."""

from __future__ import annotations

import math

import pytest
import torch

from elfctl.sampling import (
    SOLVERS,
    Condition,
    KnownTokens,
    LiveRows,
    SamplerSettings,
    SampleStreams,
    sample_batch,
    sample_latents,
    solver,
)
from tests.test_solvers import make_condition, make_model
from tests.test_streams import varied_model


def leaving(row: int, before_step: int, batch: int):
    """wanted(): every row, until `row` leaves before step `before_step` (0-based)."""
    asked = []

    def wanted() -> list[bool]:
        asked.append(1)
        return [r != row or len(asked) <= before_step for r in range(batch)]

    return wanted


def forward_rows(model) -> tuple[list[int], object]:
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: rows.append(a[0].shape[0]), with_kwargs=True
    )
    return rows, hook


def test_live_rows_keeps_positions_of_the_rows_still_wanted_and_expands_back():
    wanted = [True, True, True, True]
    live = LiveRows(lambda: wanted, 4)
    assert live.update() is None
    wanted[1] = False
    assert live.update() == [0, 2, 3]
    wanted[3] = False
    assert live.update() == [0, 1]  # positions among the rows sampled so far: 0, 2, 3
    assert live.rows == [0, 2] and live.left == [1, 3]
    values = torch.tensor([[5.0], [7.0]])
    assert live.expand(values, -1.0).tolist() == [[5.0], [-1.0], [7.0], [-1.0]]


@pytest.mark.parametrize("method", list(SOLVERS))
def test_rows_that_stay_sample_what_they_would_have_and_forwards_shrink_at_once(method):
    """With a condition and CFG (two branches per forward), every sampler's per-row state
    (z, self-condition, previous time, grid, churn stream) follows the rows that stay."""
    model = make_model()
    B, steps = 3, 5
    cond = make_condition(B=2)
    # A third row: row 0's condition again.
    cond = Condition(
        torch.cat([cond.latents, cond.latents[:1]]),
        torch.cat([cond.mask, cond.mask[:1]]),
        torch.cat([cond.lengths, cond.lengths[:1]]),
        cond.max_input_length,
    )
    settings = SamplerSettings(steps, method, 1.5, 2.0, 2.0, "logit_normal")
    noise = SampleStreams(4, range(B)).normal((6, 16))
    with torch.no_grad():
        whole = sample_latents(model, settings, noise, SampleStreams(4, range(B)), cond)
        rows, hook = forward_rows(model)
        live = LiveRows(leaving(row=1, before_step=3, batch=B), B)
        kept = sample_latents(model, settings, noise, SampleStreams(4, range(B)), cond, live=live)
        hook.remove()
    assert live.rows == [0, 2] and live.left == [1]
    torch.testing.assert_close(kept, whole[[0, 2]], atol=1e-5, rtol=1e-5)
    before = 3 * solver(method).forwards_per_step
    assert rows == [2 * B] * before + [2 * 2] * (solver(method).forwards(steps) - before)


def prompt_known(B: int, L: int, C: int) -> KnownTokens:
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :2] = True
    latents = torch.randn(B, L, C, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[5, 6] + [0] * (L - 2)] * B)
    return KnownTokens(ids, mask, latents * mask[..., None], torch.full((B,), 2), "clean")


def test_a_batch_with_prompts_and_live_frames_goes_on_for_the_rows_that_stay():
    model = varied_model()
    settings = SamplerSettings(steps=6, method="sde", gamma=1.5, sc_cfg=3.0)
    ids, B, L = [0, 1, 2, 3], 4, 6
    known = prompt_known(B, L, model.cfg.latent_dim)
    whole = sample_batch(model, settings, ids, 4, L, precision="fp32", known=known, trajectory=3)
    frames: list = []
    out = sample_batch(
        model,
        settings,
        ids,
        4,
        L,
        precision="fp32",
        known=known,
        trajectory=3,
        on_frame=frames.append,
        wanted=leaving(row=2, before_step=3, batch=B),
    )
    assert out.left == [2]
    assert out.tokens[2] == []
    assert [out.tokens[r] for r in (0, 1, 3)] == [whole.tokens[r] for r in (0, 1, 3)]
    # Frames: recorded at steps 2, 4, 6; row 2 left before step 4 (0-based 3).
    assert len(frames) == 3 and all(len(frame) == B for frame in frames)
    assert frames[0][2] == whole.trajectories[2]["tokens"][0]
    for r in (0, 1, 3):
        assert out.trajectories[r] == whole.trajectories[r]
    times = out.trajectories[2]["t"]
    assert times[0] == whole.trajectories[2]["t"][0] and all(math.isnan(t) for t in times[1:])


def test_when_every_row_leaves_no_more_forwards_are_made():
    model = varied_model()
    settings = SamplerSettings(steps=8, method="sde", gamma=1.5, sc_cfg=3.0)
    rows, hook = forward_rows(model)
    try:
        out = sample_batch(
            model, settings, [0, 1], 4, 6, precision="fp32", trajectory=4, wanted=lambda: [0, 0]
        )
    finally:
        hook.remove()
    assert rows == []  # not one sampling or decode forward
    assert out.tokens == [[], []] and out.left == [0, 1]
    assert out.trajectories == [{"steps": [], "t": [], "tokens": []}] * 2


def test_rows_can_leave_only_when_each_has_its_own_stream():
    model = make_model()
    settings = SamplerSettings(steps=3, method="sde")
    with pytest.raises(ValueError, match="own stream"):
        sample_latents(
            model,
            settings,
            torch.randn(2, 4, 16),
            torch.Generator().manual_seed(0),
            live=LiveRows(lambda: [True, True], 2),
        )
