"""`elfctl sweep`: sample and score one sampling setting at several step counts, then plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from elfctl.cli.app import app, console, handle_errors, out
from elfctl.cli.score_distribution import (
    MAUVE_MODEL_OPTION,
    NUM_REFERENCES_OPTION,
    REFERENCE_FIELD_OPTION,
    REFERENCES_OPTION,
)
from elfctl.errors import UserError

SWEEP_HELP = (
    "Sample and score one sampling setting at several step counts (and seeds): a table of "
    "Gen PPL, entropy and, with --references, MAUVE per step count (mean +- standard error "
    "over --seeds), and a PNG of quality against steps (pip install 'elfctl\\[plot]')."
    "\n\nEach (steps, seed) is an ordinary sample run dir under --out "
    "(steps-<N>/seed-<S>/), sampled as `elfctl sample` samples and scored as `score-ppl` / "
    "`score-mauve` score; sweep.json holds the table and sweep.png the plot."
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
        "gpt2-large", "--scorer", help="Gen PPL model: a causal LM hub id or local folder."
    ),
    score_batch_size: int = typer.Option(
        8, "--score-batch-size", min=1, help="Samples per scorer forward."
    ),
    references: str = REFERENCES_OPTION,
    reference_field: str = REFERENCE_FIELD_OPTION,
    num_references: int = NUM_REFERENCES_OPTION,
    mauve_model: str = MAUVE_MODEL_OPTION,
    paper: bool = typer.Option(
        False, "--paper", help="Overlay the paper's ELF-B Gen PPL at 8/16/32/64 steps."
    ),
    out_dir: Path = typer.Option(None, "--out", help="Sweep dir (default outputs/sweep-<time>)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an earlier sweep in --out."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU), bf16 or fp32."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even if a GPU is present."),
    json_out: bool = typer.Option(
        False, "--json", help="Print sweep.json on stdout (the table goes to stderr)."
    ),
) -> None:
    """Quality against sampling steps (help text: SWEEP_HELP)."""
    import dataclasses
    import time

    from elfctl.cli.app import quiet_unless_main
    from elfctl.cli.progress import progress
    from elfctl.config import sampling_setting
    from elfctl.distributed import processes
    from elfctl.runs import load_for_sampling, sweep
    from elfctl.sampling import check_sampler, check_schedule

    check_sampler(sampler), check_schedule(time_schedule)
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, got '{precision}'.")
    axes = sweep.parse_axes(steps, forwards, samplers, sampler)
    step_counts, budgets, sampler_list = axes
    seed_list = parse_seeds(seeds)
    sweep.require_matplotlib()  # before hours of sampling, not after
    out_dir = out_dir or Path("outputs") / time.strftime("sweep-%Y%m%d-%H%M%S")
    cells = sweep.plan_cells(sampler or "sde", step_counts, sampler_list, budgets)
    sweep.check_sweep_out_dir(out_dir, cells, seed_list, force)
    reference_texts = None
    if references is not None:
        from elfctl.cli.score_distribution import load_references
        from elfctl.scoring import require_mauve

        require_mauve()  # before the sampling, not after
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
    chosen = dataclasses.replace(
        sampling_setting(loaded.config, setting),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    n = num_samples or chosen.num_samples
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
        score=_scorer(
            scorer,
            score_batch_size,
            cpu,
            reference_texts,
            references,
            mauve_model or scorer,
            procs.is_main,
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
        log=lambda message: console.print(message, highlight=False),
        procs=procs,
        samplers=sampler_list,
        budgets=budgets,
    )
    if not procs.is_main:
        return
    png = sweep.plot(summary, out_dir / sweep.PLOT_FILE)
    report(summary, json_out)
    console.print(f"wrote {out_dir / sweep.SWEEP_FILE} and {png}", highlight=False)


def parse_seeds(text: str) -> list[int]:
    from elfctl.runs import parse_int_list

    return parse_int_list(text, "--seeds")


def _scorer(model, batch_size, cpu, reference_texts, references_name, mauve_model, write):
    """The score-ppl / score-mauve functions, so a sweep's numbers are theirs (Gen PPL is
    shared by the processes; MAUVE runs on each and only the main one writes)."""
    from elfctl.cli.score import score_ppl_files
    from elfctl.cli.score_distribution import score_mauve_files
    from elfctl.scoring import DEFAULT_MAX_LENGTH

    def score(kind: str, inputs):
        if kind == "gen_ppl":
            return score_ppl_files(
                inputs, model, batch_size=batch_size, max_length=DEFAULT_MAX_LENGTH, cpu=cpu
            )
        if kind == "mauve":
            return score_mauve_files(
                inputs,
                reference_texts,
                mauve_model,
                references_name=references_name,
                batch_size=batch_size,
                cpu=cpu,
                write=write,
            )
        raise ValueError(f"unknown scorer kind {kind!r}")

    return score


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
