"""Self-BLEU: elfctl's one-pass computation against the plain sacreBLEU loop, side by side.

The plain way calls `sacrebleu.sentence_bleu(text, all other texts)` for each text, so
every text's n-grams are counted again for every other text (quadratic). elfctl counts
each text once and clips with each n-gram's two highest counts. Both give the same score
(checked here and in tests/test_diversity.py); this prints their times and the ratio.

    .venv/bin/python bench/self_bleu_speed.py                       # 100 texts of 200 words
    .venv/bin/python bench/self_bleu_speed.py --texts 200 --words 500
"""

from __future__ import annotations

import argparse
import random
import time

import sacrebleu

from elfctl.scoring import self_bleu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--words", type=int, default=200, help="Words per text.")
    parser.add_argument("--vocabulary", type=int, default=2000)
    args = parser.parse_args()

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(args.vocabulary)]
    # Zipf-like word frequencies, so texts share n-grams as real text does.
    weights = [1 / (rank + 1) for rank in range(args.vocabulary)]
    texts = [" ".join(rng.choices(vocabulary, weights, k=args.words)) for _ in range(args.texts)]

    start = time.perf_counter()
    fast = self_bleu(texts)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = sum(
        sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)
    ) / len(texts)
    plain_s = time.perf_counter() - start

    print(f"{args.texts} texts of {args.words} words")
    print(f"elfctl self_bleu       {fast:.6f}  {fast_s:8.3f} s")
    print(f"sacrebleu loop         {plain:.6f}  {plain_s:8.3f} s")
    print(f"same score: {abs(fast - plain) < 1e-9}; elfctl is {plain_s / fast_s:.1f}x faster")


if __name__ == "__main__":
    main()
