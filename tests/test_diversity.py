"""distinct-n, rep-n, self-BLEU and entropy against hand-computed values and slow references."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import sacrebleu

from elfctl.errors import UserError
from elfctl.scoring import diversity
from elfctl.scoring import metrics as scoring
from tests.gpt2_fixture import build_tiny_gpt2

# Words of two samples: "a b a b" and "a c".
SAMPLES = [["a", "b", "a", "b"], ["a", "c"]]


def test_distinct_n_is_different_ngrams_over_all_ngrams_of_the_file():
    # unigrams a b a b a c: 3 of 6; bigrams ab ba ab ac: 3 of 4; trigrams aba bab: 2 of 2.
    assert diversity.distinct_n(SAMPLES, 1) == pytest.approx(3 / 6)
    assert diversity.distinct_n(SAMPLES, 2) == pytest.approx(3 / 4)
    assert diversity.distinct_n(SAMPLES, 3) == pytest.approx(1.0)
    assert diversity.distinct_n(SAMPLES, 4) == pytest.approx(1.0)
    assert math.isnan(diversity.distinct_n(SAMPLES, 5))  # no sample has 5 tokens


def test_distinct_n_counts_ngrams_repeated_across_samples():
    # Two copies of one sample: every n-gram occurs twice.
    assert diversity.distinct_n([["x", "y", "z"], ["x", "y", "z"]], 2) == pytest.approx(2 / 4)


def test_rep_n_is_the_share_of_repeated_ngrams_within_a_sample_averaged():
    # rep-1: "a b a b" repeats 2 of 4 unigrams, "a c" none -> (0.5 + 0) / 2.
    assert diversity.rep_n(SAMPLES, 1) == pytest.approx(0.25)
    # rep-2: ab ba ab repeats 1 of 3; "a c" has one bigram, no repeat -> (1/3 + 0) / 2.
    assert diversity.rep_n(SAMPLES, 2) == pytest.approx(1 / 6)
    # rep-3: only the first sample has trigrams (aba, bab), none repeated.
    assert diversity.rep_n(SAMPLES, 3) == pytest.approx(0.0)
    # Repetition across samples is not rep-n's business.
    assert diversity.rep_n([["x", "y"], ["x", "y"]], 1) == 0.0


def test_self_bleu_of_two_texts_is_their_hand_computed_sentence_bleu():
    # "a b c d" vs "a b c e": precisions 3/4, 2/3, 1/2 and 0/1 for 4-grams, which sacreBLEU's
    # exp smoothing turns into 1 / (2 * 1); equal lengths, so no brevity penalty.
    expected = (75.0 * (200 / 3) * 50.0 * 50.0) ** 0.25  # 59.46
    assert diversity.self_bleu(["a b c d", "a b c e"]) == pytest.approx(expected, rel=1e-12)
    assert diversity.self_bleu(["a b c d", "a b c d"]) == pytest.approx(100.0)
    assert diversity.self_bleu(["a b c d", "e f g h"]) == 0.0
    assert math.isnan(diversity.self_bleu(["only one"]))


def test_self_bleu_equals_averaging_sacrebleu_sentence_bleu_against_all_other_texts():
    rng = random.Random(0)
    words = "the a cat dog sat on mat ran . , big".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(40)]
    texts += ["", "The Cat sat.", "the cat sat on the mat . the cat sat"]
    slow = statistics.mean(
        sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)
    )
    assert diversity.self_bleu(texts) == pytest.approx(slow, rel=1e-12)


def test_the_self_bleu_subsample_is_fixed_by_its_seed():
    texts = [f"text {i}" for i in range(50)]
    first = diversity.self_bleu_subsample(texts, 10, seed=3)
    assert first == diversity.self_bleu_subsample(texts, 10, seed=3)
    assert first != diversity.self_bleu_subsample(texts, 10, seed=4)
    assert len(first) == 10 and first == sorted(first, key=texts.index)  # file order
    assert diversity.self_bleu_subsample(texts[:5], 10, seed=3) == texts[:5]
    with pytest.raises(UserError, match="at least 2"):
        diversity.self_bleu_subsample(texts, 1, seed=0)


def test_score_diversity_on_words_combines_the_metrics_and_skips_empty_samples():
    texts = ["a b a b", "", "a c"]
    result = diversity.score_diversity(texts, None, self_bleu_samples=10)
    assert (result.n_samples, result.n_empty, result.n_tokens) == (2, 1, 6)
    assert result.distinct["2"] == pytest.approx(3 / 4) and result.rep["1"] == pytest.approx(0.25)
    assert result.self_bleu == pytest.approx(diversity.self_bleu(["a b a b", "a c"]))
    # mean of the per-sample unigram entropies: ln 2 (a, b equally often) and ln 2 (a, c).
    assert result.entropy == pytest.approx(math.log(2))
    values = result.to_dict()
    assert values["distinct_2"] == values["distinct"]["2"] and values["rep_1"] == 0.25
    with pytest.raises(UserError, match="every sample is empty"):
        diversity.score_diversity(["", ""], None)


def test_entropy_with_the_gpt2_tokenizer_is_score_ppls_entropy(tmp_path):
    folder = build_tiny_gpt2(tmp_path / "gpt2")
    model, tokenizer = scoring.load_scorer(str(folder))
    texts = ["the cat sat on the mat .", "a dog ran", "", "numbers like 12 , 345 appear"]
    ppl = scoring.score_ppl(texts, model, tokenizer)
    result = diversity.score_diversity(texts, diversity.load_tokenizer(str(folder)))
    assert result.entropy == pytest.approx(ppl.entropy, rel=1e-12)
    assert result.n_samples == ppl.n_samples and result.n_empty == ppl.n_empty
    ids = scoring.tokenize_for_scoring([t for t in texts if t], tokenizer)
    assert result.distinct["1"] == pytest.approx(diversity.distinct_n(ids, 1))
