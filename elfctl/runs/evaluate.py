"""`elfctl eval` as a library: every official sampling setting of a preset, sampled and scored.

One evaluation directory holds one sample run directory per setting and a summary:

    <out>/<setting>/samples.jsonl   the samples (records.py layout)
    <out>/<setting>/run.json        what produced them
    <out>/<setting>/metrics.jsonl   the scorers' records
    <out>/eval.json                 one row per setting: our numbers beside the paper's

Which scorers run (docs/method.md section 6): unconditional presets get Gen PPL + entropy;
conditional presets get BLEU if the setting's paper numbers name BLEU, ROUGE if they name
ROUGE, both if they name neither. Conditional presets are sampled conditioned on the first
n rows of the preset's validation set (`data.validation`: raw `input` source text and
`target` reference text), so their paper column shows the validation number first.

`--metrics` (`EvalRequest.metrics`) replaces that choice of scorers with its own list:
Gen PPL, BLEU, ROUGE, MAUVE, diversity (any of them, for any preset).

All settings are sampled first, then each scorer runs once over all of them (one load of
GPT-2 Large, not one per setting). Scoring itself is a hook (`ScoreFn`): `elfctl eval`
passes the functions behind `score-ppl` / `score-bleu` / `score-rouge`, so eval's numbers
are exactly theirs. This module never prints; progress and messages go through hooks.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elfctl import records
from elfctl.config import Config, SamplingSetting, describe_sampler, resolve, sampling_setting
from elfctl.data.inputs import ConditionInputs, read_condition_rows
from elfctl.distributed import Processes
from elfctl.errors import UserError
from elfctl.runs.sample_job import LoadedModel, SampleJob, load_for_sampling
from elfctl.runs.stats import mean_stderr
from elfctl.scoring import LogFn, ProgressFn, ScoreFn, no_progress
from elfctl.version import __version__

if TYPE_CHECKING:
    import torch


EVAL_FILE = "eval.json"


# Scorer kinds and the metrics each produces.
SCORER_METRICS = {
    "gen_ppl": ("gen_ppl", "entropy"),
    "bleu": ("bleu",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "mauve": ("mauve",),
    "diversity": ("distinct_4", "rep_4", "self_bleu"),
}
# `--metrics` names -> scorer kinds.
METRIC_CHOICES = {
    "ppl": "gen_ppl",
    "bleu": "bleu",
    "rouge": "rouge",
    "mauve": "mauve",
    "diversity": "diversity",
}


@dataclass(frozen=True)
class Metric:
    label: str  # the table header
    record: str  # the "metric" of its metrics.jsonl record
    value: str  # the key in that record's "values"


# Keyed as SamplingSetting.paper is: "bleu" is the paper's test number and
# "bleu_validation" its validation number.
METRICS = {
    "gen_ppl": Metric("Gen PPL", "gen_ppl", "ppl"),
    "entropy": Metric("entropy", "gen_ppl", "entropy"),
    "bleu": Metric("BLEU", "bleu", "bleu"),
    "rouge1": Metric("ROUGE-1", "rouge", "rouge1"),
    "rouge2": Metric("ROUGE-2", "rouge", "rouge2"),
    "rougeL": Metric("ROUGE-L", "rouge", "rougeL"),
    "mauve": Metric("MAUVE", "mauve", "mauve"),
    "distinct_4": Metric("dist-4", "diversity", "distinct_4"),
    "rep_4": Metric("rep-4", "diversity", "rep_4"),
    "self_bleu": Metric("self-BLEU", "diversity", "self_bleu"),
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- planning


def resolve_eval_config(
    preset: str | None, config_file: str | Path | None, checkpoint: str | None = None
) -> Config:
    """The preset and/or config file that describes the run to evaluate (file wins); with
    neither, the config.yaml the run or checkpoint `checkpoint` was trained with."""
    if preset or config_file:
        return resolve(preset, config_file)
    own = own_config_file(checkpoint) if checkpoint else None
    if own is None:
        raise UserError(
            f"{checkpoint} has no config.yaml of its own; name what to evaluate with --preset NAME "
            "or --config FILE."
        )
    return resolve(None, own)


def own_config_file(checkpoint: str) -> Path | None:
    """The config.yaml of a local run dir or checkpoint (beside it or in a folder above its
    checkpoints); None for a hub id or a checkpoint without one."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        return None
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def select_settings(config: Config, names: list[str] | None = None) -> list[SamplingSetting]:
    """The named settings in the order given, or every official setting of the config."""
    if not config.sampling:
        raise UserError(f"Preset '{config.name}' has no sampling settings to evaluate.")
    seen = [s.name for s in config.sampling]
    duplicates = sorted({n for n in seen if seen.count(n) > 1})
    if duplicates:
        raise UserError(f"Preset '{config.name}' names sampling setting '{duplicates[0]}' twice.")
    chosen = [sampling_setting(config, n) for n in dict.fromkeys(names)] if names else None
    settings = chosen or list(config.sampling)
    for setting in settings:
        # Each setting becomes a folder name under --out.
        if not _SAFE_NAME.match(setting.name):
            raise UserError(
                f"Sampling setting name '{setting.name}' is not usable as a folder name "
                "(letters, digits, '.', '_' and '-' only)."
            )
    return settings


def parse_metrics(text: str) -> list[str]:
    """`--metrics ppl,mauve,diversity` -> scorer kinds, in a fixed order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_CHOICES]
    if unknown or not names:
        raise UserError(
            f"--metrics takes a comma-separated list of {', '.join(METRIC_CHOICES)}, got '{text}'."
        )
    kinds = {METRIC_CHOICES[name] for name in names}
    return [kind for kind in SCORER_METRICS if kind in kinds]


def scorers_for(
    config: Config, setting: SamplingSetting, metrics: list[str] | None = None
) -> list[str]:
    """The scorer kinds for one setting: `metrics` when given (from `--metrics`); else Gen
    PPL for unconditional presets, and for conditional ones BLEU and/or ROUGE as the paper
    reports them, both when it reports neither."""
    if metrics is not None:
        return list(metrics)
    if not config.data.conditional:
        return ["gen_ppl"]
    reported = {key.removesuffix("_validation") for key in setting.paper}
    kinds = [kind for kind in ("bleu", "rouge") if set(SCORER_METRICS[kind]) & reported]
    return kinds or ["bleu", "rouge"]


def default_out_dir(config: Config) -> Path:
    return Path("outputs") / f"eval-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_eval_out_dir(
    out_dir: Path, settings: list[SamplingSetting], force: bool, seeds: list[int] | None = None
) -> None:
    """Refuse (before any work) to overwrite an earlier evaluation without `force`.

    A setting folder that already holds samples is left to `run_eval`: samples of the
    same settings (a killed evaluation started again) are reused, others are an error.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    if force:
        return
    if (out_dir / EVAL_FILE).exists():
        raise UserError(f"{out_dir} already holds {EVAL_FILE}; pass --force or another --out.")
    for setting in settings:
        for seed in seeds or [None]:
            run_dir = run_dir_for(out_dir, setting, seed)
            metrics = run_dir / records.METRICS_FILE
            if metrics.exists() and not (run_dir / records.SAMPLES_FILE).exists():
                raise UserError(
                    f"{run_dir} already holds {records.METRICS_FILE}; pass --force or another "
                    "--out."
                )


def run_dir_for(out_dir: Path, setting: SamplingSetting, seed: int | None) -> Path:
    """<out>/<setting>, or <out>/<setting>/seed_<s> for an evaluation over several seeds."""
    run_dir = Path(out_dir) / setting.name
    return run_dir if seed is None else run_dir / f"seed_{seed}"


# ----------------------------------------------------------------------------- loading


def load_for_eval(
    checkpoint: str,
    config: Config,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    for_prompting: bool = False,
    encoder: str | None = None,
) -> LoadedModel:
    """The model with the evaluation config: the preset's data and sampling settings, the
    checkpoint's network (and, for our own checkpoints, latent space); conditional presets
    and prompted runs also get the frozen encoder."""

    return load_for_sampling(
        checkpoint, config, tokenizer, device, config.data.conditional, for_prompting, encoder
    )


def validation_pairs(config: Config, n: int) -> ConditionInputs:
    """The first `n` sources of the preset's validation set, each with its reference (and the
    set's own condition ids, where it has them)."""

    data = config.data
    if not data.validation:
        raise UserError(
            f"Preset '{config.name}' is conditional but names no data.validation set to "
            "condition on."
        )
    inputs = read_condition_rows(
        data.validation,
        source_field=data.source_field,
        reference_field=data.target_field,
        split=data.validation_split,
        limit=n,
    )
    for i, reference in enumerate(inputs.references):
        if reference is None:
            raise UserError(
                f"Validation set {data.validation}, row {i}: no '{data.target_field}' reference "
                "to score against."
            )
    return inputs


def sample_counts(
    config: Config,
    settings: list[SamplingSetting],
    num_samples: int | None,
    available: int | None,
) -> dict[str, int]:
    """Samples per setting: --num-samples, else the setting's own; a conditional run has at
    most one sample per validation row (asking for more explicitly is an error)."""
    counts = {s.name: num_samples or s.num_samples for s in settings}
    if available is None:
        return counts
    if num_samples is not None and num_samples > available:
        raise UserError(
            f"--num-samples {num_samples} is more than the {available} rows of the validation "
            f"set {config.data.validation}."
        )
    return {name: min(n, available) for name, n in counts.items()}


# ----------------------------------------------------------------------------- running


@dataclass
class EvalRequest:
    """Everything `run_eval` needs besides its hooks."""

    checkpoint: str  # hub id, hub sub-path, local file or dir, run dir
    config: Config
    settings: list[SamplingSetting]
    out_dir: Path
    num_samples: int | None = None  # None: each setting's own num_samples
    seed: int = 0
    batch_size: int | None = None  # None: each setting's own batch_size
    precision: str = "auto"
    compile: bool = False
    tokenizer: str | None = None
    encoder: str | None = None  # None: the config's
    device: Any = "cpu"
    force: bool = False
    scorer: str = "gpt2-large"  # recorded in eval.json; the ScoreFn does the scoring
    metrics: list[str] | None = None  # scorer kinds (`--metrics`); None: the preset's own
    meta: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None  # every setting once per seed (mean +- standard error)
    grid: str = "per-sample"
    procs: Any = None  # distributed.Processes; None: this process alone
    # SampleJob's prompting fields (prompts or templates, hold, known_encoding), if any:
    # every setting's samples are then prompted or infilled alike.
    prompting: dict[str, Any] = field(default_factory=dict)


def run_eval(
    request: EvalRequest,
    score: ScoreFn,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
) -> dict[str, Any]:
    """Sample every setting (once per seed) into its own run dir, score them all, write
    and return eval.json.

    Every sample run is checked before any is sampled: one that is already finished with
    the same settings is reused and an unfinished one continues (a killed evaluation
    started again), one with other settings is an error. Under several processes the
    sampling and Gen PPL are shared and the main process writes eval.json.
    """

    log = log or (lambda message: None)
    progress = progress or no_progress
    config, out_dir = request.config, request.out_dir
    check_eval_out_dir(out_dir, request.settings, request.force, request.seeds)
    seeds = request.seeds if request.seeds is not None else [request.seed]
    by_seed = request.seeds is not None

    loaded = load_for_eval(
        request.checkpoint,
        config,
        request.tokenizer,
        request.device,
        bool(request.prompting),
        request.encoder,
    )
    procs = request.procs or Processes(device=next(loaded.model.parameters()).device)
    config = loaded.config  # the checkpoint's network inside the preset's settings
    inputs = None
    available = None
    if config.data.conditional:
        wanted = max(request.num_samples or s.num_samples for s in request.settings)
        inputs = validation_pairs(config, wanted)
        available = len(inputs.texts)
    counts = sample_counts(config, request.settings, request.num_samples, available)
    for setting in request.settings:
        if counts[setting.name] < setting.num_samples and request.num_samples is None:
            log(
                f"{setting.name}: {counts[setting.name]} samples, one per row of the validation "
                f"set {config.data.validation} (the setting asks for {setting.num_samples})"
            )

    resume = "never" if request.force else "auto"
    planned = []  # (setting, seed, run dir, job, run.json of a finished run or a plan)
    for setting in request.settings:
        n = counts[setting.name]
        for seed in seeds:
            run_dir = run_dir_for(out_dir, setting, seed if by_seed else None)
            job = SampleJob(
                setting=setting,
                num_samples=n,
                length=setting.length or config.data.max_length,
                seed=seed,
                batch_size=min(request.batch_size or setting.batch_size, n),
                precision=request.precision,
                compile=request.compile,
                conditions=inputs.texts[:n] if inputs is not None else None,
                references=inputs.references[:n] if inputs is not None else None,
                condition_ids=inputs.token_ids[:n] if inputs is not None else None,
                meta={"eval": {"preset": config.name, "setting": setting.name}, **request.meta},
                grid=request.grid,
                **request.prompting,
            )
            finished = None if request.force else job.finished(loaded, run_dir)
            planned.append(
                (setting, seed, run_dir, job, finished or job.plan(loaded, run_dir, resume))
            )

    runs: list[tuple[SamplingSetting, Path, dict[str, Any]]] = []
    seed_of: dict[str, int] = {}
    for setting, seed, run_dir, job, finished in planned:
        name = setting.name + (f" seed {seed}" if by_seed else "")
        if isinstance(finished, dict):
            log(f"{name}: reusing the finished samples in {run_dir}")
            info = finished
        else:
            if procs.is_main and request.force:  # old metrics describe replaced samples
                (run_dir / records.METRICS_FILE).unlink(missing_ok=True)
            done = f", resuming after {finished.done} done" if finished.done else ""
            if finished.damaged:
                done += f", resampling damaged {', '.join(finished.damaged)}"
            log(
                f"{name}: sampling {job.num_samples} x {job.length} tokens "
                f"({describe_sampler(setting)}{done}), "
                f"precision {job.precision_for(loaded).describe()}"
            )
            with progress(f"sampling {name}", finished.pending_samples, "samples") as advance:
                info = job.run(
                    loaded, run_dir, on_batch=advance, procs=procs, plan=finished, resume=resume
                )
        runs.append((setting, run_dir, info))
        seed_of[_key(run_dir)] = seed
    del loaded
    _free_accelerator_memory()

    by_file = score_runs(config, runs, score, request.metrics)
    rows = []
    for setting in request.settings:
        per_seed = [
            setting_row(config, s, run_dir, info, by_file[_key(run_dir)], request.metrics)
            for s, run_dir, info in runs
            if s.name == setting.name
        ]
        if by_seed:
            rows.append(seed_row(per_seed, [seed_of[_key(Path(r["run_dir"]))] for r in per_seed]))
        else:
            rows.extend(per_seed)
    summary = {
        "elfctl_version": __version__,
        "preset": config.name,
        "repo": request.checkpoint,
        "checkpoint": runs[0][2]["checkpoint"] if runs else None,
        "scorer": request.scorer,
        "seed": request.seed if not by_seed else None,
        "seeds": seeds if by_seed else None,
        "grid": request.grid,
        "processes": procs.world,
        "out_dir": str(out_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    if procs.is_main:
        records.atomic_write_json(out_dir / EVAL_FILE, summary)
    return summary


def seed_row(per_seed: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One setting's row over seeds: each metric's mean and standard error (stats.py),
    with the per-seed values and rows beside them."""
    first = per_seed[0]
    metrics = {}
    for name, entry in first["metrics"].items():
        values = [row["metrics"][name]["value"] for row in per_seed]
        known = [v for v in values if v is not None and math.isfinite(v)]
        mean, stderr = mean_stderr(known) if len(known) == len(values) else (None, None)
        metrics[name] = {**entry, "value": mean, "stderr": stderr, "per_seed": values}
    wall = sum(row["wall_seconds"] for row in per_seed)
    sampled = sum(row["samples_per_s"] * row["wall_seconds"] for row in per_seed)
    return {
        **{k: v for k, v in first.items() if k not in ("metrics", "run_dir")},
        "metrics": metrics,
        "seeds": seeds,
        "per_seed": [
            {
                "seed": seed,
                "metrics": {name: entry["value"] for name, entry in row["metrics"].items()},
                "wall_seconds": row["wall_seconds"],
                "samples_per_s": row["samples_per_s"],
                "run_dir": row["run_dir"],
            }
            for seed, row in zip(seeds, per_seed, strict=True)
        ],
        "wall_seconds": round(wall, 3),
        "samples_per_s": round(sampled / wall, 4) if wall > 0 else 0.0,
        "run_dir": str(Path(first["run_dir"]).parent),
    }


def score_runs(
    config: Config,
    runs: list[tuple[SamplingSetting, Path, dict[str, Any]]],
    score: ScoreFn,
    metrics: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run each scorer kind once over every run that needs it; records grouped by run dir."""
    by_file: dict[str, list[dict[str, Any]]] = {_key(run_dir): [] for _, run_dir, _ in runs}
    for kind in SCORER_METRICS:
        run_dirs = [d for s, d, _ in runs if kind in scorers_for(config, s, metrics)]
        if not run_dirs:
            continue
        inputs = [(d / records.SAMPLES_FILE, records.read_samples(d)) for d in run_dirs]
        for record in score(kind, inputs):
            by_file[_key(Path(record["file"]).parent)].append(record)
    return by_file


def _key(run_dir: Path) -> str:
    return str(run_dir.resolve())


def setting_row(
    config: Config,
    setting: SamplingSetting,
    run_dir: Path,
    info: dict[str, Any],
    metric_records: list[dict[str, Any]],
    kinds: list[str] | None = None,
) -> dict[str, Any]:
    """One row of the paper table: the sampler, n, each metric beside the paper's, speed."""
    metrics = {}
    for kind in scorers_for(config, setting, kinds):
        for name in SCORER_METRICS[kind]:
            metric = METRICS[name]
            found = [r for r in metric_records if r["metric"] == metric.record]
            value = found[-1]["values"].get(metric.value) if found else None
            metrics[name] = {
                "value": value,
                "paper": setting.paper.get(name),
                "paper_validation": setting.paper.get(f"{name}_validation"),
            }
    return {
        "preset": config.name,
        "setting": setting.name,
        "sampler": {
            "method": setting.method,
            "steps": setting.steps,
            "gamma": setting.gamma,
            "sc_cfg": setting.sc_cfg,
            "cfg": setting.cfg,
            "time_schedule": setting.time_schedule,
        },
        "n": info["num_samples"],
        "conditioned_on": config.data.validation if config.data.conditional else None,
        "metrics": metrics,
        "wall_seconds": info["wall_seconds"],
        "samples_per_s": info["samples_per_s"],
        "run_dir": str(run_dir),
    }


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
