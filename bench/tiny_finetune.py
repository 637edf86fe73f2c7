"""Does fine-tuning with `--init` pay on the test bed? Fine-tuned vs from scratch, same N steps.

The source is a trained tiny run (default /work/runs/tiny: the `tiny` preset, 1200 steps on
the test bed's source-language grammar). The new corpus is a language it was never trained
on: the target side of the test bed's translation task (other words, other word order:
adjectives after the noun, postpositions, verb-final), used as unconditional text. For each
N, two runs train N steps on that corpus with the tiny preset's settings (same data order,
schedule and seed): one starts from the source's EMA weights (`train.init`), one from a
random init. Each is sampled (256 texts, the preset's SDE-32 setting, fixed seed) and
scored with the target grammar's exact recognizer and the graded measures, beside the
source model itself (step 0 of the fine-tune) and the target language's baselines.

    python bench/tiny_finetune.py                         # N = 100 and 300
    python bench/tiny_finetune.py --steps 50 100 300 --source runs/tiny --work /tmp/ft
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MEASURES = [
    ("accepted", "accepted"),
    ("sentence_acceptance", "sentences"),
    ("bigram_validity", "bigrams"),
    ("entropy", "entropy"),
    ("duplicate_share", "duplicates"),
    ("novel_accepted_share", "novel/acc"),
]
CORPUS = ["data.train=testbed:translate/train", "data.validation=testbed:translate/validation"]


def target_texts() -> list[str]:
    import datasets

    from elfctl.testbed.assets import resolve_testbed_uri

    return list(datasets.load_from_disk(resolve_testbed_uri("testbed:translate/train"))["target"])


def score(texts: list[str], train_texts: list[str]) -> dict:
    from elfctl.testbed.quality import evaluate_samples
    from elfctl.testbed.translate import TARGET

    return evaluate_samples(texts, train_texts, grammar=TARGET)


def samples_of(source: str, n: int, seed: int) -> list[str]:
    from elfctl.runs import load_for_sampling
    from elfctl.sampler import generate, setting_kwargs

    loaded = load_for_sampling(source)
    setting = loaded.config.sampling[0]
    out = generate(
        loaded.model,
        loaded.tokenizer,
        **setting_kwargs(setting),
        num_samples=n,
        length=loaded.config.data.max_length,
        seed=seed,
        batch_size=setting.batch_size,
        precision="fp32",
    )
    return out.texts


def train_run(run_dir: Path, steps: int, init: str | None) -> float:
    from elfctl.config import resolve
    from elfctl.train import Trainer, make_accelerator

    sets = [*CORPUS, f"train.max_steps={steps}", f"train.checkpoint_every={steps}"]
    if init:
        sets.append(f"train.init={init}")
    cfg = resolve("tiny", sets=sets)
    start = time.perf_counter()
    Trainer(cfg, run_dir, make_accelerator(cpu=True)).fit()
    return time.perf_counter() - start


def row(label: str, m: dict) -> str:
    cells = [f"{m[key]:.3f}" for key, _ in MEASURES]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/work/runs/tiny")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-finetune")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # a shared CPU stalls torch's default threads on small ops
    work = Path(args.work)
    train_texts = target_texts()
    lines = ["| model | " + " | ".join(h for _, h in MEASURES) + " |"]
    lines.append("| --- |" + " --- |" * len(MEASURES))
    print(f"source: {args.source}; new corpus: testbed:translate/train targets", flush=True)
    lines.append(
        row(
            "source model, no fine-tuning",
            score(samples_of(args.source, args.samples, args.seed), train_texts),
        )
    )
    for steps in args.steps:
        for init in (args.source, None):
            name = f"{'init' if init else 'scratch'}-{steps}"
            run_dir = work / name
            seconds = train_run(run_dir, steps, init)
            texts = samples_of(str(run_dir), args.samples, args.seed)
            label = f"{'--init' if init else 'from scratch'}, {steps} steps"
            lines.append(row(label, score(texts, train_texts)))
            print(f"{name}: trained in {seconds:.0f}s; e.g. {texts[:3]}", flush=True)
    from elfctl.testbed.quality import evaluate_samples, random_word_samples
    from elfctl.testbed.translate import TARGET

    generator = [t for t in target_texts()[-args.samples :]]
    lines.append(row("target generator (ceiling)", score(generator, train_texts[: -args.samples])))
    lines.append(
        row(
            "random target words",
            evaluate_samples(
                random_word_samples(args.samples, args.seed, TARGET), train_texts, grammar=TARGET
            ),
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
