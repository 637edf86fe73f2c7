"""Jobs over a model: resumable data-parallel sample runs, evaluation, sweeps, show, statistics."""

from __future__ import annotations

from elfctl.runs.evaluate import (
    METRICS,
    EvalRequest,
    check_eval_out_dir,
    load_for_eval,
    parse_metrics,
    run_eval,
    scorers_for,
    select_settings,
)
from elfctl.runs.sample_job import UNFINISHED_DIR, LoadedModel, SampleJob, load_for_sampling
from elfctl.runs.sample_request import (
    PreparedSample,
    SampleRequest,
    apply_overrides,
    check_request,
    default_num_samples,
    prepare_sample,
    run_sample,
)
from elfctl.runs.show import (
    PLOT_SUFFIXES,
    Trajectory,
    draw_trajectory,
    load_rows,
    pick,
    trajectory_of,
)
from elfctl.runs.stats import mean_stderr
from elfctl.runs.sweep import run_sweep

__all__ = [
    "EvalRequest",
    "LoadedModel",
    "METRICS",
    "PLOT_SUFFIXES",
    "PreparedSample",
    "SampleJob",
    "SampleRequest",
    "Trajectory",
    "UNFINISHED_DIR",
    "apply_overrides",
    "check_eval_out_dir",
    "check_request",
    "default_num_samples",
    "draw_trajectory",
    "load_for_eval",
    "load_for_sampling",
    "load_rows",
    "mean_stderr",
    "parse_metrics",
    "pick",
    "prepare_sample",
    "run_eval",
    "run_sample",
    "run_sweep",
    "scorers_for",
    "select_settings",
    "trajectory_of",
]
