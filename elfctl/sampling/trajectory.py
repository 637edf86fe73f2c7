"""The denoising trajectory: what the model's prediction x_hat says at K steps of sampling.

At K evenly spaced steps (the last one included) the step's x_hat is decoded with the
decoder head at t = 1, exactly as the final decode reads the final z: one extra decode
forward per recorded step, none when recording is off. The decoded ids stay on the device
until sampling ends, so recording adds no host synchronisation to the step loop.

On the official grids the last step starts below t = 1 - t_eps, where the Euler step lands
exactly on x_hat, so the last recorded text is the final text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from elfctl.sampling.live_rows import LiveRows


def recorded_steps(steps: int, k: int) -> list[int]:
    """K evenly spaced step indices out of 0..steps-1, ending at the last step.

    For j = 1..K the recorded step is the first one by whose end j/K of the steps are done:
    the ceil(j * steps / K)-th (1-based). K larger than `steps` records every step once.
    """
    if k < 1:
        raise ValueError(f"a trajectory needs K >= 1 recorded steps, got {k}")
    k = min(k, steps)
    return [-(-j * steps // k) - 1 for j in range(1, k + 1)]


class TrajectoryRecorder:
    """Called by the sampler after each step with (step, t, x_hat); keeps K decodes on device.

    With `live` (rows can leave the batch, `live_rows`), x_hat and t hold the rows still
    sampled; `decode` then returns ids for the whole batch, and times of rows that left are
    recorded as NaN.
    """

    def __init__(
        self,
        steps: int,
        k: int,
        decode: Callable[[torch.Tensor], torch.Tensor],
        live: LiveRows | None = None,
    ):
        self.steps = recorded_steps(steps, k)
        self._wanted = set(self.steps)
        self._decode = decode
        self._live = live
        self.times: list[torch.Tensor] = []  # (B,), the time each row's x_hat was predicted at
        self.tokens: list[torch.Tensor] = []  # (B, S) decoded ids per recorded step

    def __call__(self, step: int, t: torch.Tensor, x_hat: torch.Tensor) -> None:
        if step in self._wanted:
            t = t.detach().reshape(-1).expand(x_hat.shape[0])
            self.times.append(self._live.expand(t, float("nan")) if self._live else t)
            self.tokens.append(self._decode(x_hat))

    def frames(self) -> tuple[list[list[float]], torch.Tensor]:
        """(times (K, B), ids (K, B, S)) once sampling is done (the one host read of the
        times; each sample has its own time grid, streams.py)."""
        if not self.tokens:  # every row left before the first recorded step
            return [], torch.empty(0, dtype=torch.long)
        return torch.stack(self.times).tolist(), torch.stack(self.tokens)


def frame_changes(frames: list[list[str]]) -> list[list[bool]]:
    """For each frame (a list of words or tokens), which entries differ from the frame before.

    Entries past the end of the previous frame count as changed; the first frame is all new.
    """
    changes: list[list[bool]] = []
    previous: list[str] | None = None
    for frame in frames:
        if previous is None:
            changes.append([True] * len(frame))
        else:
            changes.append(
                [i >= len(previous) or word != previous[i] for i, word in enumerate(frame)]
            )
        previous = frame
    return changes
