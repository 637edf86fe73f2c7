"""Metrics of docs/method.md section 6, each against a slow, obviously-correct computation."""

from __future__ import annotations

import math

import pytest

from elfctl.errors import UserError
from elfctl.scoring import metrics as scoring
from tests.gpt2_fixture import build_tiny_gpt2

TEXTS = [
    "the cat sat on the mat .",
    "a dog ran",
    "",  # empty: skipped and counted
    "numbers like 12 , 345 and 6789 appear here too ! and then the quick brown fox",
    "x",  # one token: scored tokens 0, but a sample
    'She said: "hello, world" and left the room quietly. The dog ran after the ball.',
    "Die Katze sitzt auf der Matte .",
    "the quick brown fox jumps over the lazy dog the quick brown fox jumps over it",
    "zebra ü 世界",
]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    folder = build_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))
    return scoring.load_scorer(str(folder))


def slow_reference_ppl(texts, model, tokenizer, max_length):
    """One sample at a time through the model's own `labels=` loss (a mean over L - 1
    tokens), times the token count, summed over the corpus."""
    import torch

    nll_sum, n_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            mean_loss = model(input_ids=input_ids, labels=input_ids).loss
        nll_sum += float(mean_loss) * (len(ids) - 1)
        n_tokens += len(ids) - 1
    return math.exp(nll_sum / n_tokens), nll_sum, n_tokens


@pytest.mark.parametrize("max_length", [64, 12])  # 12 truncates most samples
def test_gen_ppl_equals_slow_per_sample_reference(scorer, max_length):
    model, tokenizer = scorer
    result = scoring.score_ppl(TEXTS, model, tokenizer, batch_size=4, max_length=max_length)
    ppl, nll_sum, n_tokens = slow_reference_ppl(TEXTS, model, tokenizer, max_length)
    assert result.n_tokens == n_tokens
    # fp32 rounding only: the batched and the one-at-a-time forward agree to ~1e-7.
    assert result.nll_sum == pytest.approx(nll_sum, rel=1e-6)
    assert result.ppl == pytest.approx(ppl, rel=1e-6)
    assert result.n_samples == len(TEXTS) - 1
    assert result.n_empty == 1


def test_truncation_changes_the_result(scorer):
    model, tokenizer = scorer
    full = scoring.score_ppl(TEXTS, model, tokenizer, max_length=64)
    truncated = scoring.score_ppl(TEXTS, model, tokenizer, max_length=12)
    assert truncated.n_tokens < full.n_tokens
    assert all(len(ids) <= 12 for ids in scoring.tokenize_for_scoring(TEXTS, tokenizer, 12))


def test_gen_ppl_does_not_depend_on_batch_size(scorer):
    model, tokenizer = scorer
    results = [
        scoring.score_ppl(TEXTS, model, tokenizer, batch_size=b, max_length=64) for b in (1, 3, 16)
    ]
    for result in results[1:]:
        assert result.n_tokens == results[0].n_tokens
        assert result.ppl == pytest.approx(results[0].ppl, rel=1e-6)
        assert result.entropy == results[0].entropy


def test_a_samples_nll_does_not_depend_on_its_batch_mates(scorer):
    model, tokenizer = scorer
    ids = scoring.tokenize_for_scoring(TEXTS, tokenizer, 64)
    short = ids[1]
    alone = scoring.sample_nll([short], model, tokenizer.pad_token_id)[0]
    with_longer = scoring.sample_nll([ids[5], short], model, tokenizer.pad_token_id)[1]
    assert with_longer[1] == alone[1] == len(short) - 1
    assert with_longer[0] == pytest.approx(alone[0], rel=1e-6)


def test_gen_ppl_is_token_weighted_not_a_mean_of_sample_ppls(scorer):
    model, tokenizer = scorer
    texts = ["a dog ran", TEXTS[7]]
    parts = [scoring.score_ppl([t], model, tokenizer) for t in texts]
    corpus = scoring.score_ppl(texts, model, tokenizer)
    weighted = math.exp(sum(p.nll_sum for p in parts) / sum(p.n_tokens for p in parts))
    assert corpus.ppl == pytest.approx(weighted, rel=1e-6)
    assert corpus.ppl != pytest.approx(sum(p.ppl for p in parts) / 2, rel=1e-3)


def test_combined_result_equals_scoring_the_concatenation(scorer):
    model, tokenizer = scorer
    first = scoring.score_ppl(TEXTS[:4], model, tokenizer)
    second = scoring.score_ppl(TEXTS[4:], model, tokenizer)
    combined = scoring.combine_ppl([first, second])
    together = scoring.score_ppl(TEXTS, model, tokenizer)
    assert combined.ppl == pytest.approx(together.ppl, rel=1e-6)
    assert combined.entropy == pytest.approx(together.entropy, rel=1e-12)
    assert (combined.n_samples, combined.n_empty, combined.n_tokens) == (
        together.n_samples,
        together.n_empty,
        together.n_tokens,
    )


def test_progress_callback_reports_every_batch(scorer):
    model, tokenizer = scorer
    calls = []
    scoring.score_ppl(TEXTS, model, tokenizer, batch_size=3, on_batch=lambda *a: calls.append(a))
    assert calls == [(3, 8), (6, 8), (8, 8)]


def test_only_empty_samples_give_nan(scorer):
    model, tokenizer = scorer
    result = scoring.score_ppl(["", ""], model, tokenizer)
    assert math.isnan(result.ppl) and math.isnan(result.entropy)
    assert (result.n_samples, result.n_empty) == (0, 2)


def test_max_length_beyond_the_scorer_positions_is_a_user_error(scorer):
    model, tokenizer = scorer
    with pytest.raises(UserError, match="exceeds the scorer.s 1024 positions"):
        scoring.score_ppl(TEXTS, model, tokenizer, max_length=2048)


def test_scorer_pads_with_eos(scorer):
    _, tokenizer = scorer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_unknown_scorer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Could not load the scorer model"):
        scoring.load_scorer(str(tmp_path / "no-such-model"))


# ----------------------------------------------------------------------------- entropy


def test_unigram_entropy_hand_computed():
    # p = (1/2, 1/4, 1/4): H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert scoring.unigram_entropy([1, 1, 2, 3]) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert scoring.unigram_entropy([7, 7, 7]) == 0.0
    assert scoring.unigram_entropy([4, 5, 6, 7]) == pytest.approx(math.log(4), abs=1e-12)


def test_mean_entropy_averages_over_non_empty_samples():
    expected = (1.5 * math.log(2) + 0.0 + math.log(4)) / 3
    got = scoring.mean_entropy([[1, 1, 2, 3], [], [7, 7, 7], [4, 5, 6, 7]])
    assert got == pytest.approx(expected, abs=1e-12)


def test_gen_ppl_entropy_uses_the_scorers_token_ids(scorer):
    model, tokenizer = scorer
    result = scoring.score_ppl(TEXTS, model, tokenizer, max_length=12)
    ids = [tokenizer(t)["input_ids"][:12] for t in TEXTS if t]
    expected = sum(scoring.unigram_entropy(s) for s in ids) / len(ids)
    assert result.entropy == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- BLEU


HYPS = ["The cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped over", "hello there general kenobi"]


def test_bleu_matches_sacrebleu_called_directly():
    import sacrebleu

    expected = sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True, use_effective_order=True)
    result = scoring.score_bleu(HYPS, REFS)
    assert result.bleu == pytest.approx(expected.score, abs=1e-9)
    assert result.n == 3
    assert "case:lc" in result.signature and "eff:yes" in result.signature


def test_bleu_identical_text_is_100():
    assert scoring.score_bleu(REFS, REFS).bleu == pytest.approx(100.0)


def test_bleu_hand_computed():
    # Lowercased, equal lengths (BP 1); n-gram precisions 5/6, 3/5, 2/4, 1/3.
    result = scoring.score_bleu(["The Cat sat on the mat"], ["the cat sat on a mat"])
    assert result.bleu == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)


def test_bleu_effective_order_ignores_orders_the_hypothesis_lacks():
    # "the cat": 1- and 2-gram precision 1, no 3-/4-grams; BP = exp(1 - 3/2).
    result = scoring.score_bleu(["the cat"], ["the cat sat"])
    assert result.bleu == pytest.approx(100 * math.exp(-0.5), abs=1e-6)


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_matches_rouge_score_called_directly():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_example = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    result = scoring.score_rouge(HYPS, REFS)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(s[name].fmeasure for s in per_example) / len(HYPS)
        assert getattr(result, name) == pytest.approx(expected, abs=1e-9)


def test_rouge_hand_computed_and_averaged_per_example():
    # Example 1: "the cat sat" vs "the cat sat on the mat": unigram P 1, R 1/2 -> F 2/3;
    # bigram P 1, R 2/5 -> F 4/7; LCS 3 -> same as unigram. Example 2: identical -> 1.
    result = scoring.score_rouge(["the cat sat", "a dog"], ["the cat sat on the mat", "a dog"])
    assert result.rouge1 == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-9)
    assert result.rouge2 == pytest.approx(100 * (4 / 7 + 1) / 2, abs=1e-9)
    assert result.rougeL == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-9)


def test_rouge_uses_stemming():
    assert scoring.score_rouge(["cats running"], ["cat runs"]).rouge1 == pytest.approx(100.0)


def test_nothing_to_score_is_a_user_error():
    with pytest.raises(UserError):
        scoring.score_bleu([], [])
    with pytest.raises(UserError):
        scoring.score_rouge([], [])


# ----------------------------------------------------------------------------- eos modes


def slow_official_ppl(texts, model, tokenizer, max_length):
    """The official script's way, written out: pad the WHOLE corpus at once with eos to its
    longest sample, one forward, then score every real token after the first plus each
    row's first padding eos; NLL by an explicit log-softmax, position by position."""
    import torch

    rows = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    rows = [r for r in rows if r]
    eos = tokenizer.eos_token_id
    longest = max(map(len, rows))
    ids = torch.tensor([r + [eos] * (longest - len(r)) for r in rows])
    real = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    first_pad = torch.zeros_like(real)
    for i, r in enumerate(rows):
        if len(r) < longest:
            first_pad[i, len(r)] = 1
    with torch.no_grad():
        # Causal: the first pad eos is predicted from real tokens only, whatever the mask.
        logits = model(input_ids=ids, attention_mask=real + first_pad).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll_sum, n_tokens = 0.0, 0
    for i in range(len(rows)):
        for p in range(1, longest):
            if real[i, p] or first_pad[i, p]:
                nll_sum -= float(log_probs[i, p - 1, ids[i, p]])
                n_tokens += 1
    return math.exp(nll_sum / n_tokens), nll_sum, n_tokens


@pytest.mark.parametrize("max_length", [64, 12])
def test_official_eos_mode_equals_padding_the_whole_corpus_at_once(scorer, max_length):
    model, tokenizer = scorer
    result = scoring.score_ppl(
        TEXTS, model, tokenizer, batch_size=3, max_length=max_length, eos_mode="official"
    )
    ppl, nll_sum, n_tokens = slow_official_ppl(TEXTS, model, tokenizer, max_length)
    assert result.n_tokens == n_tokens
    assert result.nll_sum == pytest.approx(nll_sum, rel=1e-5)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    ours = scoring.score_ppl(TEXTS, model, tokenizer, batch_size=3, max_length=max_length)
    lengths = [len(ids) for ids in scoring.tokenize_for_scoring(TEXTS, tokenizer, max_length)]
    shorter = sum(0 < n < max(lengths) for n in lengths)
    assert result.n_tokens == ours.n_tokens + shorter  # one eos per shorter sample
    assert result.entropy == ours.entropy  # entropy is over a sample's own tokens


def test_the_eos_modes_agree_when_every_sample_has_the_longest_length(scorer):
    model, tokenizer = scorer
    long_texts = [t for t in TEXTS if len(tokenizer(t)["input_ids"]) >= 8]
    ours = scoring.score_ppl(long_texts, model, tokenizer, max_length=8)
    official = scoring.score_ppl(long_texts, model, tokenizer, max_length=8, eos_mode="official")
    assert (official.n_tokens, official.nll_sum) == (ours.n_tokens, ours.nll_sum)


def test_official_eos_mode_does_not_depend_on_batch_size(scorer):
    model, tokenizer = scorer
    results = [
        scoring.score_ppl(TEXTS, model, tokenizer, batch_size=b, eos_mode="official")
        for b in (1, 4, 16)
    ]
    for result in results[1:]:
        assert result.n_tokens == results[0].n_tokens
        assert result.ppl == pytest.approx(results[0].ppl, rel=1e-6)


def test_an_unknown_eos_mode_is_a_user_error(scorer):
    model, tokenizer = scorer
    with pytest.raises(UserError, match="eos mode must be ours or official"):
        scoring.score_ppl(TEXTS, model, tokenizer, eos_mode="batch")
