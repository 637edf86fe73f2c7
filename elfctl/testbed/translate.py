"""A synthetic translation task on the test-bed language, with exact references.

Each source word maps to one made-up target word (a bijection; the full stop stays), and the
target language reorders the parse tree:

* adjectives follow the noun:            DET ADJ NOUN  -> DET' NOUN' ADJ'
* prepositions become postpositions:     PREP NP       -> NP' PREP'
* the verb goes last (verb-final):       TVERB NP ADV  -> NP' ADV' TVERB'
                                         IVERB PP      -> PP' IVERB'

    "the big dog chases this cat quickly ."  ->  "lo kanu grano ita mipo rapi kasa ."

Translation keeps the number of words, so source and target are both 4-9 tokens: a
`max_input_length` of 16 and a `max_length` of 32 hold any pair. The target side is itself
a `Grammar` (the source rules, reordered, over the target lexicon), so target texts have an
exact recognizer too.
"""

from __future__ import annotations

import random

from elfctl.testbed.grammar import END, RULES, SOURCE, WORD_CLASSES, Grammar, Tree, leaves

# Source word -> target word, class by class (the tokenizer's vocabulary follows this order).
TARGET_WORD: dict[str, str] = {
    # DET
    "the": "lo",
    "this": "ita",
    "that": "eso",
    "every": "oku",
    # ADJ
    "big": "grano",
    "small": "piko",
    "red": "rossa",
    "old": "veku",
    "quiet": "tasi",
    # NOUN
    "dog": "kanu",
    "cat": "mipo",
    "bird": "avi",
    "fox": "rena",
    "child": "bimo",
    "farmer": "agro",
    # IVERB
    "sleeps": "dormi",
    "runs": "kuri",
    "sings": "kanta",
    # TVERB
    "sees": "vida",
    "likes": "ama",
    "follows": "sega",
    "chases": "kasa",
    # ADV
    "quickly": "rapi",
    "often": "sovi",
    # PREP
    "near": "ape",
    "under": "suba",
    "behind": "dopo",
    # END
    END: END,
}

# (nonterminal, source right-hand side) -> target order of its children. Missing = unchanged.
REORDER: dict[tuple[str, tuple[str, ...]], tuple[int, ...]] = {
    ("NP", ("DET", "ADJ", "NOUN")): (0, 2, 1),
    ("PP", ("PREP", "NP")): (1, 0),
    ("VP", ("IVERB", "ADV")): (1, 0),
    ("VP", ("IVERB", "PP")): (1, 0),
    ("VP", ("TVERB", "NP")): (1, 0),
    ("VP", ("TVERB", "NP", "ADV")): (1, 2, 0),
}


def _reordered(symbol: str, rhs: tuple[str, ...]) -> tuple[str, ...]:
    order = REORDER.get((symbol, rhs), tuple(range(len(rhs))))
    return tuple(rhs[k] for k in order)


TARGET = Grammar(
    rules={
        symbol: tuple((p, _reordered(symbol, rhs)) for p, rhs in alternatives)
        for symbol, alternatives in RULES.items()
    },
    lexicon={c: tuple(TARGET_WORD[w] for w in words) for c, words in WORD_CLASSES.items()},
)
TARGET_VOCABULARY: list[str] = TARGET.vocabulary


def translate_tree(tree: Tree) -> Tree:
    """The target parse tree of a source parse tree: words mapped, children reordered."""
    if len(tree) == 2:
        word_class, word = tree
        return (word_class, TARGET_WORD[word])
    symbol, rhs, children = tree
    order = REORDER.get((symbol, rhs), tuple(range(len(rhs))))
    return (
        symbol,
        tuple(rhs[k] for k in order),
        tuple(translate_tree(children[k]) for k in order),
    )


def translate(src: str) -> str:
    """The reference translation of one source sentence; ValueError if it is not one."""
    tree = SOURCE.parse(src)
    if tree is None:
        raise ValueError(f"not a sentence of the test-bed language: {src!r}")
    return " ".join(leaves(translate_tree(tree)))


def target_accepts(text: str) -> bool:
    """True when the whole text is exactly one sentence of the target language."""
    return TARGET.accepts(text)


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n (source, reference) pairs from the grammar's generator seeded with `seed`."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        tree = SOURCE.generate_tree(rng)
        pairs.append((" ".join(leaves(tree)), " ".join(leaves(translate_tree(tree)))))
    return pairs
