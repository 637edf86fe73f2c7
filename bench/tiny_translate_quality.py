"""BLEU of the offline translation task at CFG 1 and CFG 2, with the training time.

Trains the `tiny-translate` preset on this machine's CPU (capped at --minutes of wall
time), or takes an existing run with --run-dir, then samples the first --rows sources of
`testbed:translate/validation` through the same library path as
`elfctl sample --input` (read_condition_inputs -> SampleJob with conditions), once per sampling
setting of the preset (ODE-64, SC-CFG 1, CFG 2 and CFG 1), and scores sacreBLEU against
the references. It also counts the network forwards per sampling step (CFG batches its
two branches into one forward of twice the rows) and reports, beside BLEU, the share of
exact translations and of outputs the target grammar accepts.

    python bench/tiny_translate_quality.py                      # train (<= 12 min) + score
    python bench/tiny_translate_quality.py --run-dir runs/tt    # score an existing run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def train_run(run_dir: Path, minutes: float, max_steps: int | None) -> tuple[int, float]:
    from elfctl.config import resolve
    from elfctl.training import make_accelerator, train

    sets = [f"train.max_minutes={minutes}"]
    if max_steps is not None:
        sets.append(f"train.max_steps={max_steps}")
    cfg = resolve("tiny-translate", sets=sets)

    def log(report):
        if report.record is not None and report.step % 100 == 0:
            r = report.record
            print(
                f"  step {r['step']:5d}  loss {r['loss']:.4f}  l2 {r['l2']:.4f}  ce {r['ce']:.4f}"
                f"  {r['steps_per_s']:.2f} steps/s",
                flush=True,
            )

    result = train(cfg, run_dir, accelerator=make_accelerator(cpu=True), on_step=log)
    return result.step, result.seconds


class ForwardCounter:
    """Counts ELF forwards and the rows each one carries."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda m, a: self.rows.append(len(a[0])))

    def close(self):
        self.handle.remove()


def evaluate(run_dir: Path, rows: int, out_root: Path, seed: int) -> list[dict]:
    from elfctl import records
    from elfctl.data import read_condition_inputs
    from elfctl.runs import SampleJob, load_for_sampling
    from elfctl.scoring import score_bleu
    from elfctl.testbed.translate import target_accepts

    loaded = load_for_sampling(str(run_dir), with_encoder=True)
    sources, references = read_condition_inputs("testbed:translate/validation", limit=rows)
    results = []
    for setting in sorted(loaded.config.sampling, key=lambda s: s.cfg):
        job = SampleJob(
            setting=setting,
            num_samples=len(sources),
            length=loaded.config.data.max_length,
            seed=seed,
            batch_size=min(setting.batch_size, len(sources)),
            precision="fp32",
            conditions=sources,
            references=references,
        )
        counter = ForwardCounter(loaded.model)
        start = time.perf_counter()
        job.run(loaded, out_root / setting.name)
        seconds = time.perf_counter() - start
        counter.close()
        texts = [r["text"] for r in records.read_samples(out_root / setting.name)]
        batches = -(-len(sources) // job.batch_size)
        per_step = (len(counter.rows) - batches) / (setting.steps * batches)  # minus decodes
        step_rows = counter.rows[0] / job.batch_size
        results.append(
            {
                "setting": setting.name,
                "cfg": setting.cfg,
                "bleu": score_bleu(texts, references).bleu,
                "exact": sum(t == r for t, r in zip(texts, references, strict=True)) / len(texts),
                "accepted": sum(map(target_accepts, texts)) / len(texts),
                "forwards_per_step": per_step,
                "rows_per_forward": step_rows,
                "seconds": seconds,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="score this run instead of training one")
    parser.add_argument("--train-dir", type=Path, help="where to train (default: a temp dir)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-time cap")
    parser.add_argument("--max-steps", type=int, help="override the preset's max_steps")
    parser.add_argument("--rows", type=int, default=256, help="validation sources to translate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="sample runs go here (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    total_start = time.perf_counter()
    out_root = args.out or Path(tempfile.mkdtemp(prefix="tiny-translate-bench-"))
    if args.run_dir is not None:
        run_dir, steps, train_seconds = args.run_dir, None, None
    else:
        run_dir = args.train_dir or out_root / "run"
        print(f"training tiny-translate in {run_dir} (at most {args.minutes} min)", flush=True)
        steps, train_seconds = train_run(run_dir, args.minutes, args.max_steps)
        print(f"trained {steps} steps in {train_seconds / 60:.1f} min", flush=True)

    results = evaluate(run_dir, args.rows, out_root, args.seed)
    print()
    print(f"tiny-translate, {args.rows} validation sources, run {run_dir}")
    if steps is not None:
        print(
            f"training: {steps} steps in {train_seconds:.0f} s ({torch.get_num_threads()} threads)"
        )
    header = (
        f"{'setting':10s} {'CFG':>4s} {'BLEU':>6s} {'exact':>6s} {'accepted':>8s} "
        f"{'fwd/step':>8s} {'rows/fwd':>8s} {'sample s':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['setting']:10s} {r['cfg']:4.1f} {r['bleu']:6.2f} {r['exact']:6.1%} "
            f"{r['accepted']:8.1%} {r['forwards_per_step']:8.2f} {r['rows_per_forward']:8.2f} "
            f"{r['seconds']:8.1f}"
        )
    best = max(results, key=lambda r: r["bleu"])
    print(f"best: {best['setting']} BLEU {best['bleu']:.2f} (goal >= 50)")
    print(f"wall time: {time.perf_counter() - total_start:.0f} s; samples in {out_root}")


if __name__ == "__main__":
    main()
