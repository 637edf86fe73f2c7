"""How well does the `tiny` preset learn the test bed's grammar?

Trains the default tiny run (unless it is already complete), samples 256 texts from
its EMA weights with the preset's sampling settings, and scores them with the exact
recognizer and the graded measures, next to an untrained model and the baselines.

    python bench/tiny_quality.py                      # train runs/tiny if needed, then score
    python bench/tiny_quality.py --run-dir runs/tiny  # score an existing run
    python bench/tiny_quality.py --samples DIR        # only score a samples.jsonl / sample dir
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MEASURES = [
    ("accepted", "accepted (whole text)"),
    ("sentence_acceptance", "sentences accepted"),
    ("bigram_validity", "bigram validity"),
    ("entropy", "unigram entropy"),
    ("duplicate_share", "duplicates"),
    ("novel_accepted_share", "novel among accepted"),
    ("long_copy_share", "long samples copied"),
]


def training_texts() -> list[str]:
    import datasets

    from elfctl.testbed.assets import resolve_testbed_uri

    return list(datasets.load_from_disk(resolve_testbed_uri("testbed:grammar/train"))["text"])


def score(texts: list[str], train_texts: list[str]) -> dict:
    from elfctl.testbed.quality import evaluate_samples

    return evaluate_samples(texts, train_texts)


def train_if_needed(run_dir: Path) -> float | None:
    """Train the default tiny run; returns its wall time (None if it was already done)."""
    from elfctl.config import resolve
    from elfctl.model import list_step_dirs
    from elfctl.training import Trainer, make_accelerator

    cfg = resolve("tiny")
    trainer = Trainer(cfg, run_dir, make_accelerator(cpu=True))
    if trainer.step >= trainer.total_steps:
        return None
    start = time.perf_counter()
    last = [time.perf_counter()]

    def log(report) -> None:
        if report.record and time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            r = report.record
            print(f"  step {r['step']}: loss {r['loss']:.3f} ({r['steps_per_s']:.2f} steps/s)")

    trainer.fit(log)
    assert list_step_dirs(run_dir / "checkpoints")
    return time.perf_counter() - start


def sample_texts(model, tokenizer, cfg, n: int, seed: int) -> tuple[list[str], float]:
    from elfctl.sampling import generate, setting_kwargs

    start = time.perf_counter()
    out = generate(
        model,
        tokenizer,
        **setting_kwargs(cfg.sampling[0]),
        num_samples=n,
        length=cfg.data.max_length,
        seed=seed,
        batch_size=n,
        precision="fp32",
    )
    return out.texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--samples", type=Path, help="score this samples.jsonl or sample dir only")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from elfctl import records
    from elfctl.testbed.quality import baseline_measures

    train_texts = training_texts()
    columns: dict[str, dict] = {}
    info: dict = {}
    if args.samples:
        rows = records.read_samples(records.samples_path(args.samples))
        columns["samples"] = score([r["text"] for r in rows], train_texts)
    else:
        import torch

        from elfctl.model import ELF
        from elfctl.runs import load_for_sampling

        wall = train_if_needed(args.run_dir)
        info["train_wall_s"] = wall
        loaded = load_for_sampling(str(args.run_dir))
        info["step"] = loaded.checkpoint.step
        texts, seconds = sample_texts(
            loaded.model, loaded.tokenizer, loaded.config, args.num_samples, args.seed
        )
        info["sample_s"] = seconds
        columns["tiny (trained)"] = score(texts, train_texts)
        info["examples"] = texts[:8]
        torch.manual_seed(loaded.config.train.seed)
        untrained = ELF(loaded.config.model).eval()
        texts, _ = sample_texts(
            untrained, loaded.tokenizer, loaded.config, args.num_samples, args.seed
        )
        columns["untrained"] = score(texts, train_texts)
    baselines = baseline_measures(train_texts, n=args.num_samples)
    columns.update({f"{k} (baseline)": v for k, v in baselines.items()})

    names = list(columns)
    width = max(len(n) for n in names) + 2
    print(f"{'measure':<24}" + "".join(f"{n:>{width}}" for n in names))
    for key, label in MEASURES:
        values = "".join(f"{columns[n].get(key, float('nan')):>{width}.3f}" for n in names)
        print(f"{label:<24}{values}")
    if info:
        wall = info["train_wall_s"]
        trained = f"{wall:.0f}s" if wall is not None else "already trained"
        print(
            f"\ntiny run: step {info['step']}, training wall time {trained}, "
            f"sampling {args.num_samples} in {info['sample_s']:.1f}s"
        )
        print("examples:")
        for text in info["examples"]:
            print(f"  {text}")
    if args.json:
        args.json.write_text(json.dumps({"columns": columns, "info": info}, indent=2))


if __name__ == "__main__":
    main()
