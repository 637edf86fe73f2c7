"""--trajectory: K decodes of x_hat at evenly spaced steps, and `elfctl show` of them."""

from __future__ import annotations

import pytest
import torch

from elfctl.errors import UserError
from elfctl.model import ELF
from elfctl.runs import Trajectory, draw_trajectory, pick, trajectory_of
from elfctl.sampling import (
    SamplerSettings,
    TrajectoryRecorder,
    decode,
    frame_changes,
    generate,
    recorded_steps,
    sample_latents,
)
from tests.conftest import randomize_, tiny_model_config


class DecodeCounter(torch.nn.Module):
    """Counts the network's decode forwards (decode=True) and denoiser forwards."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.decodes = self.denoises = 0

    def forward(self, inputs, t, sc_scale=None, decode=False):
        if decode:
            self.decodes += 1
        else:
            self.denoises += 1
        return self.model(inputs, t, sc_scale=sc_scale, decode=decode)


def make_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(ELF(tiny_model_config()), seed=seed, std=0.15).eval()


def test_recorded_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert recorded_steps(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert recorded_steps(10, 4) == [2, 4, 7, 9]  # steps 3, 5, 8, 10 (1-based): ceil(2.5), ...
    assert recorded_steps(3, 8) == [0, 1, 2]  # more than there are steps: every step once
    assert recorded_steps(5, 1) == [4]
    with pytest.raises(ValueError):
        recorded_steps(5, 0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_trajectory_costs_exactly_one_decode_per_recorded_step(word_tokenizer, k):
    counter = DecodeCounter(make_model())
    common = dict(steps=8, num_samples=3, length=6, seed=1, precision="fp32")
    out = generate(counter, word_tokenizer, trajectory=k, **common)
    assert counter.decodes == k + 1 and counter.denoises == 8  # K recorded + the final decode
    assert all(len(r["texts"]) == k == len(r["steps"]) == len(r["t"]) for r in out.trajectories)
    off = DecodeCounter(make_model())
    plain = generate(off, word_tokenizer, **common)
    assert off.decodes == 1 and plain.trajectories is None
    assert plain.tokens == out.tokens  # recording changes nothing about the samples


def test_the_last_recorded_step_is_the_final_text(word_tokenizer):
    out = generate(make_model(), word_tokenizer, steps=6, num_samples=4, length=6, trajectory=3)
    for record, text, tokens in zip(out.trajectories, out.texts, out.tokens, strict=True):
        assert record["steps"] == [2, 4, 6]
        assert record["texts"][-1] == text and record["tokens"][-1] == tokens


def test_recorded_frames_are_the_decoded_x_hat_of_those_steps():
    """A slow check: record every x_hat by hand and decode the chosen ones."""
    model = make_model()
    settings = SamplerSettings(steps=5, method="sde", sc_cfg=2.0)
    noise = torch.randn(2, 6, 16)
    seen = []
    sample_latents(
        model,
        settings,
        noise,
        torch.Generator().manual_seed(0),
        recorder=lambda i, t, x: seen.append(x),
    )
    recorder = TrajectoryRecorder(5, 2, lambda x: decode(model, x, 2.0))
    sample_latents(model, settings, noise, torch.Generator().manual_seed(0), recorder=recorder)
    times, frames = recorder.frames()
    assert recorder.steps == [2, 4] and len(times) == 2
    assert torch.equal(frames[0], decode(model, seen[2], 2.0))
    assert torch.equal(frames[1], decode(model, seen[4], 2.0))


def test_recording_adds_no_host_sync_to_the_step_loop(monkeypatch):
    model = make_model()
    recorder = TrajectoryRecorder(3, 3, lambda x: decode(model, x, 2.0))
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(_n))
    settings = SamplerSettings(steps=3, method="sde", sc_cfg=2.0)
    with torch.no_grad():
        sample_latents(model, settings, torch.randn(2, 6, 16), torch.Generator(), recorder=recorder)
    monkeypatch.undo()
    assert len(recorder.frames()[0]) == 3


def test_frame_changes_mark_words_that_differ_from_the_step_before():
    frames = [["a", "b"], ["a", "c", "d"], ["a", "c"]]
    assert frame_changes(frames) == [[True, True], [False, True, True], [False, False]]


def row(i, meta):
    return {"id": i, "text": "the dog runs .", "meta": meta, "condition": None}


def test_show_reads_trajectories_and_refuses_broken_ones():
    meta = {"prompt": "the", "trajectory": {"steps": [1, 2], "t": [0.1, 0.5], "texts": ["a", "b"]}}
    got = trajectory_of(row(0, meta))
    assert got == Trajectory(0, [1, 2], [0.1, 0.5], ["a", "b"], "the dog runs .", "the")
    assert trajectory_of(row(1, {})) is None
    with pytest.raises(UserError, match="uneven"):
        trajectory_of(row(2, {"trajectory": {"steps": [1], "t": [], "texts": ["a"]}}))
    with pytest.raises(UserError, match="No sample with id 7"):
        pick([row(0, {}), row(1, {})], 7)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_draw_trajectory_writes_a_picture_that_opens(tmp_path, suffix):
    from PIL import Image

    trajectory = Trajectory(3, [4, 8], [0.2, 0.6], ["a dog", "the dog runs ."], "the dog runs .")
    path = draw_trajectory(trajectory, tmp_path / f"traj{suffix}")
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 50
        if suffix == ".gif":
            assert image.n_frames == 2  # one per step (Pillow merges the held last frame)
    assert [p.name for p in tmp_path.iterdir()] == [f"traj{suffix}"]  # no temp files left
