"""`elfctl eval`: sample + score every official setting of a preset, one paper-table row each."""

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
    parse_int_list,
)
from elfctl.cli.sample import (
    ENCODER_OPTION,
    HOLD_OPTION,
    INFILL_OPTION,
    KNOWN_ENCODING_OPTION,
    PROMPT_OPTION,
    PROMPTS_FILE_OPTION,
    TOKENIZER_OPTION,
    prompting_fields,
)
from elfctl.cli.score_distribution import (
    MAUVE_MODEL_OPTION,
    NUM_REFERENCES_OPTION,
    REFERENCE_FIELD_OPTION,
    REFERENCES_OPTION,
)
from elfctl.errors import UserError

LOG_WIDTH = 400  # the table's width limit when stdout is not a terminal

EVAL_HELP = (
    "Sample and score every official sampling setting of a preset: one row of the paper's "
    "table per setting, our number beside the paper's."
    "\n\nUnconditional presets (owt-*) are scored with Gen PPL + entropy under --scorer; "
    "conditional presets are sampled on the first n rows of their validation set and scored "
    "with BLEU (de-en) or ROUGE (xsum) against its references, so the paper's validation "
    "number is shown first. --metrics replaces that choice: ppl, bleu, rouge, mauve (needs "
    "--references) and diversity (dist-4, rep-4, self-BLEU; tokens of --scorer). Each "
    "setting gets its own sample run dir under --out "
    "(samples.jsonl, run.json, metrics.jsonl); eval.json there holds the summary."
    "\n\nWhat is evaluated: --preset NAME takes that preset's data (the validation set of "
    "a conditional preset) and sampling settings, with the checkpoint's own network; "
    "--config FILE a config file's; with neither, a run dir (or a checkpoint of ours) is "
    "evaluated with the config.yaml it was trained with. The scorer defaults to the "
    "config's eval.scorer: the test bed's own scorer (testbed:grammar/scorer, offline) for "
    "the tiny preset and gpt2-large for the official ones."
)


@app.command(
    "eval",
    help=EVAL_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl eval --preset owt-b --repo embedded-language-flows/ELF-B-owt-torch\n\n"
        "  elfctl eval --preset owt-m --repo embedded-language-flows/ELF-M-owt-torch "
        "--setting sde-64\n\n"
        "  elfctl eval --preset de-en-b --repo embedded-language-flows/ELF-B-de-en-torch --json\n\n"
        "  elfctl eval --preset owt-b --repo embedded-language-flows/ELF-B-owt-torch "
        "--setting sde-32 --seeds 0,1,2,3,4,5\n\n"
        "  accelerate launch --num_processes 8 -m elfctl eval --preset owt-b --repo ...\n\n"
        "  elfctl eval --config my-run.yaml --repo runs/my-run --out outputs/eval-my-run\n\n"
        "  elfctl eval --repo runs/tiny --num-samples 64   # the run's own config.yaml"
    ),
)
@handle_errors
def eval_command(
    repo: str = typer.Option(
        ..., "--repo", help="Hub repo id, hub sub-path, local file or directory, or a run dir."
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="Preset whose data and settings to run (owt-b...; default: the run's own "
        "config.yaml).",
    ),
    config_file: Path = typer.Option(
        None,
        "--config",
        help="YAML config (over --preset) naming its own data and sampling settings.",
    ),
    settings: list[str] = typer.Option(
        None, "--setting", help="Run only this setting (repeatable; default: every one)."
    ),
    num_samples: int = typer.Option(
        None, "--num-samples", min=1, help="Samples per setting (default: the setting's own)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed, the same for every setting."),
    seeds: str = typer.Option(
        None,
        "--seeds",
        help=(
            "Comma-separated seeds, e.g. 0,1,2,3,4,5: every setting is sampled and scored once "
            "per seed, and reported as mean +- standard error (per seed with --json)."
        ),
    ),
    grid: str = typer.Option(
        "per-sample",
        "--grid",
        help="per-sample time grids (default) or per-batch (the official port's).",
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward."),
    out_dir: Path = typer.Option(
        None, "--out", help="Evaluation dir (default outputs/eval-<preset>-<time>)."
    ),
    scorer: str = typer.Option(
        None,
        "--scorer",
        help="Gen PPL model: a causal LM hub id, local folder or testbed:grammar/scorer "
        "(default: the config's eval.scorer).",
    ),
    score_batch_size: int = typer.Option(
        8, "--score-batch-size", min=1, help="Samples per Gen PPL forward."
    ),
    metrics: str = typer.Option(
        None,
        "--metrics",
        help="Scorers to run, comma-separated: ppl, bleu, rouge, mauve, diversity "
        "(default: the preset's).",
    ),
    references: str = REFERENCES_OPTION,
    reference_field: str = REFERENCE_FIELD_OPTION,
    num_references: int = NUM_REFERENCES_OPTION,
    mauve_model: str = MAUVE_MODEL_OPTION,
    tokenizer: str = TOKENIZER_OPTION,
    encoder: str = ENCODER_OPTION,
    precision: Precision = "auto",
    compile: Compile = False,
    cpu: Cpu = False,
    force: bool = flag("--force", help="Overwrite an earlier evaluation in --out."),
    json_out: bool = json_flag("eval.json"),
    prompt: list[str] = PROMPT_OPTION,
    prompts_file: Path = PROMPTS_FILE_OPTION,
    infill: list[str] = INFILL_OPTION,
    hold: str = HOLD_OPTION,
    known_encoding: str = KNOWN_ENCODING_OPTION,
) -> None:
    """Paper-table rows for a preset (help text: EVAL_HELP)."""
    from elfctl.cli.app import quiet_unless_main
    from elfctl.cli.progress import progress
    from elfctl.config import default_scorer
    from elfctl.distributed import processes
    from elfctl.runs import evaluate
    from elfctl.sampling import GRIDS
    from elfctl.scoring import Scoring, check_scorer, make_scorer

    check_precision(precision)
    check_choice("--grid", grid, GRIDS)
    if seeds is not None and seed != 0:
        raise UserError("Pass --seed or --seeds, not both.")
    seed_list = parse_int_list(seeds, "--seeds", 0, "seed") if seeds is not None else None
    prompting = prompting_fields(prompt, prompts_file, infill, hold, known_encoding)
    config = evaluate.resolve_eval_config(preset, config_file, repo)
    chosen = evaluate.select_settings(config, settings)
    kinds = evaluate.parse_metrics(metrics) if metrics is not None else None
    scorer = scorer or default_scorer(config)
    check_scorer(scorer)  # before any sampling, not after
    if mauve_model is not None:
        check_scorer(mauve_model, "--mauve-model")
    reference_texts = _references(kinds, references, reference_field, num_references)
    out_dir = out_dir or evaluate.default_out_dir(config)
    evaluate.check_eval_out_dir(out_dir, chosen, force, seed_list)

    procs = processes(cpu)
    quiet_unless_main(procs)
    device = procs.device
    request = evaluate.EvalRequest(
        source=repo,
        config=config,
        settings=chosen,
        out_dir=out_dir,
        num_samples=num_samples,
        seed=seed,
        batch_size=batch_size,
        precision=precision,
        compile=compile,
        tokenizer=tokenizer,
        encoder=encoder,
        device=device,
        force=force,
        scorer=scorer,
        metrics=kinds,
        seeds=seed_list,
        grid=grid,
        procs=procs,
        prompting=prompting,
    )
    console.print(
        f"evaluating {repo} with preset {config.name}: {', '.join(s.name for s in chosen)} "
        f"on {device} -> {out_dir}",
        highlight=False,
    )
    score = make_scorer(
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
    )
    summary = evaluate.run_eval(request, score=score, progress=progress, log=log)
    if procs.is_main:
        _report(summary, json_out)


def _references(kinds, references, field, limit):
    """The MAUVE references, read before any sampling; only MAUVE takes them."""
    wants_mauve = kinds is not None and "mauve" in kinds
    if wants_mauve and references is None:
        raise UserError("--metrics mauve needs --references (human text to compare with).")
    if references is not None and not wants_mauve:
        raise UserError("--references is only used by MAUVE; add mauve to --metrics.")
    if references is None:
        return None
    from elfctl.cli.score_distribution import load_references

    return load_references(references, field, None, limit)  # before the sampling


# ----------------------------------------------------------------------------- output


def metric_cell(entry: dict[str, Any]) -> str:
    """'25.30 (paper 24.1)'; with a validation number '26.10 (paper 26.7 val, 26.4 test)';
    over seeds '25.30 ± 0.16 (paper 24.1)' (mean ± standard error)."""
    value, stderr = entry["value"], entry.get("stderr")
    ours = "-" if value is None or not math.isfinite(value) else f"{value:.2f}"
    if stderr is not None and ours != "-":
        ours = f"{ours} ± {stderr:.2f}"
    paper, validation = entry["paper"], entry["paper_validation"]
    if validation is not None and paper is not None:
        return f"{ours} (paper {validation:g} val, {paper:g} test)"
    if validation is not None:
        return f"{ours} (paper {validation:g} val)"
    if paper is not None:
        return f"{ours} (paper {paper:g})"
    return ours


def _report(summary: dict[str, Any], json_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from elfctl.config import SamplingSetting, describe_sampler
    from elfctl.runs import METRICS

    rows = summary["rows"]
    names = [m for m in METRICS if any(m in row["metrics"] for row in rows)]
    table = Table(title=f"elfctl eval: {summary['preset']} ({summary['repo']})")
    for header in ("preset", "setting", "sampler", "n"):
        table.add_column(header, justify="right" if header == "n" else "left")
    for name in names:
        table.add_column(METRICS[name].label, justify="right")
    if any(row.get("seeds") for row in rows):
        table.add_column("seeds", justify="right")
    table.add_column("wall s", justify="right")
    table.add_column("samples/s", justify="right")
    for row in rows:
        sampler = describe_sampler(SamplingSetting(name=row["setting"], **row["sampler"]))
        table.add_row(
            row["preset"],
            row["setting"],
            sampler,
            str(row["n"]),
            *[metric_cell(row["metrics"][n]) if n in row["metrics"] else "-" for n in names],
            *([str(len(row.get("seeds") or [1]))] if any(r.get("seeds") for r in rows) else []),
            f"{row['wall_seconds']:.1f}",
            f"{row['samples_per_s']:.2f}",
        )
    # A log file or pipe gets the table at its natural width: rows are for pasting, and
    # rich would otherwise wrap every cell at 80 columns.
    screen = console if json_out else out
    if not screen.is_terminal:
        screen = Console(file=screen.file, width=LOG_WIDTH)
    screen.print(table)
    if json_out:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    console.print(f"wrote {Path(summary['out_dir']) / 'eval.json'}", highlight=False)
