"""bench/gpu_check.py keeps working: the CI-sized run on the CPU (tiny sizes, 2 gloo
processes), and its FLOP count against a hand count."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elfctl.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_flop_count_of_one_elf_b_forward_matches_a_hand_count():
    gpu_check = load_script()
    S, L, H, F, C, V = 1024, 1036, 768, 2048, 512, 32100
    per_token_block = 2 * (3 * H * H + H * H + H * 2 * F + F * H)  # qkv, proj, w12, w3
    attention = 2 * 2 * L * L * H  # q k^T and attn @ v, per block
    expected = S * 2 * (2 * C * C + C * 128 + 128 * H) + 12 * (L * per_token_block + attention)
    expected += S * 2 * H * C
    assert gpu_check.forward_flops(ModelConfig(), S, decode=False) == expected
    decode = S * 2 * (H * C + C * V)
    assert gpu_check.forward_flops(ModelConfig(), S, decode=True) == expected + decode
    assert gpu_check.sampling_flops(ModelConfig(), S, 32) == 33 * expected + decode
    assert 200e9 < expected < 230e9  # about 210 GFLOP per 1024-token forward


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu_at_tiny_sizes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--size", "tiny", "--modes", "eager", "cudagraphs", "--processes", "2"]
    args += ["--steps", "4", "--repeats", "1", "--train-steps", "1", "--cpu"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "eager" in out and "samples/s" in out and "TFLOP/s" in out
    assert "cudagraphs  skipped: CUDA graphs need a CUDA device" in out
    assert "tokens/s" in out and "2 processes (eager): sampling" in out
