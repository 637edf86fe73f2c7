"""Scoring samples: Gen PPL and entropy, BLEU and ROUGE, diversity, MAUVE, and scoring files."""

from __future__ import annotations

from elfctl.scoring.diversity import (
    DEFAULT_SELF_BLEU_SAMPLES,
    SELF_BLEU_SEED,
    score_diversity,
    self_bleu,
)
from elfctl.scoring.mauve import read_references, require_mauve
from elfctl.scoring.metrics import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_SCORER,
    BleuResult,
    PPLResult,
    RougeResult,
    load_scorer,
    mean_entropy,
    sample_nll,
    score_bleu,
    score_ppl,
    score_rouge,
)

__all__ = [
    "BleuResult",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_SCORER",
    "DEFAULT_SELF_BLEU_SAMPLES",
    "PPLResult",
    "RougeResult",
    "SELF_BLEU_SEED",
    "load_scorer",
    "mean_entropy",
    "read_references",
    "require_mauve",
    "sample_nll",
    "score_bleu",
    "score_diversity",
    "score_ppl",
    "score_rouge",
    "self_bleu",
]
