"""Step sweeps: sample and score sampling settings at several step counts (and seeds).

A sweep directory:

    <dir>/sweep.json                      settings and one row per (sampler, step count)
    <dir>/sweep.png                       quality against forwards, a line per sampler (`plot`)
    <dir>/steps-<N>/seed-<S>/samples.jsonl, run.json, metrics.jsonl
                                          one ordinary sample run dir per (steps, seed)
    <dir>/<sampler>/steps-<N>/seed-<S>/   the same, when the sweep names `samplers`

Samplers are an axis (`samplers`, names of `sampling.SOLVERS`), and so is the cost: each row
records its sampling `forwards` per sample (a Heun step costs two), and a sweep given forward
`budgets` instead of step counts gives each sampler the most steps that fit each budget, so
that samplers are compared at equal forwards.

Each row of sweep.json: `sampler`, `steps`, `forwards` (and `budget`), `n` (samples per
seed), `seeds`, `run_dirs`, and under
`metrics` one entry per metric (`gen_ppl`, `entropy`, `mauve` when references were given):
`values` (one per seed, in seed order), `mean` and `stderr` (`stats.mean_stderr`; the error
is 0 for one seed). `paper` holds the overlaid reference curve when asked for.

Sampling is `runs.SampleJob` (what `elfctl sample` runs) and scoring is a hook (`ScoreFn`,
as in evaluate.py) that the CLI fills with the functions behind `score-ppl` and
`score-mauve`, so a sweep's numbers are exactly those commands' numbers. `load(dir)` and
`plot(summary, path)` let other commands (`elfctl show`) open a sweep. Never prints.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elfctl import records
from elfctl.config import SamplingSetting
from elfctl.distributed import Processes
from elfctl.errors import UserError
from elfctl.runs.sample_job import LoadedModel, SampleJob
from elfctl.runs.stats import mean_stderr
from elfctl.sampling.solvers import forwards_for, solver
from elfctl.scoring import LogFn, ProgressFn, ScoreFn, no_progress
from elfctl.version import __version__

SWEEP_FILE = "sweep.json"
PLOT_FILE = "sweep.png"
PLOT_EXTRA_HINT = "pip install 'elfctl[plot]'"

# The paper's ELF-B (OWT) Gen PPL at 8 / 16 / 32 / 64 sampling steps, for `--paper`.
PAPER_ELF_B = {"label": "ELF-B, paper", "gen_ppl": {8: 67.32, 16: 33.66, 32: 24.08, 64: 19.72}}

# metric -> (the metrics.jsonl record it is read from, the key in its values)
SWEEP_METRICS = {
    "gen_ppl": ("gen_ppl", "ppl"),
    "entropy": ("gen_ppl", "entropy"),
    "mauve": ("mauve", "mauve"),
}


# ----------------------------------------------------------------------------- planning


def run_dir(out_dir: Path, steps: int, seed: int, sampler: str | None = None) -> Path:
    """A cell's sample run dir; under a folder per sampler when the sweep names samplers."""
    base = out_dir if sampler is None else out_dir / sampler
    return base / f"steps-{steps}" / f"seed-{seed}"


@dataclass(frozen=True)
class Cell:
    """One (sampler, step count) of a sweep; `folder` is None for a one-sampler sweep."""

    sampler: str
    steps: int
    budget: int | None = None
    folder: str | None = None

    @property
    def forwards(self) -> int:
        return forwards_for(self.sampler, self.steps)


def plan_cells(
    method: str,
    steps: list[int] | None = None,
    samplers: list[str] | None = None,
    budgets: list[int] | None = None,
) -> list[Cell]:
    """The sweep's cells: each sampler (default: `method`) at each step count, or at the most
    steps within each forward budget (a budget two step counts share is swept once)."""
    if (steps is None) == (budgets is None):
        raise ValueError("give step counts or forward budgets")
    names = samplers or [method]
    for name in names:
        solver(name)  # an unknown name is one sentence before any work
    cells: list[Cell] = []
    for name in names:
        folder = name if samplers else None
        if budgets is None:
            cells += [Cell(name, n, None, folder) for n in steps]
            continue
        seen: set[int] = set()
        for budget in budgets:
            n = solver(name).steps_for(budget)
            if n not in seen:
                seen.add(n)
                cells.append(Cell(name, n, budget, folder))
    return cells


def describe_cells(cells: list[Cell]) -> str:
    """'steps 8, 16' for one sampler; 'sde 8, 16; heun 4, 8 steps' for several."""
    by_sampler: dict[str, list[int]] = {}
    for cell in cells:
        by_sampler.setdefault(cell.sampler, []).append(cell.steps)
    if len(by_sampler) == 1:
        return "steps " + ", ".join(map(str, next(iter(by_sampler.values()))))
    parts = [f"{name} {', '.join(map(str, steps))}" for name, steps in by_sampler.items()]
    return "; ".join(parts) + " steps"


def check_sweep_out_dir(
    out_dir: Path, cells: list[Cell] | list[int], seeds: list[int], force: bool
) -> None:
    """Refuse (before any work) to overwrite an earlier sweep without `force`; `cells` may be
    plain step counts (a one-sampler sweep)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    if force:
        return
    for name in (SWEEP_FILE, PLOT_FILE):
        if (out_dir / name).exists():
            raise UserError(f"{out_dir} already holds {name}; pass --force or another --out.")
    for cell in cells:
        steps, folder = (cell, None) if isinstance(cell, int) else (cell.steps, cell.folder)
        for seed in seeds:
            directory = run_dir(out_dir, steps, seed, folder)
            for name in (records.SAMPLES_FILE, records.METRICS_FILE):
                if (directory / name).exists():
                    raise UserError(
                        f"{directory} already holds {name}; pass --force or another --out."
                    )


# ----------------------------------------------------------------------------- running


def run_sweep(
    loaded: LoadedModel,
    setting: SamplingSetting,
    *,
    steps: list[int] | None = None,
    seeds: list[int],
    out_dir: Path,
    score: ScoreFn,
    kinds: list[str],
    num_samples: int,
    batch_size: int,
    length: int,
    precision: str = "auto",
    compile: bool = False,
    force: bool = False,
    paper: bool = False,
    info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
    procs=None,
    samplers: list[str] | None = None,
    budgets: list[int] | None = None,
) -> dict[str, Any]:
    """Sample `setting` at each step count and seed, score every run with each scorer kind
    (`gen_ppl`, `mauve`) once over all runs, write and return sweep.json (no plot).

    `samplers` sweeps each of them in place of the setting's own method (each in its own
    folder); `budgets` (forwards per sample) replaces `steps`: each sampler gets the most
    steps whose forwards fit each budget (`plan_cells`).

    Under several processes (`procs`, a `distributed.Processes`) each samples its share of
    every run's batches (the samples do not depend on the split) and the main process
    writes sweep.json."""

    procs = procs or Processes(device=next(loaded.model.parameters()).device)

    log = log or (lambda message: None)
    progress = progress or no_progress
    cells = plan_cells(setting.method, steps, samplers, budgets)
    check_sweep_out_dir(out_dir, cells, seeds, force)
    runs: list[tuple[Cell, int, Path, dict[str, Any]]] = []
    for cell in cells:
        for seed in seeds:
            directory = run_dir(out_dir, cell.steps, seed, cell.folder)
            if force and procs.is_main:  # old metrics describe samples about to be replaced
                (directory / records.METRICS_FILE).unlink(missing_ok=True)
            job = SampleJob(
                setting=dataclasses.replace(setting, steps=cell.steps, method=cell.sampler),
                num_samples=num_samples,
                length=length,
                seed=seed,
                batch_size=min(batch_size, num_samples),
                precision=precision,
                compile=compile,
                meta={"sweep": {"steps": cell.steps, "seed": seed, "sampler": cell.sampler}},
            )
            what = f"{cell.sampler} {cell.steps} steps ({cell.forwards} forwards), seed {seed}"
            log(f"{what}: sampling {num_samples} x {length} tokens")
            with progress(f"sampling {what}", num_samples, "samples") as adv:
                resume = "never" if force else "auto"
                run_info = job.run(loaded, directory, on_batch=adv, procs=procs, resume=resume)
            if run_info.get("resampled_batches"):
                log(f"resampled damaged batch file(s): {', '.join(run_info['resampled_batches'])}")
            runs.append((cell, seed, directory, run_info))

    by_dir: dict[str, list[dict[str, Any]]] = {_key(d): [] for _, _, d, _ in runs}
    inputs = [(d / records.SAMPLES_FILE, records.read_samples(d)) for _, _, d, _ in runs]
    for kind in kinds:
        for record in score(kind, inputs):
            by_dir[_key(Path(record["file"]).parent)].append(record)

    rows = []
    for cell in cells:
        seed_runs = [(seed, d, i) for c, seed, d, i in runs if c == cell]
        row = summarise_steps(cell.steps, seed_runs, by_dir, kinds)
        rows.append({"sampler": cell.sampler, "forwards": cell.forwards, **row})
        if cell.budget is not None:
            rows[-1]["budget"] = cell.budget
    summary = {
        "elfctl_version": __version__,
        **(info or {}),
        "sampler": _sampler(setting),
        "samplers": samplers or [setting.method],
        "steps": steps,
        "budgets": budgets,
        "seeds": seeds,
        "num_samples": num_samples,
        "length": length,
        "metrics": [m for m, (kind, _) in SWEEP_METRICS.items() if kind in kinds],
        "out_dir": str(out_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "paper": PAPER_ELF_B if paper else None,
    }
    if procs.is_main:
        records.atomic_write_json(out_dir / SWEEP_FILE, summary)
    return summary


def summarise_steps(
    n_steps: int,
    seed_runs: list[tuple[int, Path, dict[str, Any]]],
    by_dir: dict[str, list[dict[str, Any]]],
    kinds: list[str],
) -> dict[str, Any]:
    """One sweep.json row: each metric per seed, and its mean and standard error."""
    metrics = {}
    for name, (record_metric, key) in SWEEP_METRICS.items():
        if record_metric not in kinds:
            continue
        values = []
        for _, directory, _ in seed_runs:
            found = [r for r in by_dir[_key(directory)] if r["metric"] == record_metric]
            value = found[-1]["values"].get(key) if found else None
            values.append(value)
        finite = [v for v in values if v is not None]
        mean, stderr = mean_stderr(finite) if len(finite) == len(values) else (None, None)
        metrics[name] = {"values": values, "mean": mean, "stderr": stderr}
    return {
        "steps": n_steps,
        "n": seed_runs[0][2]["num_samples"],
        "seeds": [seed for seed, _, _ in seed_runs],
        "run_dirs": [str(directory) for _, directory, _ in seed_runs],
        "metrics": metrics,
        "wall_seconds": sum(info["wall_seconds"] for _, _, info in seed_runs),
    }


def _key(directory: Path) -> str:
    return str(directory.resolve())


def _sampler(setting: SamplingSetting) -> dict[str, Any]:
    return {
        "setting": setting.name,
        "method": setting.method,
        "gamma": setting.gamma,
        "sc_cfg": setting.sc_cfg,
        "cfg": setting.cfg,
        "time_schedule": setting.time_schedule,
    }


# ----------------------------------------------------------------------------- reading, plotting


def load(directory: str | Path) -> dict[str, Any]:
    """The sweep.json of a sweep directory (or the file itself)."""
    path = Path(directory)
    path = path / SWEEP_FILE if path.is_dir() else path
    if not path.exists():
        raise UserError(f"{path}: no such file (not a sweep directory).")
    fix = "run the sweep again with --force to write it anew."
    summary = records.read_json_state(path, fix)
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
        raise UserError(f"{path}: not a sweep summary (no rows).")
    return summary


def require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"Plotting needs matplotlib: {PLOT_EXTRA_HINT}.") from None
    return Figure


def plot(summary: dict[str, Any], path: str | Path, paper: bool | None = None) -> Path:
    """Quality against sampling forwards as a PNG, one line per sampler: Gen PPL (left axis)
    and entropy (right axis, dashed where there are several samplers), with standard-error
    bars over seeds; MAUVE in a panel below when the sweep has it; the paper's curve
    overlaid on the Gen PPL axis when `paper` (default: if the sweep asked). For the
    official samplers (one forward a step) forwards are steps."""
    Figure = require_matplotlib()
    groups = _by_sampler(summary)
    rows = summary["rows"]
    has_mauve = any("mauve" in row["metrics"] for row in rows)
    overlay = summary.get("paper") if paper is None else (PAPER_ELF_B if paper else None)

    figure = Figure(figsize=(7.0, 6.5 if has_mauve else 4.5), layout="constrained")
    axes = figure.subplots(2 if has_mauve else 1, 1, sharex=True, squeeze=False)[:, 0]
    ppl_axis = axes[0]
    entropy_axis = ppl_axis.twinx()
    single = len(groups) == 1
    for k, (name, group) in enumerate(groups):
        color = "C0" if single else f"C{k}"
        prefix = "" if single else f"{name} "
        _series(ppl_axis, group, "gen_ppl", color, "o", f"{prefix}Gen PPL")
        e_color, style = ("C1", "-") if single else (color, "--")
        _series(entropy_axis, group, "entropy", e_color, "^", f"{prefix}entropy", style)
        if has_mauve:
            _series(axes[1], group, "mauve", "C2" if single else color, "D", f"{prefix}MAUVE")
    # Budgets when the sweep has them (a Heun line sits at 7 and 15 beside 8 and 16).
    ticks = {row.get("budget", _forwards(row)) for row in rows}
    if overlay:
        points = sorted((int(k), v) for k, v in overlay["gen_ppl"].items())
        x, y = zip(*points, strict=True)
        ppl_axis.plot(x, y, "s--", color="C0", alpha=0.45, label=overlay["label"])
        ticks.update(x)
    if single:
        ppl_axis.tick_params(axis="y", colors="C0")
        entropy_axis.tick_params(axis="y", colors="C1")
        if has_mauve:
            axes[1].tick_params(axis="y", colors="C2")
    ppl_axis.set_yscale("log")  # Gen PPL falls by multiples as steps double
    _plain_log_labels(ppl_axis)
    ppl_axis.set_ylabel("Gen PPL (lower is better, log scale)", color="C0" if single else "k")
    entropy_label = "unigram entropy (nats)" + ("" if single else ", dashed")
    entropy_axis.set_ylabel(entropy_label, color="C1" if single else "k")
    handles = ppl_axis.get_legend_handles_labels()
    more = entropy_axis.get_legend_handles_labels()
    ppl_axis.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize=7)
    if has_mauve:
        axes[1].set_ylabel("MAUVE (higher is better)", color="C2" if single else "k")
        if not single:
            axes[1].legend(fontsize=7)
    bottom = axes[-1]
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(sorted(ticks), [str(n) for n in sorted(ticks)])
    bottom.minorticks_off()
    bottom.set_xlabel("sampling forwards per sample (= steps for ode and sde)")
    sampler = summary.get("sampler", {})
    seeds = summary.get("seeds") or [None]
    if single:
        method = groups[0][0]
        gamma = f" gamma {sampler['gamma']:g}" if method.endswith("sde") else ""
        what = f"{method.upper()}{gamma}"
    else:
        what = f"{len(groups)} samplers (gamma {sampler.get('gamma', 0):g} where churned)"
    title = (
        f"{_short(summary.get('repo'))}: {what}, "
        f"n = {summary.get('num_samples')} x {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, "
        f"scorer {_short(summary.get('scorer'))}"
    )
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return records.atomic_write_bytes(path, buffer.getvalue())


def _forwards(row: dict[str, Any]) -> int:
    """A row's forwards per sample (sweeps written before samplers were an axis: steps)."""
    return row.get("forwards", row["steps"])


def _by_sampler(summary: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rows grouped by sampler, in the sweep's order (older sweeps: one group)."""
    default = summary.get("sampler", {}).get("method", "sde")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in summary["rows"]:
        groups.setdefault(row.get("sampler", default), []).append(row)
    return list(groups.items())


def _short(name: str | None) -> str:
    """A local path by its last part (a title has no room for /home/...); hub ids as they are."""
    if not name:
        return "?"
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def _plain_log_labels(axis) -> None:
    """'7', '8', '10' on a log axis instead of 7x10^0; minor ticks labelled too when the axis
    spans less than a factor of 20 (else they would crowd)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.yaxis.set_major_formatter(plain)
    low, high = axis.get_ylim()
    narrow = low > 0 and high / low < 20
    axis.yaxis.set_minor_formatter(plain if narrow else NullFormatter())


def _series(
    axis,
    rows: list[dict[str, Any]],
    name: str,
    color: str,
    marker: str,
    label: str,
    style: str = "-",
):
    points = [
        (_forwards(row), row["metrics"][name]["mean"], row["metrics"][name]["stderr"])
        for row in rows
        if name in row["metrics"] and row["metrics"][name]["mean"] is not None
    ]
    if not points:
        return
    x, y, err = zip(*points, strict=True)
    axis.errorbar(
        x, y, yerr=err, color=color, marker=marker, linestyle=style, capsize=3, label=label
    )
