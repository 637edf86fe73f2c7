"""`elfctl eval`: sample + score every official setting of a preset, one paper-table row each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from ..errors import UserError
from .app import app, console, handle_errors, out
from .sample import (
    HOLD_OPTION,
    INFILL_OPTION,
    KNOWN_ENCODING_OPTION,
    PROMPT_OPTION,
    PROMPTS_FILE_OPTION,
    prompting_fields,
)

LOG_WIDTH = 400  # the table's width limit when stdout is not a terminal

EVAL_HELP = (
    "Sample and score every official sampling setting of a preset: one row of the paper's "
    "table per setting, our number beside the paper's."
    "\n\nUnconditional presets (owt-*) are scored with Gen PPL + entropy under --scorer; "
    "conditional presets are sampled on the first n rows of their validation set and scored "
    "with BLEU (de-en) or ROUGE (xsum) against its references, so the paper's validation "
    "number is shown first. Each setting gets its own sample run dir under --out "
    "(samples.jsonl, run.json, metrics.jsonl); eval.json there holds the summary."
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
        "  elfctl eval --config my-run.yaml --repo runs/my-run --out outputs/eval-my-run"
    ),
)
@handle_errors
def eval_command(
    repo: str = typer.Option(
        ..., "--repo", help="Hub repo id, hub sub-path, local file or directory, or a run dir."
    ),
    preset: str = typer.Option(None, "--preset", help="Preset whose settings to run (owt-b...)."),
    config_file: Path = typer.Option(
        None, "--config", help="YAML config (over --preset) naming its own sampling settings."
    ),
    settings: list[str] = typer.Option(
        None, "--setting", help="Run only this setting (repeatable; default: every one)."
    ),
    num_samples: int = typer.Option(
        None, "--num-samples", min=1, help="Samples per setting (default: the setting's own)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed, the same for every setting."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward."),
    out_dir: Path = typer.Option(
        None, "--out", help="Evaluation dir (default outputs/eval-<preset>-<time>)."
    ),
    scorer: str = typer.Option(
        "gpt2-large", "--scorer", help="Gen PPL model: a causal LM hub id or local folder."
    ),
    score_batch_size: int = typer.Option(
        8, "--score-batch-size", min=1, help="Samples per Gen PPL forward."
    ),
    tokenizer: str = typer.Option(None, "--tokenizer", help="ELF tokenizer hub id or folder."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on GPU), bf16 or fp32."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU even if a GPU is present."),
    force: bool = typer.Option(False, "--force", help="Overwrite an earlier evaluation in --out."),
    json_out: bool = typer.Option(
        False, "--json", help="Print eval.json on stdout (the table goes to stderr)."
    ),
    prompt: list[str] = PROMPT_OPTION,
    prompts_file: Path = PROMPTS_FILE_OPTION,
    infill: list[str] = INFILL_OPTION,
    hold: str = HOLD_OPTION,
    known_encoding: str = KNOWN_ENCODING_OPTION,
) -> None:
    """Paper-table rows for a preset (help text: EVAL_HELP)."""
    from accelerate import PartialState

    from .. import evaluate
    from .progress import progress

    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, got '{precision}'.")
    prompting = prompting_fields(prompt, prompts_file, infill, hold, known_encoding)
    config = evaluate.resolve_eval_config(preset, config_file)
    chosen = evaluate.select_settings(config, settings)
    out_dir = out_dir or evaluate.default_out_dir(config)
    evaluate.check_out_dir(out_dir, chosen, force)

    device = PartialState(cpu=cpu).device
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
        device=device,
        force=force,
        scorer=scorer,
        prompting=prompting,
    )
    console.print(
        f"evaluating {repo} with preset {config.name}: {', '.join(s.name for s in chosen)} "
        f"on {device} -> {out_dir}",
        highlight=False,
    )
    summary = evaluate.run_eval(
        request,
        score=_scorer(scorer, score_batch_size, cpu),
        progress=progress,
        log=lambda message: console.print(message, highlight=False),
    )
    _report(summary, json_out)


def _scorer(model: str, batch_size: int, cpu: bool):
    """The score-ppl / score-bleu / score-rouge functions, so eval's numbers are theirs."""
    from ..scoring import DEFAULT_MAX_LENGTH
    from .score import score_bleu_files, score_ppl_files, score_rouge_files

    def score(kind: str, inputs: list[tuple[Path, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        if kind == "gen_ppl":
            return score_ppl_files(
                inputs, model, batch_size=batch_size, max_length=DEFAULT_MAX_LENGTH, cpu=cpu
            )
        if kind == "bleu":
            return score_bleu_files(inputs)
        if kind == "rouge":
            return score_rouge_files(inputs)
        raise ValueError(f"unknown scorer kind {kind!r}")

    return score


# ----------------------------------------------------------------------------- output


def metric_cell(entry: dict[str, Any]) -> str:
    """'25.30 (paper 24.1)'; with a validation number '26.10 (paper 26.7 val, 26.4 test)'."""
    value = entry["value"]
    ours = "-" if value is None or not math.isfinite(value) else f"{value:.2f}"
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

    from ..config import SamplingSetting
    from ..evaluate import METRICS, describe_sampler

    rows = summary["rows"]
    names = [m for m in METRICS if any(m in row["metrics"] for row in rows)]
    table = Table(title=f"elfctl eval: {summary['preset']} ({summary['repo']})")
    for header in ("preset", "setting", "sampler", "n"):
        table.add_column(header, justify="right" if header == "n" else "left")
    for name in names:
        table.add_column(METRICS[name].label, justify="right")
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
