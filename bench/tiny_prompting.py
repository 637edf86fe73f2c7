"""Prompting and infilling on the test bed: which way of holding known tokens works?

For a trained tiny run, samples N texts per cell with the preset's sampler (SDE, gamma
1.5, SC-CFG 3, logit-normal grid, batches of 32) at 8 and 32 steps:

  unconditional          plain samples (the reference rate)
  prompt / <method>      the first two words of a held-out sentence fixed
  infill / <method>      its first two and last two words fixed, a gap of the right
                         length between them (sentences of 6-9 tokens: gaps of 2-5)

Methods: hold = noised (known positions on the noising path z = t x + (1 - t) s eps) or
clean (z = x, as conditions are held) x encoding = masked (all known tokens in one pass,
gaps masked out) or segments (each run of known tokens alone); for a prefix the two
encodings coincide, so prompts try the two holds only.

Reported per cell: the share of texts the grammar accepts, that share relative to the
unconditional one, and the share of rows whose known tokens came back exactly.

    python bench/tiny_prompting.py --run-dir runs/tiny
    python bench/tiny_prompting.py --run-dir runs/tiny --num-samples 512 --steps 8 32
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

METHODS = [("noised", "masked"), ("clean", "masked"), ("noised", "segments"), ("clean", "segments")]


def held_out_sentences(n: int, seed: int) -> list[str]:
    """Validation sentences of at least 6 words (gaps of 2 or more), in a seeded order."""
    import datasets

    from elfctl.testbed.assets import resolve_testbed_uri

    texts = list(datasets.load_from_disk(resolve_testbed_uri("testbed:grammar/validation"))["text"])
    long = [t for t in texts if len(t.split()) >= 6]
    random.Random(seed).shuffle(long)
    return [long[i % len(long)] for i in range(n)]


def prompt_of(sentence: str) -> str:
    return " ".join(sentence.split()[:2])


def template_of(sentence: str) -> str:
    words = sentence.split()
    return f"{' '.join(words[:2])} [gap:{len(words) - 4}] {' '.join(words[-2:])}"


def known_kept(tokens: list[int], layout) -> bool:
    """The known token ids sit exactly at their positions of the output."""
    return all(
        p < len(tokens) and tokens[p] == known
        for p, known in enumerate(layout.ids)
        if known is not None
    )


def run_cell(loaded, encoder, steps: int, n: int, seed: int, **kwargs) -> dict:
    from elfctl.sampling import generate, layouts_for, setting_kwargs
    from elfctl.testbed.grammar import accepts

    setting = setting_kwargs(loaded.config.sampling[0]) | {"steps": steps}
    start = time.perf_counter()
    out = generate(
        loaded.model,
        loaded.tokenizer,
        **setting,
        num_samples=n,
        length=loaded.config.data.max_length,
        seed=seed,
        batch_size=32,
        precision="fp32",
        encoder=encoder,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    accepted = sum(accepts(" ".join(t.split())) for t in out.texts) / n
    cell = {"accepted": accepted, "seconds": seconds, "examples": out.texts[:4]}
    given = kwargs.get("prompt") or kwargs.get("infill")
    if given:
        layouts = layouts_for(loaded.tokenizer, kwargs.get("prompt"), kwargs.get("infill"))
        kept = [known_kept(t, lay) for t, lay in zip(out.tokens, layouts, strict=True)]
        cell["known_kept"] = sum(kept) / n
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from elfctl.model import load_encoder
    from elfctl.runs import load_for_sampling

    loaded = load_for_sampling(str(args.run_dir))
    encoder = load_encoder(loaded.config.encoder)
    sentences = held_out_sentences(args.num_samples, args.seed)
    prompts = [prompt_of(s) for s in sentences]
    templates = [template_of(s) for s in sentences]

    results: dict[str, dict] = {}
    for steps in args.steps:
        cells = {"unconditional": run_cell(loaded, encoder, steps, args.num_samples, args.seed)}
        for hold, encoding in METHODS:
            options = {"hold": hold, "known_encoding": encoding}
            if encoding == "masked":  # the same as segments for a prefix
                cells[f"prompt / {hold}"] = run_cell(
                    loaded, encoder, steps, args.num_samples, args.seed, prompt=prompts, **options
                )
            cells[f"infill / {hold}, {encoding}"] = run_cell(
                loaded, encoder, steps, args.num_samples, args.seed, infill=templates, **options
            )
        results[str(steps)] = cells

    base = {steps: cells["unconditional"]["accepted"] for steps, cells in results.items()}
    print(f"tiny run {args.run_dir}, {args.num_samples} samples per cell, seed {args.seed}\n")
    header = "".join(f"{f'{s} steps':>28}" for s in results)
    print(f"{'':<28}{header}")
    for name in results[str(args.steps[0])]:
        line = f"{name:<28}"
        for steps, cells in results.items():
            cell = cells[name]
            text = f"{100 * cell['accepted']:.1f} %"
            if "known_kept" in cell:
                rel = cell["accepted"] / base[steps] if base[steps] else float("nan")
                text += f" ({100 * rel:.0f} %, kept {100 * cell['known_kept']:.0f} %)"
            line += f"{text:>28}"
        print(line)
    print("\naccepted share (relative to unconditional, share of rows with known tokens kept)")
    for name, cell in results[str(args.steps[-1])].items():
        print(f"  {name}: {cell['examples'][:2]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
