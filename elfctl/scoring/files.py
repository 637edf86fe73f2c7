"""Scoring sample files: read them, score each one, record the result beside it.

What the `score-*` commands, `eval` and `sweep` share, so that their numbers are the same:
`read_inputs` reads and checks every input before anything is scored or written (a
malformed line stops the run naming file and line, with no metrics.jsonl touched); each
`score_*_files` scores each file on its own and appends one record to the metrics.jsonl
beside it (records.py); `make_scorer` is the one dispatch from a scorer kind (`gen_ppl`,
`bleu`, `rouge`, `mauve`, `diversity`) to those functions that `eval` and `sweep` call.

A scorer is named by a hub id, a local folder or `testbed:grammar/scorer`, the test bed's
own small GPT-2 (testbed/scorer.py), which is built on first use and needs no network.
Never prints: progress and messages go through callbacks.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elfctl import records
from elfctl.config import TESTBED_SCORER
from elfctl.distributed import Processes
from elfctl.errors import UserError
from elfctl.model.encoder import looks_like_local_path
from elfctl.scoring import diversity, mauve, metrics
from elfctl.testbed.assets import is_testbed_uri
from elfctl.testbed.scorer import ensure_grammar_scorer

Inputs = list[tuple[Path, list[dict[str, Any]]]]
# (kind of scoring run, its samples) -> the metrics records, one per samples file.
ScoreFn = Callable[[str, Inputs], list[dict[str, Any]]]
# (description, total, unit) -> a context manager yielding advance(n).
ProgressFn = Callable[[str, int, str], AbstractContextManager[Callable[[int], None]]]
LogFn = Callable[[str], None]


GRAMMAR_PREFIX = "testbed:grammar/"  # samples in the test bed's grammar language
SCORER_KINDS = ("gen_ppl", "bleu", "rouge", "mauve", "diversity")

# A glob stands for the sample files it matches, not for our own side files.
_SIDE_FILES = {records.METRICS_FILE, records.RUN_FILE}


# ----------------------------------------------------------------------------- scorers


def resolve_scorer(name: str) -> str:
    """What `from_pretrained` loads for a scorer name: the test bed's scorer folder for
    its URI (trained on first use), else the name itself (hub id or local folder)."""
    if name == TESTBED_SCORER:
        return ensure_grammar_scorer()
    if is_testbed_uri(name):
        raise UserError(f"Unknown test-bed scorer {name!r}; the test bed has {TESTBED_SCORER}.")
    return name


def check_scorer(name: str, option: str = "--scorer") -> None:
    """Refuse a scorer that cannot load, before any sampling: an unknown test-bed URI or a
    local folder that does not exist or holds no model."""
    if is_testbed_uri(name):
        if name != TESTBED_SCORER:
            raise UserError(
                f"{option} {name}: unknown test-bed scorer; the test bed has {TESTBED_SCORER}."
            )
        return
    path = Path(name).expanduser()
    if looks_like_local_path(name) or path.exists():
        if not path.is_dir():
            raise UserError(
                f"cannot load the scorer model {name!r} ({option}): the folder {name} does not "
                "exist."
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"cannot load the scorer model {name!r} ({option}): the folder {name} holds no "
                "model (no config.json)."
            )


# ----------------------------------------------------------------------------- inputs


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """The samples files named by `patterns` (files, run dirs, globs), in order, no repeats."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths.extend(_glob_inputs(pattern))
            continue
        path = Path(pattern)
        if path.is_dir():
            if not (path / records.SAMPLES_FILE).is_file():
                raise UserError(f"{path} is a directory without a {records.SAMPLES_FILE}.")
            path = path / records.SAMPLES_FILE
        elif not path.is_file():
            raise UserError(f"{path}: no such file or directory.")
        paths.append(path)
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _glob_inputs(pattern: str) -> list[Path]:
    matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
    matches = [
        records.samples_path(m)
        for m in matches
        if (m.is_file() and m.name not in _SIDE_FILES)
        or (m.is_dir() and (m / records.SAMPLES_FILE).is_file())
    ]
    if not matches:
        raise UserError(f"no samples file matches '{pattern}'.")
    return matches


def read_inputs(patterns: list[str], need_reference: bool = False) -> Inputs:
    """Every input's rows, all checked up front (malformed rows, missing references)."""
    inputs = []
    for path in resolve_inputs(patterns):
        rows_with_lines = records.read_samples_with_lines(path)
        if not rows_with_lines:
            raise UserError(f"{path} holds no samples.")
        if need_reference:
            for line, row in rows_with_lines:
                if row["reference"] is None:
                    raise UserError(
                        f'{path}, line {line}: the row has no "reference" to score against.'
                    )
        inputs.append((path, [row for _, row in rows_with_lines]))
    return inputs


def default_scorer_for(inputs: Inputs, fallback: str = metrics.DEFAULT_SCORER) -> str:
    """The test bed's scorer when every input's run.json says it was sampled in the test
    bed's language (its tokenizer); else `fallback`."""
    named = {_recorded_scorer(path) for path, _ in inputs}
    return named.pop() if len(named) == 1 and None not in named else fallback


def _recorded_scorer(samples_file: Path) -> str | None:
    if not (samples_file.parent / records.RUN_FILE).is_file():
        return None
    try:
        info = records.read_run_json(samples_file.parent)
    except UserError:
        return None
    tokenizer = info.get("tokenizer")
    in_testbed = isinstance(tokenizer, str) and tokenizer.startswith(GRAMMAR_PREFIX)
    return TESTBED_SCORER if in_testbed else None


# ----------------------------------------------------------------------------- scoring


@contextlib.contextmanager
def no_progress(description: str, total: int, unit: str):
    yield lambda n=1: None


class _Advance:
    """Turn a scorer's `on_batch(done, total)` into `advance(n)` steps of a progress bar."""

    def __init__(self, advance: Callable[[int], None]):
        self.advance, self.done = advance, 0

    def __call__(self, n_done: int, n_total: int) -> None:
        self.advance(n_done - self.done)
        self.done = n_done

    def finish(self, total: int) -> None:
        if self.done < total:  # empty samples are counted, not batched
            self.advance(total - self.done)


def score_ppl_files(
    inputs: Inputs,
    model_name: str,
    *,
    batch_size: int,
    max_length: int,
    procs: Processes | None = None,
    combined: bool = False,
    write: bool = True,
    eos_mode: str = "ours",
    progress: ProgressFn = no_progress,
    log: LogFn | None = None,
) -> list[dict[str, Any]]:
    """Score each input with Gen PPL + entropy; append a record beside each (if `write`,
    on the main process). Under several processes each scores a share of every file.

    Returns the records (plus one for all files together if `combined`).
    """
    procs = procs or Processes()
    device = procs.device
    dtype = "bf16-autocast" if getattr(device, "type", str(device)) == "cuda" else "fp32"
    (log or _quiet)(f"loading scorer {model_name} on {device} ({dtype})")
    model, tokenizer = metrics.load_scorer(resolve_scorer(model_name), device)
    settings = {"max_length": max_length, "batch_size": batch_size, "device": str(device)}
    settings.update(dtype=dtype, eos_mode=eos_mode, processes=procs.world)

    results, out_records = [], []
    for path, rows in inputs:
        texts = [row["text"] for row in rows]
        with progress(f"Gen PPL {path}", len(texts), "samples") as advance:
            on_batch = _Advance(advance)
            result = metrics.score_ppl(
                texts,
                model,
                tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                eos_mode=eos_mode,
                on_batch=on_batch,
                procs=procs,
            )
            on_batch.finish(len(texts))
        results.append(result)
        record = records.metrics_record(
            path.resolve(), "gen_ppl", result.to_dict(), scorer=model_name, n=len(rows), **settings
        )
        if write and procs.is_main:
            records.append_metrics(path.parent, record)
        out_records.append(record)

    if combined:
        out_records.append(
            records.metrics_record(
                "combined",
                "gen_ppl",
                metrics.combine_ppl(results).to_dict(),
                scorer=model_name,
                n=sum(len(rows) for _, rows in inputs),
                files=[str(path.resolve()) for path, _ in inputs],
                **settings,
            )
        )
    return out_records


def score_bleu_files(inputs: Inputs, write: bool = True) -> list[dict[str, Any]]:
    """Corpus BLEU of each input against its references; a record beside each."""
    out_records = []
    for path, rows in inputs:
        result = metrics.score_bleu([r["text"] for r in rows], [r["reference"] for r in rows])
        values = result.to_dict()
        signature = values.pop("signature")
        record = records.metrics_record(
            path.resolve(), "bleu", values, scorer=f"sacrebleu {signature}", n=len(rows)
        )
        if write:
            records.append_metrics(path.parent, record)
        out_records.append(record)
    return out_records


def score_rouge_files(
    inputs: Inputs, write: bool = True, progress: ProgressFn = no_progress
) -> list[dict[str, Any]]:
    """ROUGE-1/2/L of each input against its references; a record beside each."""
    out_records = []
    for path, rows in inputs:
        with progress(f"ROUGE {path}", len(rows), "samples") as advance:
            result = metrics.score_rouge(
                [r["text"] for r in rows],
                [r["reference"] for r in rows],
                on_batch=_Advance(advance),
            )
        record = records.metrics_record(
            path.resolve(),
            "rouge",
            result.to_dict(),
            scorer="rouge_score (rouge1, rouge2, rougeL; stemmer; F-measure x 100)",
            n=len(rows),
        )
        if write:
            records.append_metrics(path.parent, record)
        out_records.append(record)
    return out_records


def score_diversity_files(
    inputs: Inputs,
    tokenizer_name: str,
    *,
    max_length: int,
    self_bleu_samples: int,
    seed: int,
    write: bool = True,
) -> list[dict[str, Any]]:
    """Score each input with every diversity metric; append a record beside each (if `write`)."""
    tokenizer = diversity.load_tokenizer(
        tokenizer_name if tokenizer_name == diversity.WORDS else resolve_scorer(tokenizer_name)
    )
    units = "words" if tokenizer is None else f"{tokenizer_name} tokens"
    out_records = []
    for path, rows in inputs:
        result = diversity.score_diversity(
            [row["text"] for row in rows],
            tokenizer,
            max_length=max_length,
            self_bleu_samples=self_bleu_samples,
            seed=seed,
        )
        record = records.metrics_record(
            path.resolve(),
            "diversity",
            result.to_dict(),
            scorer=units,
            n=len(rows),
            max_length=max_length,
            self_bleu="sacrebleu sentence BLEU (13a, exp smoothing, effective order)",
            self_bleu_seed=seed,
        )
        if write:
            records.append_metrics(path.parent, record)
        out_records.append(record)
    return out_records


def score_mauve_files(
    inputs: Inputs,
    references: list[str],
    model_name: str,
    *,
    references_name: str,
    batch_size: int = 8,
    max_length: int = metrics.DEFAULT_MAX_LENGTH,
    seed: int = mauve.MAUVE_SEED,
    scaling: float = mauve.DEFAULT_SCALING,
    device: Any = "cpu",
    write: bool = True,
    progress: ProgressFn = no_progress,
    log: LogFn | None = None,
) -> list[dict[str, Any]]:
    """MAUVE of each input against `references`; append a record beside each (if `write`).

    Every count is checked before the feature model is loaded; the references are
    featurized once.
    """
    mauve.require_mauve()
    n_references = sum(1 for text in references if text)
    for path, rows in inputs:
        mauve.check_counts(sum(1 for r in rows if r["text"]), n_references, str(path))

    (log or _quiet)(f"loading MAUVE feature model {model_name} on {device}")
    model, tokenizer = mauve.load_featurizer(resolve_scorer(model_name), device)

    def features(description: str, texts: list[str]):
        with progress(description, len(texts), "samples") as advance:
            return mauve.featurize(
                texts,
                model,
                tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                on_batch=_Advance(advance),
            )

    reference_features = features(f"features {references_name}", references)
    settings = {
        "references": references_name,
        "max_length": max_length,
        "batch_size": batch_size,
        "seed": seed,
        "scaling": scaling,
        "device": str(device),
    }
    out_records = []
    for path, rows in inputs:
        texts = [row["text"] for row in rows]
        sample_features = features(f"features {path}", texts)
        result = mauve.mauve_from_features(
            sample_features,
            reference_features,
            n_empty=len(texts) - len(sample_features),
            seed=seed,
            scaling=scaling,
        )
        record = records.metrics_record(
            path.resolve(), "mauve", result.to_dict(), scorer=model_name, n=len(rows), **settings
        )
        if write:
            records.append_metrics(path.parent, record)
        out_records.append(record)
    return out_records


# ----------------------------------------------------------------------------- dispatch


@dataclass
class Scoring:
    """How `eval` and `sweep` score their runs: one scorer for Gen PPL and diversity
    tokens, MAUVE's references and feature model. Cheap scorers run on every process and
    only the main one writes."""

    scorer: str = metrics.DEFAULT_SCORER
    batch_size: int = 8
    procs: Processes | None = None
    references: list[str] | None = None
    references_name: str | None = None
    mauve_model: str | None = None  # None: `scorer`
    progress: ProgressFn = no_progress
    log: LogFn | None = None


def make_scorer(options: Scoring) -> ScoreFn:
    """The one dispatch from a scorer kind to the functions behind the score-* commands,
    so eval's and sweep's numbers are exactly those commands' numbers."""
    procs = options.procs or Processes()
    write = procs.is_main

    def score(kind: str, inputs: Inputs) -> list[dict[str, Any]]:
        if kind == "gen_ppl":
            return score_ppl_files(
                inputs,
                options.scorer,
                batch_size=options.batch_size,
                max_length=metrics.DEFAULT_MAX_LENGTH,
                procs=procs,
                progress=options.progress,
                log=options.log,
            )
        if kind == "bleu":
            return score_bleu_files(inputs, write=write)
        if kind == "rouge":
            return score_rouge_files(inputs, write=write, progress=options.progress)
        if kind == "mauve":
            if options.references is None:
                raise UserError("MAUVE needs references (human text to compare with).")
            return score_mauve_files(
                inputs,
                options.references,
                options.mauve_model or options.scorer,
                references_name=options.references_name or "references",
                batch_size=options.batch_size,
                device=procs.device,
                write=write,
                progress=options.progress,
                log=options.log,
            )
        if kind == "diversity":
            return score_diversity_files(
                inputs,
                options.scorer,
                max_length=metrics.DEFAULT_MAX_LENGTH,
                self_bleu_samples=diversity.DEFAULT_SELF_BLEU_SAMPLES,
                seed=diversity.SELF_BLEU_SEED,
                write=write,
            )
        raise ValueError(f"unknown scorer kind {kind!r}")

    return score


def _quiet(message: str) -> None:
    return None
