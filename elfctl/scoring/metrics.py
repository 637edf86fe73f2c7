"""Sample-quality metrics (docs/method.md section 6): Gen PPL, entropy, BLEU, ROUGE.

A pure library: it never prints. Long work reports progress through an optional
`on_batch(n_done, n_total)` callback so the CLI can draw a progress bar.

BLEU and ROUGE are computed with `sacrebleu` and `rouge_score` directly (no metric
scripts fetched at run time).

Gen PPL's eos (`eos_mode`): the official script pads the WHOLE corpus at once with eos
(GPT-2's pad) to its longest sample and scores each sample's first padding eos too, so
every sample shorter than the corpus's longest adds one scored token: eos after its last
token. `eos_mode="official"` does exactly that; the default, "ours", scores only each
sample's own tokens. Neither depends on how samples are batched. The two agree when every
sample has the corpus's longest length (for example all truncated at --max-length).

Precision: the reference loads GPT-2 with bf16 weights; `load_scorer` keeps fp32 weights
and `score_ppl` runs under bf16 autocast on GPU (the matmuls see the same bf16-rounded
weights; norms, softmax and the residual stream stay fp32), fp32 on CPU.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from elfctl.distributed import Processes, my_share
from elfctl.errors import UserError
from elfctl.model.encoder import load_pretrained

if TYPE_CHECKING:  # torch and transformers are imported where they are used
    import torch

ProgressCallback = Callable[[int, int], None]  # (samples done, samples in total)

DEFAULT_SCORER = "gpt2-large"
DEFAULT_MAX_LENGTH = 1024
EOS_MODES = ("ours", "official")


# ----------------------------------------------------------------------------- results


@dataclass
class PPLResult:
    """Gen PPL and entropy of one corpus (a file, or several files combined)."""

    ppl: float  # exp(nll_sum / n_tokens); nan if no token was scored
    nll_sum: float  # summed next-token NLL in nats over all scored tokens
    n_tokens: int  # scored tokens: a sample of L tokens contributes L - 1 (L, official eos)
    n_samples: int  # non-empty samples scored
    n_empty: int  # samples with no GPT-2 token, skipped
    entropy: float  # mean over non-empty samples of the unigram entropy (nats)
    seconds: float
    samples_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BleuResult:
    bleu: float  # corpus BLEU x 100
    precisions: list[float]  # modified 1..4-gram precisions x 100
    brevity_penalty: float
    hyp_len: int
    ref_len: int
    n: int
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RougeResult:
    rouge1: float  # mean F-measure x 100
    rouge2: float
    rougeL: float  # noqa: N815 - the metric's own name
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- entropy


def unigram_entropy(token_ids: Sequence[int]) -> float:
    """Entropy (natural log) of the empirical unigram distribution of one sample's ids."""
    n = len(token_ids)
    if n == 0:
        raise ValueError("the entropy of an empty sample is undefined")
    return -sum(c / n * math.log(c / n) for c in Counter(token_ids).values())


def mean_entropy(samples_token_ids: Sequence[Sequence[int]]) -> float:
    """Mean per-sample unigram entropy over the non-empty samples (nan if there are none)."""
    entropies = [unigram_entropy(ids) for ids in samples_token_ids if len(ids) > 0]
    return sum(entropies) / len(entropies) if entropies else math.nan


# ----------------------------------------------------------------------------- Gen PPL


def load_scorer(
    name_or_path: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """The scorer model and its tokenizer (pad = eos), from a hub id or a local folder.

    Weights are kept in fp32; on GPU, `score_ppl` runs the forward pass under bf16 autocast.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "the scorer model")
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained,
        name_or_path,
        "the scorer model",
        dtype=torch.float32,
    )
    if tokenizer.eos_token is None:
        raise UserError(f"the scorer tokenizer {name_or_path!r} has no eos token to pad with.")
    tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def tokenize_for_scoring(
    texts: Sequence[str], tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH
) -> list[list[int]]:
    """GPT-2 token ids of each text, truncated to `max_length` (an empty text gives [])."""
    if not texts:
        return []
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [list(ids) for ids in encoded["input_ids"]]


def scored_sequences(token_ids: list[list[int]], eos_id: int, eos_mode: str) -> list[list[int]]:
    """What is scored of each sample (position i predicts token i + 1, the first token is
    context only): "ours": its own tokens; "official": its own tokens, then one eos for
    every sample shorter than the corpus's longest (the official script's first padding
    eos, scored because it pads the whole corpus at once)."""
    if eos_mode not in EOS_MODES:
        raise UserError(f"the eos mode must be ours or official, got {eos_mode!r}.")
    if eos_mode == "ours" or not token_ids:
        return token_ids
    longest = max(len(ids) for ids in token_ids)
    return [ids + [eos_id] if len(ids) < longest else ids for ids in token_ids]


def _pad_batch(
    batch_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sample: input_ids (B, L) and attention_mask (B, L)."""
    import torch

    longest = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), longest), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids.to(device), attention_mask.to(device)


def sample_nll(
    batch_ids: list[list[int]], model: torch.nn.Module, pad_id: int
) -> list[tuple[float, int]]:
    """(summed next-token NLL, number of scored tokens) for each sample of one batch.

    Position i predicts token i + 1; a sample's first token is context only, and padding
    is neither attended to nor scored, so a sample's numbers do not depend on its
    batch-mates (up to floating-point rounding).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    input_ids, attention_mask = _pad_batch(batch_ids, pad_id, device)  # (B, L), (B, L)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    results = []
    for row, ids in enumerate(batch_ids):
        n_scored = len(ids) - 1
        if n_scored <= 0:
            results.append((0.0, 0))
            continue
        # One sample at a time: the fp32 log-softmax over a 50k vocabulary is the memory peak.
        row_logits = logits[row, :n_scored].float()  # (L-1, V)
        targets = input_ids[row, 1 : n_scored + 1]  # (L-1,)
        nll = F.cross_entropy(row_logits, targets, reduction="sum")
        results.append((float(nll), n_scored))
    return results


def score_ppl(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    eos_mode: str = "ours",
    on_batch: ProgressCallback | None = None,
    procs: Processes | None = None,
) -> PPLResult:
    """Gen PPL (token-weighted, section 6) and mean unigram entropy of `texts`.

    Empty samples (no GPT-2 token) are skipped and counted. Samples are batched by
    length (longest first) to waste little compute on padding; the result does not
    depend on the batching. `eos_mode` (see `scored_sequences`) changes only which
    tokens are scored, never the entropy (always over a sample's own tokens). Under
    several processes (`procs`) each scores its share of the batches and every process
    gets the whole corpus's result: the per-sample sums are gathered and added in sample
    order.
    """
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {batch_size}.")
    if max_length < 2:
        raise UserError(f"the max length must be at least 2 tokens, got {max_length}.")
    n_positions = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if n_positions is not None and max_length > n_positions:
        raise UserError(
            f"the max length {max_length} exceeds the scorer's {n_positions} positions."
        )

    start = time.perf_counter()
    procs = procs or Processes()
    token_ids = tokenize_for_scoring(texts, tokenizer, max_length)
    non_empty = [ids for ids in token_ids if ids]
    n_empty = len(token_ids) - len(non_empty)
    scored = scored_sequences(non_empty, tokenizer.eos_token_id, eos_mode)
    # Longest first, so batches waste little compute on padding; under several processes
    # each scores every N-th batch.
    order = sorted(range(len(scored)), key=lambda i: len(scored[i]), reverse=True)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine: list[tuple[int, float, int]] = []  # (sample index, summed NLL, scored tokens)
    for n_done, batch in enumerate(my_share(batches, procs), start=1):
        nlls = sample_nll([scored[i] for i in batch], model, tokenizer.pad_token_id)
        mine.extend((i, nll, n) for i, (nll, n) in zip(batch, nlls, strict=True))
        if on_batch is not None:
            done = min(len(order), sum(len(b) for b in batches[: n_done * procs.world]))
            on_batch(done, len(order))
    per_sample = sorted(x for part in procs.gather(mine) for x in part)
    # Exact sums in sample order: the same figure whatever the batching or process count.
    nll_sum = math.fsum(nll for _, nll, _ in per_sample)
    n_tokens = sum(n for _, _, n in per_sample)

    seconds = time.perf_counter() - start
    return PPLResult(
        ppl=math.exp(nll_sum / n_tokens) if n_tokens else math.nan,
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_samples=len(non_empty),
        n_empty=n_empty,
        entropy=mean_entropy(non_empty),
        seconds=seconds,
        samples_per_s=len(non_empty) / seconds if seconds > 0 else math.nan,
    )


def combine_ppl(results: Sequence[PPLResult]) -> PPLResult:
    """One corpus-level result from several files: NLL and tokens summed, entropy averaged
    over all their samples (exactly what scoring the concatenated files would give)."""
    nll_sum = sum(r.nll_sum for r in results)
    n_tokens = sum(r.n_tokens for r in results)
    n_samples = sum(r.n_samples for r in results)
    entropy_sum = sum(r.entropy * r.n_samples for r in results if r.n_samples)
    seconds = sum(r.seconds for r in results)
    return PPLResult(
        ppl=math.exp(nll_sum / n_tokens) if n_tokens else math.nan,
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_samples=n_samples,
        n_empty=sum(r.n_empty for r in results),
        entropy=entropy_sum / n_samples if n_samples else math.nan,
        seconds=seconds,
        samples_per_s=n_samples / seconds if seconds > 0 else math.nan,
    )


# ----------------------------------------------------------------------------- BLEU, ROUGE


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise UserError("there is nothing to score: no samples.")


def score_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuResult:
    """sacreBLEU corpus BLEU, lowercased, effective order, one reference per hypothesis."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    bleu = BLEU(lowercase=True, effective_order=True)
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return BleuResult(
        bleu=float(score.score),
        precisions=[float(p) for p in score.precisions],
        brevity_penalty=float(score.bp),
        hyp_len=int(score.sys_len),
        ref_len=int(score.ref_len),
        n=len(hypotheses),
        signature=str(bleu.get_signature()),
    )


def score_rouge(
    hypotheses: Sequence[str],
    references: Sequence[str],
    on_batch: ProgressCallback | None = None,
) -> RougeResult:
    """rouge_score ROUGE-1/2/L with stemming: F-measure per example x 100, averaged."""
    from rouge_score.rouge_scorer import RougeScorer

    _check_pairs(hypotheses, references)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for i, (hypothesis, reference) in enumerate(zip(hypotheses, references, strict=True)):
        scores = scorer.score(reference, hypothesis)  # (target, prediction)
        for name in totals:
            totals[name] += scores[name].fmeasure * 100
        if on_batch is not None and ((i + 1) % 100 == 0 or i + 1 == len(hypotheses)):
            on_batch(i + 1, len(hypotheses))
    n = len(hypotheses)
    return RougeResult(
        rouge1=totals["rouge1"] / n, rouge2=totals["rouge2"] / n, rougeL=totals["rougeL"] / n, n=n
    )
