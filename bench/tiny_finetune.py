"""Does fine-tuning with `--init` pay on the test bed? Fine-tuned vs from scratch, same N steps.

The source is a trained tiny run (default runs/tiny: the `tiny` preset, 1200 steps on
the test bed's source-language grammar). The new corpus is text it was never trained on:
`--corpus target` (default), a new language: the target side of the test bed's translation
task (other words, other word order: adjectives after the noun, postpositions, verb-final),
used as unconditional text; `--corpus shifted`, the same language with a different word
distribution (half of each word class's words, the others never occur, and other rule
probabilities), judged by that shifted grammar (a sample with a dropped word is rejected). For each
N, two runs train N steps on that corpus with the tiny preset's settings (same data order,
schedule and seed): one starts from the source's EMA weights (`train.init`), one from a
random init. Each is sampled (256 texts, the preset's SDE-32 setting, fixed seed) and
scored with the target grammar's exact recognizer and the graded measures, beside the
source model itself (step 0 of the fine-tune) and the target language's baselines.

    python bench/tiny_finetune.py                         # N = 100 and 300
    python bench/tiny_finetune.py --corpus shifted --steps 100
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
TARGET_CORPUS = "testbed:translate/train"


def shifted_grammar():
    """The source language with a different word distribution: half of each word class's
    words (the others never occur) and other rule probabilities (adjectives, PPs and
    objects much more often)."""
    from elfctl.testbed.grammar import RULES, WORD_CLASSES, Grammar

    lexicon = {c: words[: max(1, (len(words) + 1) // 2)] for c, words in WORD_CLASSES.items()}
    rules = dict(RULES)
    rules["NP"] = ((0.2, ("DET", "NOUN")), (0.8, ("DET", "ADJ", "NOUN")))
    rules["VP"] = tuple(
        (p, rhs) for p, (_, rhs) in zip((0.05, 0.05, 0.3, 0.3, 0.3), RULES["VP"], strict=True)
    )
    return Grammar(rules, lexicon)


def corpus(name: str, work: Path):
    """(data.train source, its texts, the grammar that judges samples) of a named corpus."""
    import datasets

    if name == "target":
        from elfctl.testbed.assets import resolve_testbed_uri
        from elfctl.testbed.translate import TARGET

        texts = list(datasets.load_from_disk(resolve_testbed_uri(TARGET_CORPUS))["target"])
        return TARGET_CORPUS, texts, TARGET
    import random

    from elfctl.model import load_tokenizer

    grammar = shifted_grammar()
    rng = random.Random(7)
    texts = [grammar.generate_sentence(rng) for _ in range(20_000)]
    folder = work / "shifted-corpus"
    if not folder.is_dir():
        tokenizer = load_tokenizer("testbed:grammar/tokenizer")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        datasets.Dataset.from_dict({"input_ids": ids, "text": texts}).save_to_disk(str(folder))
    return str(folder), texts, grammar


def score(texts: list[str], train_texts: list[str], grammar) -> dict:
    from elfctl.testbed.quality import evaluate_samples

    return evaluate_samples(texts, train_texts, grammar=grammar)


def samples_of(checkpoint: str, n: int, seed: int) -> list[str]:
    from elfctl.runs import load_for_sampling
    from elfctl.sampling import generate, setting_kwargs

    loaded = load_for_sampling(checkpoint)
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


def train_run(run_dir: Path, data: str, steps: int, init: str | None) -> float:
    from elfctl.config import resolve
    from elfctl.training import Trainer, make_accelerator

    sets = [f"data.train={data}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}"]
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
    parser.add_argument("--source", default="runs/tiny")
    parser.add_argument("--corpus", choices=["target", "shifted"], default="target")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench-finetune")
    args = parser.parse_args()

    import torch

    from elfctl.testbed.quality import evaluate_samples, random_word_samples

    torch.set_num_threads(1)  # a shared CPU stalls torch's default threads on small ops
    work = Path(args.work) / args.corpus
    work.mkdir(parents=True, exist_ok=True)
    data, train_texts, grammar = corpus(args.corpus, work)
    print(f"source: {args.source}; new corpus: {args.corpus} ({data})", flush=True)
    lines = ["| model | " + " | ".join(h for _, h in MEASURES) + " |"]
    lines.append("| --- |" + " --- |" * len(MEASURES))
    source_texts = samples_of(args.source, args.samples, args.seed)
    lines.append(row("source model, no fine-tuning", score(source_texts, train_texts, grammar)))
    for steps in args.steps:
        for init in (args.source, None):
            name = f"{'init' if init else 'scratch'}-{steps}"
            run_dir = work / name
            seconds = train_run(run_dir, data, steps, init)
            texts = samples_of(str(run_dir), args.samples, args.seed)
            label = f"{'--init' if init else 'from scratch'}, {steps} steps"
            lines.append(row(label, score(texts, train_texts, grammar)))
            print(f"{name}: trained in {seconds:.0f}s; e.g. {texts[:3]}", flush=True)
    held_out = train_texts[-args.samples :]
    lines.append(row("generator (ceiling)", score(held_out, train_texts[: -args.samples], grammar)))
    random_words = random_word_samples(args.samples, args.seed, grammar)
    lines.append(row("random words", evaluate_samples(random_words, train_texts, grammar=grammar)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
