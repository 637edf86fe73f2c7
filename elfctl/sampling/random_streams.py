"""Where a sample's randomness comes from: its own random stream, keyed by (seed, sample id).

Each sample draws its initial noise, its time grid and its churn noise from a
`torch.Generator` seeded by `sample_key(seed, id)`, in a fixed order: the noise (S, C),
then the grid's N-1 normals (random grids only: logit-normal), then one (S, C) churn draw per SDE
step but the last. So a sample is a function of (seed, id, sampling settings) only:
not of the batch size, the number of processes, or which process drew it.

`grid="per-batch"` keeps the official port's time grid instead: one grid per batch,
keyed by (seed, the batch's first id), shared by the batch's samples (their noise stays
per-sample). The official port draws that grid once per batch, which correlates a batch's
samples; per-sample grids give each sample the same marginal distribution without that.

Rows of one batch may come from different runs (the server batches requests together): a
`seed` may then be one seed per row, so each row's stream is still (its seed, its id).

`BatchStream` is the official port's draws: one generator for the whole batch (one grid,
and noise drawn for all rows at once). The sampler accepts either.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import torch

from elfctl.model import flow

GRIDS = ("per-sample", "per-batch")


def sample_key(seed: int, sample_id: int, purpose: str = "sample") -> int:
    """A 63-bit generator seed for one sample's stream (the same on every platform)."""
    digest = hashlib.blake2b(f"elfctl/{purpose}/{seed}/{sample_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class SampleStreams:
    """One random stream per sample of a batch (rows in the order of `ids`).

    `seed` is the run's seed, or one seed per row (rows of different requests).
    """

    def __init__(
        self,
        seed: int | Sequence[int],
        ids: Sequence[int],
        device: str | torch.device = "cpu",
        grid: str = "per-sample",
    ):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
        self.device = torch.device(device)
        self.ids = list(ids)
        self.grid = grid
        seeds = [seed] * len(self.ids) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(self.ids):
            raise ValueError(f"{len(seeds)} seeds for {len(self.ids)} samples")
        self.generators = [
            torch.Generator(self.device).manual_seed(sample_key(s, i))
            for s, i in zip(seeds, self.ids, strict=True)
        ]
        # The per-batch grid's own stream, keyed by the batch's first sample.
        self.grid_generator = torch.Generator(self.device).manual_seed(
            sample_key(seeds[0], self.ids[0], "batch-grid")
        )

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """(B, *shape) standard normals, row r from sample r's stream."""
        out = torch.empty(len(self.generators), *shape, device=self.device)
        for row, generator in enumerate(self.generators):
            torch.randn(tuple(shape), generator=generator, device=self.device, out=out[row])
        return out

    def select(self, rows: Sequence[int]) -> SampleStreams:
        """The streams of `rows` (positions in this batch) only, each where it stands: a row
        that stays draws exactly what it would have drawn beside the others."""
        out = copy.copy(self)
        out.ids = [self.ids[r] for r in rows]
        out.generators = [self.generators[r] for r in rows]
        return out

    def time_grids(self, steps: int, schedule: str, p_mean: float, p_std: float) -> torch.Tensor:
        """(B, N+1) time grids: each sample's own, or one per batch with grid="per-batch"."""
        B = len(self.generators)
        if not flow.is_random_schedule(schedule):
            return flow.time_grids(steps, schedule, None, p_mean, p_std, self.device, B)
        if self.grid == "per-batch":
            draws = torch.randn(steps - 1, generator=self.grid_generator, device=self.device)
            draws = draws.expand(B, -1)
        else:
            draws = self.normal((steps - 1,))
        return flow.time_grids(steps, schedule, draws, p_mean, p_std)


class BatchStream:
    """The official port's draws: one generator for the batch (None: torch's global one)."""

    def __init__(self, generator: torch.Generator | None, batch: int, device):
        self.generator, self.batch, self.device = generator, batch, torch.device(device)

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(self.batch, *shape, generator=self.generator, device=self.device)

    def time_grids(self, steps: int, schedule: str, p_mean: float, p_std: float) -> torch.Tensor:
        grid = flow.time_grid(steps, schedule, p_mean, p_std, self.generator, self.device)
        return grid.expand(self.batch, -1).contiguous()
