"""Sampling speed, eager vs torch.compile, measured side by side in one run.

Also measures, side by side, what per-sample randomness costs: each sample drawing its
noise, grid and churn from its own stream (streams.SampleStreams, what elfctl samples
with) against one generator for the whole batch (the official port's draws).

Also reports the forward passes per sampling step (SC-CFG only, and CFG > 1 on a
conditional batch): both must be ONE batched forward.

    python bench/sample_speed.py                 # the tiny net of docs/benchmarks.md
    python bench/sample_speed.py --size elf-b --length 128 --batch 4 --repeats 1
    python bench/sample_speed.py --device cuda --precision bf16 --size elf-b --batch 64

The official PyTorch port, measured side by side with this script on this 2-core CPU
(docs/benchmarks.md, quiet machine, default threads, random weights, fp32, its own sampling
loop): tiny net (H128, depth 4, C64, V512), length 64, batch 16, 32-step SDE: 21.8-24.8
samples/s (midpoint 23.3); ELF-B, length 128, batch 4, 32-step SDE: 0.270 samples/s.
The printed ratio is our eager (and compiled) samples/s over that figure: the same
network size, batch, length and step count, both without a T5 encoder (unconditional
sampling never runs it). It is only meaningful on that quiet 2-core CPU; this script's
own run is measured now, the port's figure is a constant from docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from elfctl.config import ModelConfig
from elfctl.model import ELF
from elfctl.sampling import (
    Condition,
    SamplerSettings,
    SampleStreams,
    autocast_context,
    decode,
    sample_latents,
)

SIZES = {
    "tiny": ModelConfig(
        hidden_size=128, depth=4, num_heads=4, bottleneck=64, latent_dim=64, vocab_size=512
    ),
    "elf-b": ModelConfig(),
}
# The official port's samples/s on the 2-core CPU, side by side with ours (docs/benchmarks.md,
# 2026-12-02; the tiny figure is the midpoint of its 21.8-24.8 range).
OFFICIAL = {("tiny", 64, 16): 23.3, ("elf-b", 128, 4): 0.270}


def count_forwards(model, settings, noise, condition=None) -> list[int]:
    """Batch rows of every model call during one sampling run (decode excluded)."""
    rows = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        sample_latents(model, settings, noise, torch.Generator(noise.device), condition)
    hook.remove()
    return rows


def time_sampling(
    net, settings, batch, length, C, device, precision, repeats, per_sample=False
) -> float:
    """Best samples/s over `repeats` runs of (draws +) sample + decode.

    per_sample: each sample's own stream (SampleStreams, built inside the timing);
    otherwise one torch.Generator for the batch.
    """
    best = 0.0
    gen = torch.Generator(device).manual_seed(0)
    for repeat in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if per_sample:
            draws = SampleStreams(repeat, range(batch * repeat, batch * (repeat + 1)), device)
            noise = draws.normal((length, C))
        else:
            draws = gen
            noise = torch.randn(batch, length, C, generator=gen, device=device)
        with autocast_context(device, precision), torch.no_grad():
            z = sample_latents(net, settings, noise, draws)
            tokens = decode(net, z, settings.sc_cfg)
        tokens.cpu()  # the only host sync, after the loop
        best = max(best, batch / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="per-batch vs per-sample rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = SIZES[args.size]
    torch.manual_seed(0)
    model = ELF(cfg).to(device).eval().requires_grad_(False)
    C = cfg.latent_dim
    settings = SamplerSettings(steps=args.steps, method="sde", gamma=1.5, sc_cfg=3.0)

    noise = torch.randn(2, 8, C, device=device)
    plain = count_forwards(model, settings, noise)
    mask = torch.zeros(2, 8, dtype=torch.bool, device=device)
    mask[:, :3] = True
    cond = Condition(torch.zeros(2, 8, C, device=device), mask, torch.tensor([3, 3]), 3)
    guided = count_forwards(model, SamplerSettings(args.steps, "ode", 0, 1.0, 2.0), noise, cond)
    print(
        f"forwards per step, SC-CFG only: {len(plain) / args.steps:.0f} "
        f"(batch rows {plain[0]} for 2 samples)"
    )
    print(
        f"forwards per step, CFG 2:       {len(guided) / args.steps:.0f} "
        f"(batch rows {guided[0]} for 2 samples: both branches in one forward)"
    )

    print(
        f"\n{args.size}, length {args.length}, batch {args.batch}, {args.steps}-step SDE, "
        f"{args.device}, precision {args.precision}"
    )
    eager = time_sampling(
        model, settings, args.batch, args.length, C, device, args.precision, args.repeats
    )
    print(f"eager:    {eager:8.3f} samples/s  (one generator per batch: the official draws)")
    # Interleaved rounds, so both see the same machine load.
    batch_rates, sample_rates = [], []
    for _ in range(args.rounds):
        batch_rates.append(
            time_sampling(model, settings, args.batch, args.length, C, device, args.precision, 1)
        )
        sample_rates.append(
            time_sampling(
                model, settings, args.batch, args.length, C, device, args.precision, 1, True
            )
        )
    per_batch, per_sample = max(batch_rates), max(sample_rates)
    print(
        f"randomness, eager, best of {args.rounds} interleaved rounds: per-batch draws "
        f"{per_batch:.3f}, per-sample streams {per_sample:.3f} samples/s "
        f"({per_sample / per_batch:.3f}x)"
    )
    if not args.no_compile:
        compiled_net = torch.compile(model)
        start = time.perf_counter()
        time_sampling(
            compiled_net, settings, args.batch, args.length, C, device, args.precision, 1
        )  # warm-up: compilation
        warm = time.perf_counter() - start
        compiled = time_sampling(
            compiled_net, settings, args.batch, args.length, C, device, args.precision, args.repeats
        )
        print(
            f"compiled: {compiled:8.3f} samples/s  ({compiled / eager:.2f}x eager; "
            f"first run incl. compilation {warm:.0f}s)"
        )
    reference = OFFICIAL.get((args.size, args.length, args.batch))
    if reference and device.type == "cpu":
        ratios = f"eager {eager / reference:.2f}x"
        if not args.no_compile:
            ratios += f", compiled {compiled / reference:.2f}x"
        print(
            f"vs a RECORDED figure, not measured in this run: the official port's {reference} "
            f"samples/s on a quiet 2-core CPU (its own loop, same net/batch/length/steps, fp32; "
            f"docs/benchmarks.md). On another machine this ratio means little: {ratios}"
        )


if __name__ == "__main__":
    main()
