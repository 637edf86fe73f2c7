"""How much does one time grid per batch (the official port) inflate the spread of a figure?

Samples the test bed's tiny model with per-batch and per-sample logit-normal grids, over
several seeds, and scores grammar acceptance. Prints, per step count and grid:

* acceptance over the seeds: mean +- standard error (stats.mean_stderr) and the seeds' sd;
* the spread between the batches of one run: the sd of a batch's acceptance against the
  binomial sd sqrt(p (1 - p) / batch) that independent samples would give.

    python bench/grid_spread.py --run-dir runs/tiny          # 1024 samples, 4 seeds
    python bench/grid_spread.py --run-dir runs/tiny --steps 8 --seeds 0 1 --num-samples 256
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def acceptance_of(texts: list[str]) -> float:
    from elfctl.testbed.quality import evaluate_samples

    return evaluate_samples(texts, [])["accepted"]


def sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from elfctl.runs import load_for_sampling, mean_stderr
    from elfctl.sampling import generate, setting_kwargs

    loaded = load_for_sampling(str(args.run_dir))
    setting = setting_kwargs(loaded.config.sampling[0])
    results = []
    print(
        f"{args.run_dir} (step {loaded.checkpoint.step}): {args.num_samples} samples per run, "
        f"batches of {args.batch_size}, SDE gamma {setting['gamma']}, SC-CFG {setting['sc_cfg']}"
    )
    header = (
        f"{'steps':>5} {'grid':>10} {'acceptance (mean +- se)':>24} {'sd over seeds':>14} "
        f"{'sd between batches':>19} {'binomial sd':>12} {'s/run':>6}"
    )
    print(header)
    for steps in args.steps:
        for grid in ("per-batch", "per-sample"):
            per_seed, batch_sds, batch_accs, seconds = [], [], [], []
            for seed in args.seeds:
                start = time.perf_counter()
                texts = generate(
                    loaded.model,
                    loaded.tokenizer,
                    **{**setting, "steps": steps},
                    num_samples=args.num_samples,
                    length=loaded.config.data.max_length,
                    seed=seed,
                    batch_size=args.batch_size,
                    precision="fp32",
                    grid=grid,
                ).texts
                seconds.append(time.perf_counter() - start)
                per_seed.append(100 * acceptance_of(texts))
                chunks = [
                    100 * acceptance_of(texts[i : i + args.batch_size])
                    for i in range(0, len(texts), args.batch_size)
                ]
                batch_accs.append(chunks)
                batch_sds.append(sd(chunks))
            mean, stderr = mean_stderr(per_seed)
            p = mean / 100
            binomial = 100 * math.sqrt(p * (1 - p) / args.batch_size)
            between = sum(batch_sds) / len(batch_sds)
            row = {
                "steps": steps,
                "grid": grid,
                "per_seed": per_seed,
                "mean": mean,
                "stderr": stderr,
                "sd_over_seeds": sd(per_seed),
                "sd_between_batches": between,
                "binomial_sd": binomial,
                "seconds_per_run": sum(seconds) / len(seconds),
            }
            results.append(row)
            print(
                f"{steps:>5} {grid:>10} {f'{mean:.1f} +- {stderr:.2f} %':>24} "
                f"{row['sd_over_seeds']:>13.2f}  {between:>18.2f} {binomial:>12.2f} "
                f"{row['seconds_per_run']:>6.0f}",
                flush=True,
            )
    for steps in args.steps:
        batch, sample = (r for r in results if r["steps"] == steps)
        between = batch["sd_between_batches"] / sample["sd_between_batches"]
        seeds = batch["stderr"] / max(sample["stderr"], 1e-9)
        print(
            f"{steps} steps: per-batch grids give {between:.2f}x the between-batch sd and "
            f"{seeds:.2f}x the standard error over seeds of per-sample grids"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
