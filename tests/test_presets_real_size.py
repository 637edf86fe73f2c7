"""Every official preset runs at its real size, offline (docs/presets.md).

The presets' hub assets are replaced by local stand-ins of the same shapes and formats
(tests/preset_standins.py): a 32100-entry tokenizer, a random T5 encoder of T5-small's
exact shape, and `save_to_disk` datasets in the official row format. Each preset then
runs in its own interpreter, so its peak resident memory is its own:

* owt-b, xsum-b, de-en-b and owt-b-pd: one training step at batch 1 and full length, one
  sampling step at the preset's length; for the conditional presets `elfctl eval`
  reports BLEU / ROUGE;
* owt-m and owt-l: built at their real width and depth, one training step with Muon at
  128 tokens (their full length would not fit this suite's time and memory).

Each test prints what it measured (run with -s to see it); docs/presets.md holds the
figures and the batch each preset fits on an 80 GB GPU, estimated on paper from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elfctl.config import resolve
from tests.preset_standins import build_assets

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHORT = 128  # owt-m / owt-l train at this length


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("preset-assets"))


def run_preset(assets: Path, preset: str, run_dir: Path, length: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "tests.preset_standins", str(assets), preset, str(run_dir)]
    done = subprocess.run(
        args + ([str(length)] if length else []),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result))
    return result


def parameter_count(preset: str) -> int:
    import torch

    from elfctl.model import ELF

    with torch.device("meta"):
        model = ELF(resolve(preset).model)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["owt-b", "owt-b-pd", "de-en-b", "xsum-b"])
def test_a_base_preset_trains_and_samples_at_its_real_size(assets, tmp_path, preset):
    official = resolve(preset)
    result = run_preset(assets, preset, tmp_path / preset)
    assert result["length"] == official.data.max_length  # full length, not shortened
    assert result["parameters"] == parameter_count(preset)
    assert result["encoder_parameters"] == 35_330_816  # T5-small's encoder, exactly
    assert result["loss_finite"] and result["optimizer"] == "muon" and result["muon_state"] > 0
    assert result["sample_step_s"] > 0
    assert result["held_gb"] < 80  # weights, EMA, gradients, optimizer state fit a GPU
    if result["length"] >= 1024:  # long rows: activations show in the peak memory
        assert result["batch_80gb"] >= 1  # docs/presets.md: the batch that fits, on paper
    if official.data.conditional:
        rows = result["eval"]["rows"]
        assert result["eval"]["exit_code"] == 0, result["eval"]
        wanted = "bleu" if preset == "de-en-b" else "rouge1"
        assert [row["setting"] for row in rows] == [s.name for s in official.sampling]
        assert all(isinstance(row[wanted], float) for row in rows), rows


@pytest.mark.parametrize("preset", ["owt-m", "owt-l"])
def test_a_larger_preset_builds_at_its_real_width_and_depth_and_takes_a_muon_step(
    assets, tmp_path, preset
):
    result = run_preset(assets, preset, tmp_path / preset, SHORT)
    assert result["length"] == SHORT
    assert result["parameters"] == parameter_count(preset)
    assert result["loss_finite"] and result["optimizer"] == "muon" and result["muon_state"] > 0
    assert result["held_gb"] < 80  # docs/presets.md scales the activations on paper
