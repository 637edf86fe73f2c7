"""The test bed's grammar-trained GPT-2 scorer: loads like a hub scorer and knows the language."""

from __future__ import annotations

from elfctl.scoring import metrics as scoring
from elfctl.testbed.grammar import generate_corpus
from elfctl.testbed.quality import shuffled_samples
from elfctl.testbed.scorer import train_scorer


def test_a_briefly_trained_scorer_prefers_grammatical_text_to_shuffled_words(tmp_path):
    folder = train_scorer(tmp_path / "scorer", generate_corpus(400, seed=0), steps=40)
    model, tokenizer = scoring.load_scorer(str(folder))  # the same path as a hub id
    grammatical = scoring.score_ppl(generate_corpus(64, seed=9), model, tokenizer)
    shuffled = scoring.score_ppl(shuffled_samples(64, seed=9), model, tokenizer)
    assert grammatical.n_empty == shuffled.n_empty == 0
    assert grammatical.ppl * 2 < shuffled.ppl
    # score-ppl's default truncation (1024 tokens) fits the scorer's positions.
    assert model.config.n_positions >= scoring.DEFAULT_MAX_LENGTH
