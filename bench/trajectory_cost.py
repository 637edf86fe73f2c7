"""What does `--trajectory K` cost? Sampling with K recorded steps against off, side by side.

Runs the two settings alternately (ROUNDS rounds each, same seed, same batch) on a trained
run's model and prints samples/s for each, the ratio, and the counted network calls
(decode forwards and denoiser forwards), so the cost can be checked against its
prediction: K extra decode forwards on top of `steps` denoiser forwards and one decode.

    python bench/trajectory_cost.py --run-dir runs/tiny
    python bench/trajectory_cost.py --run-dir runs/tiny --k 8 --steps 32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


class CallCounter(torch.nn.Module):
    """The model, counting its decode and denoiser forwards."""

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from elfctl.runs import load_for_sampling
    from elfctl.sampling import generate, setting_kwargs

    loaded = load_for_sampling(str(args.run_dir))
    setting = setting_kwargs(loaded.config.sampling[0]) | {"steps": args.steps}

    def run(k: int) -> tuple[float, CallCounter]:
        counter = CallCounter(loaded.model)
        start = time.perf_counter()
        generate(
            counter,
            loaded.tokenizer,
            **setting,
            num_samples=args.num_samples,
            length=loaded.config.data.max_length,
            batch_size=args.batch_size,
            seed=0,
            precision="fp32",
            trajectory=k,
        )
        return args.num_samples / (time.perf_counter() - start), counter

    run(0)  # warm-up
    rates: dict[int, list[float]] = {0: [], args.k: []}
    counts: dict[int, CallCounter] = {}
    for _ in range(args.rounds):
        for k in (0, args.k):
            rate, counts[k] = run(k)
            rates[k].append(rate)
    batches = -(-args.num_samples // args.batch_size)
    off, on = statistics.median(rates[0]), statistics.median(rates[args.k])
    print(
        f"{args.run_dir}: {args.num_samples} samples, batch {args.batch_size}, "
        f"{args.steps}-step {setting['method'].upper()}, {args.rounds} alternating rounds "
        f"(torch threads {torch.get_num_threads()})"
    )
    for k, label in ((0, "off"), (args.k, f"--trajectory {args.k}")):
        c = counts[k]
        print(
            f"  {label:<16} {statistics.median(rates[k]):8.1f} samples/s (median; rounds "
            f"{', '.join(f'{r:.1f}' for r in rates[k])}); per batch {c.denoises // batches} "
            f"denoiser + {c.decodes // batches} decode forwards"
        )
    predicted = (args.steps + 1) / (args.steps + 1 + args.k)
    paired = [b / a for a, b in zip(rates[0], rates[args.k], strict=True)]
    print(
        f"  speed on/off: {statistics.median(paired):.3f} (median of the rounds' ratios "
        f"{', '.join(f'{r:.3f}' for r in paired)}; ratio of medians {on / off:.3f})"
    )
    print(
        f"  predicted if a decode forward costs what a denoiser forward does: {predicted:.3f} "
        f"= {args.steps + 1}/{args.steps + 1 + args.k}"
    )


if __name__ == "__main__":
    main()
