"""`elfctl sweep`: sample and score one sampling setting at several step counts, then plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from elfctl.cli.app import app, console, handle_errors, log, out
from elfctl.cli.options import (
    Compile,
    Cpu,
    Precision,
    check_choice,
    check_precision,
    flag,
    json_flag,
    md,
    parse_int_list,
)
from elfctl.cli.score_distribution import (
    MAUVE_MODEL_OPTION,
    NUM_REFERENCES_OPTION,
    REFERENCE_FIELD_OPTION,
    REFERENCES_OPTION,
)
from elfctl.errors import UserError

SWEEP_HELP = md(
    "Sample and score one sampling setting at several step counts (and seeds): a table of "
    "Gen PPL, entropy and, with --references, MAUVE per step count (mean +- standard error "
    "over --seeds), and a PNG of quality against steps (pip install 'elfctl[plot]')."
    "\n\nEach (steps, seed) is an ordinary sample run dir under --out "
    "(steps-<N>/seed-<S>/), sampled as `elfctl sample` samples and scored as `score-ppl` / "
    "`score-mauve` score; sweep.json holds the table and sweep.png the plot. The scorer "
    "defaults to the model's eval.scorer: the test bed's own (testbed:grammar/scorer, "
    "offline) for a test-bed model, gpt2-large for the official ones."
)


@app.command(
    "sweep",
    help=SWEEP_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl sweep --repo embedded-language-flows/ELF-B-owt-torch --steps 8,16,32,64 "
        "--paper\n\n"
        "  elfctl sweep --repo runs/tiny --steps 4,8,16,32,64 --scorer ./tiny-gpt2 "
        "--references testbed:grammar/validation\n\n"
        "  elfctl sweep --repo runs/my-run --sampler ode --seeds 0,1,2 --num-samples 200\n\n"
        "  elfctl sweep --repo runs/tiny --samplers sde,heun,dpm2m --forwards 4,8,16,32"
    ),
)
@handle_errors
def sweep_command(
    repo: str = typer.Option(
        ..., "--repo", help="Hub repo id, hub sub-path, local file or directory, or a run dir."
    ),
    steps: str = typer.Option("8,16,32,64", "--steps", help="Step counts, comma-separated."),
    preset: str = typer.Option(
        None, "--preset", help="Preset for official checkpoints (tokenizer, sampling defaults)."
    ),
    setting: str = typer.Option(
        None, "--setting", help="Named sampling setting of the preset to start from."
    ),
    sampler: str = typer.Option(
        None, "--sampler", help="ode or sde (official), or heun, dpm2m... (docs/solvers.md)."
    ),
    gamma: float = typer.Option(None, "--gamma", min=0.0, help="SDE churn."),
    sc_cfg: float = typer.Option(None, "--sc-cfg", help="Self-conditioning guidance scale."),
    cfg: float = typer.Option(None, "--cfg", help="Classifier-free guidance scale."),
    time_schedule: str = typer.Option(
        None, "--time-schedule", help="logit_normal (official), uniform, quantile, karras..."
    ),
    samplers: str = typer.Option(
        None, "--samplers", help="Samplers as an axis, e.g. sde,heun,dpm2m (docs/solvers.md)."
    ),
    forwards: str = typer.Option(
        None, "--forwards", help="Forward budgets in place of --steps, e.g. 4,8,16,32."
    ),
    seeds: str = typer.Option("0", "--seeds", help="Seeds, comma-separated (e.g. 0,1,2,3,4,5)."),
    num_samples: int = typer.Option(
        None, "--num-samples", min=1, help="Samples per (steps, seed) (default: the setting's)."
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward."),
    length: int = typer.Option(None, "--length", min=1, help="Sequence length in tokens."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="ELF tokenizer hub id or folder."),
    scorer: str = typer.Option(
        None,
        "--scorer",
        help="Gen PPL model: a causal LM hub id, local folder or testbed:grammar/scorer "
        "(default: the model's eval.scorer).",
    ),
    score_batch_size: int = typer.Option(
        8, "--score-batch-size", min=1, help="Samples per scorer forward."
    ),
    references: str = REFERENCES_OPTION,
    reference_field: str = REFERENCE_FIELD_OPTION,
    num_references: int = NUM_REFERENCES_OPTION,
    mauve_model: str = MAUVE_MODEL_OPTION,
    paper: bool = flag("--paper", help="Overlay the paper's ELF-B Gen PPL at 8/16/32/64 steps."),
    out_dir: Path = typer.Option(None, "--out", help="Sweep dir (default outputs/sweep-<time>)."),
    force: bool = flag("--force", help="Overwrite an earlier sweep in --out."),
    precision: Precision = "auto",
    compile: Compile = False,
    cpu: Cpu = False,
    json_out: bool = json_flag("sweep.json"),
) -> None:
    """Quality against sampling steps (help text: SWEEP_HELP)."""
    import time

    from elfctl.cli.app import quiet_unless_main
    from elfctl.cli.progress import progress
    from elfctl.config import default_scorer, sampling_setting
    from elfctl.distributed import processes
    from elfctl.runs import apply_overrides, load_for_sampling, sweep
    from elfctl.sampling import SAMPLER_NAMES, check_schedule
    from elfctl.scoring import Scoring, check_scorer, make_scorer

    check_choice("--sampler", sampler, SAMPLER_NAMES), check_schedule(time_schedule)
    check_precision(precision)
    step_counts, budgets, sampler_list = parse_axes(steps, forwards, samplers, sampler)
    seed_list = parse_int_list(seeds, "--seeds", 0, "seed")
    for name, option in ((scorer, "--scorer"), (mauve_model, "--mauve-model")):
        if name is not None:
            check_scorer(name, option)
    sweep.require_matplotlib()  # before hours of sampling, not after
    out_dir = out_dir or Path("outputs") / time.strftime("sweep-%Y%m%d-%H%M%S")
    cells = sweep.plan_cells(sampler or "sde", step_counts, sampler_list, budgets)
    sweep.check_sweep_out_dir(out_dir, cells, seed_list, force)
    reference_texts = None
    if references is not None:
        from elfctl.cli.score_distribution import load_references

        reference_texts = load_references(references, reference_field, None, num_references)

    procs = processes(cpu)  # under accelerate launch, each process samples a share
    quiet_unless_main(procs)
    device = procs.device
    loaded = load_for_sampling(repo, preset, tokenizer, device)
    if loaded.config.data.conditional:
        raise UserError(
            f"{repo} is a conditional model; sweep samples unconditionally and scores Gen PPL, "
            "so evaluate a conditional model with eval and a config naming one setting per step "
            "count instead."
        )
    overrides = dict(
        method=sampler, gamma=gamma, sc_cfg=sc_cfg, cfg=cfg, time_schedule=time_schedule
    )
    chosen = apply_overrides(sampling_setting(loaded.config, setting), overrides)
    n = num_samples or chosen.num_samples
    scorer = scorer or default_scorer(loaded.config)
    check_scorer(scorer)
    kinds = ["gen_ppl"] + (["mauve"] if reference_texts is not None else [])
    console.print(
        f"sweeping {repo}: {sweep.describe_cells(cells)} x seeds "
        f"{', '.join(map(str, seed_list))}, {n} samples each, on {device} -> {out_dir}",
        highlight=False,
    )
    summary = sweep.run_sweep(
        loaded,
        chosen,
        steps=step_counts,
        seeds=seed_list,
        out_dir=out_dir,
        score=make_scorer(
            Scoring(
                scorer=scorer,
                batch_size=score_batch_size,
                procs=procs,
                references=reference_texts,
                references_name=references,
                mauve_model=mauve_model,
                progress=progress,
                log=log,
            )
        ),
        kinds=kinds,
        num_samples=n,
        batch_size=batch_size or chosen.batch_size,
        length=length or chosen.length or loaded.config.data.max_length,
        precision=precision,
        compile=compile,
        force=force,
        paper=paper,
        info={"repo": repo, "scorer": scorer, "references": references},
        progress=progress,
        log=log,
        procs=procs,
        samplers=sampler_list,
        budgets=budgets,
    )
    if not procs.is_main:
        return
    png = sweep.plot(summary, out_dir / sweep.PLOT_FILE)
    report(summary, json_out)
    console.print(f"wrote {out_dir / sweep.SWEEP_FILE} and {png}", highlight=False)


def parse_axes(
    steps: str, forwards: str | None, samplers: str | None, sampler: str | None
) -> tuple[list[int] | None, list[int] | None, list[str] | None]:
    """(step counts or None, forward budgets or None, samplers or None): --forwards replaces
    --steps; --samplers (names of the sampling registry) and --sampler exclude each other."""
    from elfctl.sampling import SAMPLER_NAMES

    if samplers is not None and sampler is not None:
        raise UserError("--sampler sets one sampler and --samplers several: pass one of them.")
    names = None
    if samplers is not None:
        names = [name.strip() for name in samplers.split(",")]
        if len(set(names)) != len(names):
            raise UserError(f"--samplers names a sampler twice: '{samplers}'.")
        for name in names:
            check_choice("--samplers", name, SAMPLER_NAMES)
    if forwards is not None:
        return None, parse_int_list(forwards, "--forwards", 1, "forward budget"), names
    return parse_int_list(steps, "--steps", 1, "step count"), None, names


def cell(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """'24.08' for one seed, '24.08 +- 0.31' for several; '-' when missing."""
    if entry is None or entry["mean"] is None or not math.isfinite(entry["mean"]):
        return "-"
    if len(entry["values"]) == 1:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['stderr']:.{digits}f}"


def report(summary: dict[str, Any], json_out: bool) -> None:
    """The sweep's table (stdout, or stderr under --json) and, under --json, sweep.json."""
    from rich.table import Table

    names = summary["metrics"]
    labels = {"gen_ppl": "Gen PPL", "entropy": "entropy", "mauve": "MAUVE"}
    paper = (summary.get("paper") or {}).get("gen_ppl", {})
    table = Table(title=f"elfctl sweep: {summary.get('repo')} (scorer {summary.get('scorer')})")
    several = len(summary.get("samplers") or []) > 1
    if several:
        table.add_column("sampler")
    table.add_column("steps", justify="right")
    table.add_column("forwards", justify="right")
    table.add_column("n", justify="right")
    for name in names:
        table.add_column(labels[name], justify="right")
    if paper:
        table.add_column("paper Gen PPL", justify="right")
    table.add_column("wall s", justify="right")
    for row in summary["rows"]:
        cells = [cell(row["metrics"].get(name), 3 if name == "mauve" else 2) for name in names]
        if paper:  # the paper's curve is the official SDE's (one forward a step)
            value = paper.get(str(row["steps"]), paper.get(row["steps"]))
            value = value if row.get("sampler", "sde") == "sde" else None
            cells.append("-" if value is None else f"{value:g}")
        seeds = len(row["seeds"])
        table.add_row(
            *([row.get("sampler", "")] if several else []),
            str(row["steps"]),
            str(row.get("forwards", row["steps"])),
            f"{row['n']} x {seeds}" if seeds > 1 else str(row["n"]),
            *cells,
            f"{row['wall_seconds']:.1f}",
        )
    screen = console if json_out else out
    screen.print(table)
    if json_out:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
