"""Graded measures of sample quality on the test-bed language, and their baselines.

Acceptance ("is the text exactly one sentence of the grammar") is the headline number, but
it is all-or-nothing; the graded measures beside it show progress before acceptance does and
catch the ways a model can look good while being bad (repeating itself, copying training text).

All texts are compared word by word: words are whitespace-separated tokens, so
"the dog  runs ." and "the dog runs ." are the same text.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence

from elfctl.testbed.grammar import END, SOURCE, Grammar, generate_corpus

MIN_COPY_WORDS = 7


def normalise(text: str) -> str:
    return " ".join(text.split())


def sentences_of(words: Sequence[str]) -> list[list[str]]:
    """Split words after each full stop; trailing words without one form a last sentence."""
    sentences, current = [], []
    for word in words:
        current.append(word)
        if word == END:
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def unigram_entropy(texts: Iterable[str]) -> float:
    """Entropy (nats) of the word distribution pooled over all texts; 0.0 when there are none."""
    counts = Counter(word for text in texts for word in text.split())
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log(c / total) for c in counts.values())


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def evaluate_samples(
    samples: list[str],
    training_texts: set[str] | list[str],
    *,
    grammar: Grammar = SOURCE,
    min_copy_words: int = MIN_COPY_WORDS,
) -> dict:
    """Every graded measure of a list of samples against the training texts.

    Returns a dict:
      n                     number of samples
      accepted              share of samples that are exactly one sentence of the grammar
      sentence_acceptance   share of sentences (text split after each ".") the grammar accepts
      bigram_validity       share of adjacent word pairs, pooled over samples, whose word
                            classes the grammar allows next to each other (unknown words and
                            pairs across a "." never are); 0.0 when there are no pairs
      entropy               unigram entropy (nats) of the samples' words, pooled
      data_entropy          the same for the training texts (duplicates counted when a list)
      mean_words            mean words per sample (the full stop included)
      data_mean_words       the same for the training texts
      duplicate_share       share of samples equal to an earlier sample
      novel_accepted_share  share of accepted samples not in the training texts
      accepted_novel        share of all samples that are accepted and not in the training texts
      long_samples          samples with at least `min_copy_words` words before the full stop
      long_copy_share       share of those long samples found verbatim in the training texts
    """
    training_list = [normalise(t) for t in training_texts]
    training_set = set(training_list)
    texts = [normalise(s) for s in samples]
    allowed = grammar.allowed_bigrams()

    accepted = [grammar.accepts(t) for t in texts]
    n_sentences = n_sentences_ok = n_pairs = n_pairs_ok = 0
    for text in texts:
        words = text.split()
        for sentence in sentences_of(words):
            n_sentences += 1
            n_sentences_ok += grammar.accepts(" ".join(sentence))
        classes = [grammar.class_of.get(w) for w in words]
        for left, right in itertools.pairwise(classes):
            n_pairs += 1
            n_pairs_ok += (left, right) in allowed

    n_accepted = sum(accepted)
    n_accepted_novel = sum(
        ok and t not in training_set for ok, t in zip(accepted, texts, strict=True)
    )
    long_texts = [t for t in texts if sum(w != END for w in t.split()) >= min_copy_words]

    return {
        "n": len(texts),
        "accepted": _share(n_accepted, len(texts)),
        "sentence_acceptance": _share(n_sentences_ok, n_sentences),
        "bigram_validity": _share(n_pairs_ok, n_pairs),
        "entropy": unigram_entropy(texts),
        "data_entropy": unigram_entropy(training_list),
        "mean_words": _share(sum(len(t.split()) for t in texts), len(texts)),
        "data_mean_words": _share(sum(len(t.split()) for t in training_list), len(training_list)),
        "duplicate_share": _share(len(texts) - len(set(texts)), len(texts)),
        "novel_accepted_share": _share(n_accepted_novel, n_accepted),
        "accepted_novel": _share(n_accepted_novel, len(texts)),
        "long_samples": len(long_texts),
        "long_copy_share": _share(sum(t in training_set for t in long_texts), len(long_texts)),
    }


def shuffled_samples(n: int, seed: int) -> list[str]:
    """Real sentences from the generator with their words (full stop included) shuffled."""
    rng = random.Random(seed)
    texts = []
    for sentence in generate_corpus(n, seed):
        words = sentence.split()
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


def random_word_samples(n: int, seed: int, grammar: Grammar = SOURCE) -> list[str]:
    """Uniformly random words of the vocabulary, with the lengths of real sentences."""
    rng = random.Random(seed)
    vocabulary = grammar.vocabulary
    lengths = [len(s.split()) for s in generate_corpus(n, seed)]
    return [" ".join(rng.choice(vocabulary) for _ in range(k)) for k in lengths]


def baseline_measures(
    training_texts: set[str] | list[str], n: int = 256, seed: int = 12345
) -> dict[str, dict]:
    """The measures of `evaluate_samples` for the reference points a model sits between.

    generator: fresh sentences from the grammar (the ceiling, and the copy rate expected by
    chance); shuffled: real sentences with their words shuffled; random: random words.
    """
    return {
        "generator": evaluate_samples(generate_corpus(n, seed), training_texts),
        "shuffled": evaluate_samples(shuffled_samples(n, seed), training_texts),
        "random": evaluate_samples(random_word_samples(n, seed), training_texts),
    }
