"""MAUVE (Pillutla et al. 2021) of generated text against human references, with `mauve-text`.

A pure library: it never prints. Features are computed as `mauve-text` computes them from
text (its `featurize_tokens_from_model`): each text is tokenized with the featurizer's
tokenizer, truncated at `max_length` tokens, and its feature is the last layer's hidden
state at its last token (`AutoModel`, GPT-2 Large by default, any local folder in tests).
We batch texts of similar length together, which changes nothing but rounding; then
`mauve.compute_mauve(p_features=..., q_features=...)` does the rest with its own defaults
(k-means on PCA-reduced features, about n/10 buckets, scaling factor 5, seed 25).

Empty texts are skipped and counted, as `mauve-text` drops them. MAUVE histograms both
sides into about n/10 clusters, so fewer than MIN_SAMPLES texts on either side is refused.
References are read once per run and featurized once for all scored files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elfctl import records
from elfctl.data.inputs import read_condition_inputs
from elfctl.errors import UserError
from elfctl.model.encoder import load_pretrained
from elfctl.scoring.metrics import DEFAULT_MAX_LENGTH, DEFAULT_SCORER

if TYPE_CHECKING:
    import numpy as np
    import torch

MIN_SAMPLES = 10  # per side: MAUVE's default quantisation uses about n/10 clusters
MAUVE_SEED = 25  # mauve-text's own default k-means seed
DEFAULT_SCALING = 5.0  # mauve-text's default scaling factor c
EXTRA_HINT = "pip install 'elfctl[mauve]'"

ProgressCallback = Callable[[int, int], None]


@dataclass
class MauveResult:
    mauve: float  # in [0, 1], higher is closer to the references
    frontier_integral: float
    mauve_star: float  # the smoothed variants (Pillutla et al., JMLR 2023)
    frontier_integral_star: float
    num_buckets: int
    n_samples: int  # non-empty samples featurized
    n_empty: int
    n_references: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_mauve():
    """The `mauve` module, or a one-sentence error naming the extra that installs it."""
    try:
        import mauve
    except ImportError as e:
        raise UserError(
            f"MAUVE needs the mauve-text package ({e.name or 'mauve'} is missing): {EXTRA_HINT}."
        ) from None
    return mauve


# ----------------------------------------------------------------------------- references


def read_references(
    references: str, field: str = "text", split: str | None = None, limit: int | None = None
) -> list[str]:
    """Human texts to compare with: a samples file or run dir, a .jsonl file (`field`), a .txt
    file (one text per line), a save_to_disk folder, testbed:<name>/<part> or a hub dataset."""

    path = Path(references)
    if (path.is_dir() and (path / records.SAMPLES_FILE).is_file()) or (
        path.is_file() and path.suffix == ".jsonl" and field == "text"
    ):
        texts = [row["text"] for row in records.read_samples(path)][:limit]
    else:
        texts, _ = read_condition_inputs(
            references, field, field, split, limit, option="--references"
        )
    if not any(text.strip() for text in texts):
        raise UserError(f"--references {references} holds no non-empty texts.")
    return texts


# ----------------------------------------------------------------------------- features


def load_featurizer(
    name_or_path: str = DEFAULT_SCORER, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """The feature model (`AutoModel`, fp32, eval) and its tokenizer, as mauve-text loads them."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    what = "the MAUVE feature model"
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, what)
    model = load_pretrained(AutoModel.from_pretrained, name_or_path, what, dtype=torch.float32)
    model.to(device).eval()
    return model, tokenizer


def featurize(
    texts: Sequence[str],
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    on_batch: ProgressCallback | None = None,
) -> np.ndarray:
    """(n, d) features of the non-empty texts, in order: the last hidden state at each text's
    last token (right padding with an attention mask, so batch-mates do not matter)."""
    import numpy as np
    import torch

    token_ids = [tokenizer.encode(t, truncation=True, max_length=max_length) for t in texts if t]
    token_ids = [ids for ids in token_ids if ids]
    device = next(model.parameters()).device
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    features: list[torch.Tensor | None] = [None] * len(token_ids)
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        lengths = torch.tensor([len(token_ids[i]) for i in rows])
        input_ids = torch.zeros((len(rows), int(lengths.max())), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for r, i in enumerate(rows):
            input_ids[r, : lengths[r]] = torch.tensor(token_ids[i])
            attention_mask[r, : lengths[r]] = 1
        with torch.inference_mode():
            hidden = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=True,
                return_dict=True,
            ).hidden_states[-1]  # (B, L, d)
        rows_index = torch.arange(len(rows), device=device)
        last = hidden[rows_index, (lengths - 1).to(device)].float().cpu()  # (B, d)
        for r, i in enumerate(rows):
            features[i] = last[r]
        if on_batch is not None:
            on_batch(min(first + batch_size, len(order)), len(order))
    if not token_ids:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.stack(features).numpy()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- MAUVE


def check_counts(n_samples: int, n_references: int, where: str = "the samples") -> None:
    if n_samples < MIN_SAMPLES:
        raise UserError(
            f"MAUVE needs at least {MIN_SAMPLES} non-empty samples but {where} hold "
            f"{n_samples} (it histograms each side into about n/10 clusters)."
        )
    if n_references < MIN_SAMPLES:
        raise UserError(
            f"MAUVE needs at least {MIN_SAMPLES} non-empty references but there are "
            f"{n_references} (it histograms each side into about n/10 clusters)."
        )


def mauve_from_features(
    sample_features: np.ndarray,
    reference_features: np.ndarray,
    *,
    n_empty: int = 0,
    seed: int = MAUVE_SEED,
    scaling: float = DEFAULT_SCALING,
) -> MauveResult:
    """`mauve.compute_mauve` on ready features (samples are p, references q)."""
    mauve = require_mauve()
    check_counts(len(sample_features), len(reference_features))
    start = time.perf_counter()
    out = mauve.compute_mauve(
        p_features=sample_features,
        q_features=reference_features,
        seed=seed,
        mauve_scaling_factor=scaling,
        verbose=False,
    )
    return MauveResult(
        mauve=float(out.mauve),
        frontier_integral=float(out.frontier_integral),
        mauve_star=float(out.mauve_star),
        frontier_integral_star=float(out.frontier_integral_star),
        num_buckets=int(out.num_buckets),
        n_samples=len(sample_features),
        n_empty=n_empty,
        n_references=len(reference_features),
        seconds=time.perf_counter() - start,
    )
