"""`elfctl sample` throughput on 1 and on N processes (accelerate launch), side by side.

Runs the same sample command (the run's own sampling setting) as one plain process at
--batch-size and under `accelerate launch --num_processes N` at --batch-size / N per
process, alternating, and prints the samples/s each run.json records (total and per
process), plus whether the two samples.jsonl are byte-identical (they must be).

    python bench/sample_processes.py --repo runs/tiny            # CPU, 1 vs 2
    python bench/sample_processes.py --repo RUN --processes 8 --gpu    # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(command: list[str], out: Path, threads: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads((out / "run.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="runs/tiny")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of each process")
    parser.add_argument("--gpu", action="store_true", help="sample on GPUs (default: --cpu)")
    args = parser.parse_args()

    bin_dir = Path(sys.executable).parent
    common = ["sample", "--repo", args.repo, "--num-samples", str(args.num_samples)]
    common += ["--precision", "fp32"] + ([] if args.gpu else ["--cpu"])
    one_batch = ["--batch-size", str(args.batch_size)]
    many_batch = ["--batch-size", str(max(1, args.batch_size // args.processes))]
    launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu"]
    launch += ["--num_processes", str(args.processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "elfctl"]
    print(
        f"{args.repo}: {args.num_samples} samples; 1 process at batch {args.batch_size}, "
        f"{args.processes} at batch {many_batch[1]}; OMP_NUM_THREADS={args.threads} per process"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            one, many = Path(tmp) / f"one{r}", Path(tmp) / f"many{r}"
            command = [str(bin_dir / "elfctl"), *common, *one_batch, "--out", str(one)]
            single = run(command, one, args.threads)
            multi = run([*launch, *common, *many_batch, "--out", str(many)], many, args.threads)
            same = (one / "samples.jsonl").read_bytes() == (many / "samples.jsonl").read_bytes()
            per = ", ".join(f"{x:.2f}" for x in multi["samples_per_s_per_process"])
            print(
                f"round {r + 1}: 1 process {single['samples_per_s']:.2f} samples/s; "
                f"{multi['processes']} processes {multi['samples_per_s']:.2f} samples/s in total "
                f"(per process {per}) -> {multi['samples_per_s'] / single['samples_per_s']:.2f}x; "
                f"samples.jsonl identical: {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
