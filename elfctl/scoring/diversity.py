"""Degeneration and diversity metrics of a set of samples: distinct-n, rep-n, self-BLEU, entropy.

A pure library: it never prints. Definitions (n = 1..4 unless stated):

* distinct-n (Li et al. 2016): over the whole file, the number of different n-grams divided
  by the number of n-grams. 1.0 means no n-gram occurs twice anywhere; low values mean the
  samples repeat themselves or each other.
* rep-n (Welleck et al. 2019, "seq-rep-n"): per sample, the share of its n-grams that repeat
  an earlier n-gram of the same sample, 1 - distinct n-grams / n-grams; the mean over samples
  with at least n tokens. 0.0 means no sample repeats itself.
* self-BLEU (Zhu et al. 2018): sentence BLEU of each sample of a fixed seeded subsample
  against all the other samples of that subsample as references, averaged (x 100). High
  values mean the samples resemble one another. Computed with sacreBLEU's tokenizer, n-gram
  counts and BLEU formula (its sentence-BLEU defaults: 13a, exp smoothing, effective order).
* entropy: the mean per-sample unigram entropy (natural log), exactly `scoring.mean_entropy`,
  so with the GPT-2 tokenizer it equals the entropy `score-ppl` reports.

distinct-n, rep-n and entropy are computed on token ids: those of the scorer's tokenizer
(GPT-2 Large by default, like the paper's entropy) or whitespace-separated words. Empty
samples are skipped and counted.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from elfctl.errors import UserError
from elfctl.model.encoder import load_pretrained
from elfctl.scoring.metrics import DEFAULT_MAX_LENGTH, mean_entropy, tokenize_for_scoring

ORDERS = (1, 2, 3, 4)
DEFAULT_SELF_BLEU_SAMPLES = 1000
SELF_BLEU_SEED = 0
WORDS = "words"  # the --tokenizer value for whitespace-separated words


@dataclass
class DiversityResult:
    distinct: dict[str, float]  # "1".."4" -> distinct-n over the file
    rep: dict[str, float]  # "1".."4" -> mean rep-n over samples with >= n tokens
    self_bleu: float  # mean sentence BLEU x 100 over the subsample; nan if < 2 samples
    self_bleu_samples: int  # the subsample's size
    entropy: float  # mean per-sample unigram entropy (nats)
    n_samples: int  # non-empty samples
    n_empty: int
    n_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        # Flat keys too, so tables and eval rows can name one number ("distinct_4").
        for n in ORDERS:
            values[f"distinct_{n}"] = self.distinct[str(n)]
            values[f"rep_{n}"] = self.rep[str(n)]
        return values


# ----------------------------------------------------------------------------- n-grams


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """The n-grams of one sample, in order (none if it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """Different n-grams / n-grams over all samples (nan if no sample has n tokens)."""
    total, seen = 0, set()
    for tokens in samples:
        grams = ngrams(tokens, n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def rep_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """Mean over samples with at least n tokens of 1 - distinct n-grams / n-grams."""
    shares = []
    for tokens in samples:
        grams = ngrams(tokens, n)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else math.nan


# ----------------------------------------------------------------------------- self-BLEU


def self_bleu_subsample(texts: Sequence[str], size: int, seed: int) -> list[str]:
    """A fixed subsample: the same texts, seed and size always give the same rows (in file
    order); all of them when there are no more than `size`."""
    if size < 2:
        raise UserError(f"self-BLEU needs a subsample of at least 2 samples, got {size}.")
    if len(texts) <= size:
        return list(texts)
    chosen = sorted(random.Random(seed).sample(range(len(texts)), size))
    return [texts[i] for i in chosen]


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (x 100) of each text against all the others as references.

    Equal to averaging `sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i+1:])`, but
    each text's n-grams are counted once: the reference count sacreBLEU clips with is the
    highest count among the other texts, read off the two highest counts of each n-gram.
    """
    from sacrebleu.metrics import BLEU

    if len(texts) < 2:
        return math.nan
    bleu = BLEU(effective_order=True)  # sacrebleu.sentence_bleu's settings
    order = bleu.max_ngram_order
    counts, lengths = [], []
    for text in texts:
        grams, length = _ngram_counts(bleu._preprocess_segment(text), order)
        counts.append(grams)
        lengths.append(length)

    # For each n-gram: (highest count, the text holding it, second-highest count).
    best: dict[tuple, list] = {}
    for i, grams in enumerate(counts):
        for gram, count in grams.items():
            top = best.setdefault(gram, [0, -1, 0])
            if count > top[0]:
                top[0], top[1], top[2] = count, i, top[0]
            elif count > top[2]:
                top[2] = count

    scores = []
    for i, grams in enumerate(counts):
        correct, total = [0] * order, [0] * order
        for gram, count in grams.items():
            top = best[gram]
            ref_count = top[2] if top[1] == i else top[0]
            total[len(gram) - 1] += count
            correct[len(gram) - 1] += min(count, ref_count)
        others = lengths[:i] + lengths[i + 1 :]
        stats = [lengths[i], bleu._get_closest_ref_len(lengths[i], others), *correct, *total]
        scores.append(bleu._compute_score_from_stats(stats).score)
    return sum(scores) / len(scores)


def _ngram_counts(tokenized: str, order: int) -> tuple[Counter, int]:
    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    return extract_all_word_ngrams(tokenized, 1, order)


# ----------------------------------------------------------------------------- all together


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH):
    """Token ids per text with the scorer's tokenizer (truncated as score-ppl truncates),
    or words when `tokenizer` is None."""
    if tokenizer is None:
        return [text.split() for text in texts]
    return tokenize_for_scoring(texts, tokenizer, max_length)


def score_diversity(
    texts: Sequence[str],
    tokenizer: Any = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    self_bleu_samples: int = DEFAULT_SELF_BLEU_SAMPLES,
    seed: int = SELF_BLEU_SEED,
) -> DiversityResult:
    """Every metric of this module for one file's texts (tokenizer None: words)."""
    start = time.perf_counter()
    tokens = tokenize(texts, tokenizer, max_length)
    kept = [(text, ids) for text, ids in zip(texts, tokens, strict=True) if len(ids) > 0]
    if not kept:
        raise UserError("there is nothing to score: every sample is empty.")
    samples = [ids for _, ids in kept]
    subsample = self_bleu_subsample([text for text, _ in kept], self_bleu_samples, seed)
    return DiversityResult(
        distinct={str(n): distinct_n(samples, n) for n in ORDERS},
        rep={str(n): rep_n(samples, n) for n in ORDERS},
        self_bleu=self_bleu(subsample),
        self_bleu_samples=len(subsample),
        entropy=mean_entropy(samples),
        n_samples=len(samples),
        n_empty=len(texts) - len(samples),
        n_tokens=sum(len(ids) for ids in samples),
        seconds=time.perf_counter() - start,
    )


def load_tokenizer(name_or_path: str) -> Any:
    """The scorer's tokenizer (hub id or local folder), or None for `words`."""
    if name_or_path == WORDS:
        return None
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "the tokenizer")
