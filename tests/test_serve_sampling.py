"""What the server needs from the sampler: rows of one batch under different seeds, and each
recorded frame handed out as soon as it is decoded."""

from __future__ import annotations

import torch

from elfctl.sampling import SamplerSettings, SampleStreams, sample_batch
from tests.test_streams import varied_model

SETTINGS = SamplerSettings(steps=6, method="sde", gamma=1.5, sc_cfg=3.0)


def test_per_row_seeds_give_each_row_the_stream_of_its_own_seed_and_id():
    mixed = SampleStreams([4, 9, 4], [0, 0, 2])
    alone = [SampleStreams(4, [0]), SampleStreams(9, [0]), SampleStreams(4, [2])]
    draws = mixed.normal((5, 3))
    for row, stream in enumerate(alone):
        assert torch.equal(draws[row : row + 1], stream.normal((5, 3)))
    grids = mixed.time_grids(6, "logit_normal", -1.5, 0.8)
    for row, stream in enumerate(alone):
        assert torch.equal(grids[row : row + 1], stream.time_grids(6, "logit_normal", -1.5, 0.8))


def test_a_batch_of_rows_under_different_seeds_equals_each_row_sampled_alone():
    model = varied_model()
    seeds, ids = [4, 9, 4, 1], [0, 0, 1, 3]
    batch = sample_batch(model, SETTINGS, ids, seeds, 6, precision="fp32").tokens
    alone = [
        sample_batch(model, SETTINGS, [i], s, 6, precision="fp32").tokens[0]
        for s, i in zip(seeds, ids, strict=True)
    ]
    assert batch == alone
    assert batch[0] != batch[1]  # same id, another seed: another sample


def test_on_frame_receives_each_recorded_frame_as_the_trajectory_records_it():
    model = varied_model()
    frames = []
    out = sample_batch(
        model, SETTINGS, [0, 1], 4, 6, precision="fp32", trajectory=3, on_frame=frames.append
    )
    assert len(frames) == 3
    for b, record in enumerate(out.trajectories):
        assert [frame[b] for frame in frames] == record["tokens"]
    assert frames[-1] == out.tokens  # the last recorded step is the final text
