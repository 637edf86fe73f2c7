"""A small synthetic language: a probabilistic grammar, a seeded generator, an exact recognizer.

The language is sized to be learnable by the `tiny` preset (H128, depth 4) in a few CPU
minutes (docs/testbed.md): 27 words in 7 word classes plus the full stop, one sentence per text,
3-8 words and a final "." (4-9 tokens). It is still a real grammar: noun phrases with an
optional adjective, intransitive verbs with an optional adverb or prepositional phrase,
transitive verbs with an object and an optional adverb.

    S  -> NP VP END
    NP -> DET NOUN | DET ADJ NOUN
    VP -> IVERB | IVERB ADV | IVERB PP | TVERB NP | TVERB NP ADV
    PP -> PREP NP

Every word belongs to exactly one class, so each sentence has exactly one parse. Sample
quality is then measurable exactly: a text is good when `accepts(text)` is true.

A `Grammar` is plain data (rules with probabilities + a lexicon); `translate.py` builds the
target side of the synthetic translation task as a second `Grammar` from the same rules.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

END = "."

# Word classes of the source language, in a fixed order (the tokenizer's vocabulary follows it).
WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "DET": ("the", "this", "that", "every"),
    "ADJ": ("big", "small", "red", "old", "quiet"),
    "NOUN": ("dog", "cat", "bird", "fox", "child", "farmer"),
    "IVERB": ("sleeps", "runs", "sings"),
    "TVERB": ("sees", "likes", "follows", "chases"),
    "ADV": ("quickly", "often"),
    "PREP": ("near", "under", "behind"),
    "END": (END,),
}

# Nonterminal -> alternatives (probability, right-hand side). Terminals are word classes.
RULES: dict[str, tuple[tuple[float, tuple[str, ...]], ...]] = {
    "S": ((1.0, ("NP", "VP", "END")),),
    "NP": ((0.6, ("DET", "NOUN")), (0.4, ("DET", "ADJ", "NOUN"))),
    "VP": (
        (0.15, ("IVERB",)),
        (0.15, ("IVERB", "ADV")),
        (0.2, ("IVERB", "PP")),
        (0.3, ("TVERB", "NP")),
        (0.2, ("TVERB", "NP", "ADV")),
    ),
    "PP": ((1.0, ("PREP", "NP")),),
}

# A parse tree: (nonterminal, right-hand side used, children) or a leaf (word class, word).
Tree = tuple


@dataclass(frozen=True)
class Grammar:
    """A non-recursive probabilistic context-free grammar over word classes."""

    rules: Mapping[str, tuple[tuple[float, tuple[str, ...]], ...]]
    lexicon: Mapping[str, tuple[str, ...]]
    start: str = "S"
    class_of: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        class_of: dict[str, str] = {}
        for word_class, words in self.lexicon.items():
            for word in words:
                if word in class_of:
                    raise ValueError(f"word {word!r} is in two classes; parses must be unique")
                class_of[word] = word_class
        for symbol, alternatives in self.rules.items():
            if abs(sum(p for p, _ in alternatives) - 1.0) > 1e-9:
                raise ValueError(f"probabilities of {symbol!r} do not sum to 1")
        object.__setattr__(self, "class_of", class_of)

    @property
    def vocabulary(self) -> list[str]:
        """Every word, in lexicon order (the full stop included)."""
        return [word for words in self.lexicon.values() for word in words]

    # --- generation -------------------------------------------------------------------------

    def generate_tree(self, rng: random.Random, symbol: str | None = None) -> Tree:
        symbol = symbol or self.start
        if symbol in self.lexicon:
            return (symbol, rng.choice(self.lexicon[symbol]))
        draw = rng.random()
        alternatives = self.rules[symbol]
        rhs = alternatives[-1][1]  # guards against rounding when draw is close to 1
        for probability, candidate in alternatives:
            if draw < probability:
                rhs = candidate
                break
            draw -= probability
        return (symbol, rhs, tuple(self.generate_tree(rng, child) for child in rhs))

    def generate_sentence(self, rng: random.Random) -> str:
        return " ".join(leaves(self.generate_tree(rng)))

    # --- recognition ------------------------------------------------------------------------

    def _parses(self, symbol: str, words: Sequence[str], i: int) -> Iterator[tuple[Tree, int]]:
        """Every way `symbol` can cover words[i:j]; yields (tree, j). Plain backtracking."""
        if symbol in self.lexicon:
            if i < len(words) and self.class_of.get(words[i]) == symbol:
                yield (symbol, words[i]), i + 1
            return
        for _, rhs in self.rules[symbol]:
            for children, j in self._sequence_parses(rhs, words, i):
                yield (symbol, rhs, children), j

    def _sequence_parses(
        self, symbols: tuple[str, ...], words: Sequence[str], i: int
    ) -> Iterator[tuple[tuple[Tree, ...], int]]:
        if not symbols:
            yield (), i
            return
        for first, j in self._parses(symbols[0], words, i):
            for rest, k in self._sequence_parses(symbols[1:], words, j):
                yield (first, *rest), k

    def parse(self, text: str) -> Tree | None:
        """The parse tree of a text that is exactly one sentence, else None.

        Words are separated by any whitespace; everything else must match exactly.
        """
        words = text.split()
        for tree, end in self._parses(self.start, words, 0):
            if end == len(words):
                return tree
        return None

    def accepts(self, text: str) -> bool:
        return self.parse(text) is not None

    # --- structure --------------------------------------------------------------------------

    def shapes(self, symbol: str | None = None) -> list[tuple[str, ...]]:
        """Every word-class sequence the symbol derives (finite: the grammar is not recursive)."""
        symbol = symbol or self.start
        if symbol in self.lexicon:
            return [(symbol,)]
        result = []
        for _, rhs in self.rules[symbol]:
            for parts in itertools.product(*(self.shapes(child) for child in rhs)):
                result.append(tuple(c for part in parts for c in part))
        return result

    def allowed_bigrams(self) -> frozenset[tuple[str, str]]:
        """Adjacent word-class pairs that occur in some sentence of the language."""
        return frozenset(pair for shape in self.shapes() for pair in itertools.pairwise(shape))

    def count_sentences(self) -> int:
        """How many distinct sentences the language has (shapes are disjoint: parses are unique)."""
        return sum(math.prod(len(self.lexicon[c]) for c in shape) for shape in self.shapes())

    def shape_probabilities(self, symbol: str | None = None) -> dict[tuple[str, ...], float]:
        """The generator's probability of each word-class sequence."""
        symbol = symbol or self.start
        if symbol in self.lexicon:
            return {(symbol,): 1.0}
        result: dict[tuple[str, ...], float] = {}
        for probability, rhs in self.rules[symbol]:
            tables = [self.shape_probabilities(child).items() for child in rhs]
            for parts in itertools.product(*tables):
                shape = tuple(c for part, _ in parts for c in part)
                p = probability * math.prod(q for _, q in parts)
                result[shape] = result.get(shape, 0.0) + p
        return result


def leaves(tree: Tree) -> list[str]:
    """The words of a parse tree, left to right."""
    if len(tree) == 2:
        return [tree[1]]
    return [word for child in tree[2] for word in leaves(child)]


SOURCE = Grammar(RULES, WORD_CLASSES)
VOCABULARY: list[str] = SOURCE.vocabulary


def word_class(word: str) -> str | None:
    """The class of a word of the language, or None for a word outside it."""
    return SOURCE.class_of.get(word)


def generate_sentence(rng: random.Random) -> str:
    """One sentence drawn from the grammar, e.g. "the old fox sleeps near this dog ."."""
    return SOURCE.generate_sentence(rng)


def generate_corpus(n: int, seed: int) -> list[str]:
    """n sentences from a generator seeded with `seed` (same seed, same list, every run)."""
    rng = random.Random(seed)
    return [SOURCE.generate_sentence(rng) for _ in range(n)]


def accepts(text: str) -> bool:
    """True when the whole text is exactly one sentence of the language."""
    return SOURCE.accepts(text)


def parse(text: str) -> Tree | None:
    return SOURCE.parse(text)


def allowed_bigrams() -> frozenset[tuple[str, str]]:
    return SOURCE.allowed_bigrams()


def count_sentences() -> int:
    return SOURCE.count_sentences()
