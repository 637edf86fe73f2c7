"""Rows that leave a batch while it is sampled: a served client that goes away frees its rows.

The server samples rows of several requests as one batch. When a client disconnects, its
rows are dropped from every per-row tensor before the next step, so the forwards that
remain are made for the rows still wanted. The rows that stay sample exactly what they
would have: each draws from its own random stream (`random_streams`), which keeps its
place, and rows share nothing but the forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class LiveRows:
    """Which rows of a batch are still sampled.

    `wanted()` says, for each row of the batch as it started, whether it is still wanted;
    the sampler asks before every step (a read of host flags, no device synchronisation).
    """

    def __init__(self, wanted: Callable[[], Sequence[bool]], batch: int):
        self._wanted = wanted
        self.batch = batch
        self.rows = list(range(batch))  # the rows still sampled, in batch order

    @property
    def left(self) -> list[int]:
        """The rows that left before the end, in batch order."""
        staying = set(self.rows)
        return [row for row in range(self.batch) if row not in staying]

    def update(self) -> list[int] | None:
        """Positions (in the rows sampled so far) of those still wanted; None if all are."""
        wanted = self._wanted()
        keep = [j for j, row in enumerate(self.rows) if wanted[row]]
        if len(keep) == len(self.rows):
            return None
        self.rows = [self.rows[j] for j in keep]
        return keep

    def expand(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Values of the rows still sampled (R, ...) -> the whole batch's (B, ...), `fill`
        at the rows that left."""
        if len(self.rows) == self.batch:
            return values
        out = values.new_full((self.batch, *values.shape[1:]), fill)
        out[torch.tensor(self.rows, device=values.device, dtype=torch.long)] = values
        return out
