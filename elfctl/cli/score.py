"""`elfctl score-ppl`, `score-bleu`, `score-rouge`: score generated JSONL files.

Every input is read and checked before anything is scored or written, so a malformed
line stops the command (exit 2, naming file and line) with no metrics.jsonl touched.
Each file is scored on its own, shown in a table and recorded in the metrics.jsonl
beside it; `--json` puts the same records on stdout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from elfctl.cli.app import app, console, handle_errors, log, out
from elfctl.cli.options import Cpu, check_choice, flag, json_flag
from elfctl.errors import UserError

FILES_HELP = (
    "Samples files (JSONL), sample run directories (their samples.jsonl) or glob patterns "
    "such as 'outputs/*/samples.jsonl' (quote them to let elfctl expand them)."
)
JSON_OPTION = json_flag("the metrics records")

PPL_HELP = (
    "Generative perplexity and unigram entropy under a GPT-2 scorer (docs/method.md section 6)."
    "\n\nToken-weighted over each file: exp(total next-token NLL / scored tokens). Each "
    "sample is retokenized with the scorer's tokenizer and truncated at --max-length; empty "
    "samples are skipped and counted. bf16 autocast on GPU, fp32 on CPU. A record is "
    "appended to the metrics.jsonl beside each input.\n\n--eos-mode official also scores one "
    "eos after every sample shorter than the file's longest, as the official script does "
    "(it pads the whole corpus with eos at once); the default scores only each sample's "
    "own tokens."
)
BLEU_HELP = (
    "Corpus BLEU of each file's text against its reference (sacreBLEU, lowercased, "
    "effective order, one reference).\n\nA record is appended to the metrics.jsonl beside "
    "each input; rows without a reference are an error."
)
ROUGE_HELP = (
    "ROUGE-1/2/L of each file's text against its reference (rouge_score with stemming, "
    "per-example F-measure x 100, averaged).\n\nA record is appended to the metrics.jsonl "
    "beside each input; rows without a reference are an error."
)

# ----------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _shown(file: str) -> str:
    """A record's (absolute) file as the user would write it: relative to here if below."""
    try:
        return str(Path(file).relative_to(Path.cwd()))
    except ValueError:
        return file


def report(records_: list[dict[str, Any]], title: str, columns: list[tuple[str, str]], as_json):
    """Show the records as a table (stdout, or stderr under --json) and, under --json, as
    JSON on stdout. `columns` are (header, key in the record's values)."""
    table = Table(title=title)
    table.add_column("file", overflow="fold")
    table.add_column("n", justify="right")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for record in records_:
        values = record["values"]
        table.add_row(
            _shown(record["file"]), str(record["n"]), *[_fmt(values.get(key)) for _, key in columns]
        )
    if as_json:
        console.print(table)
        typer.echo(json.dumps(records_, indent=2, ensure_ascii=False))
    else:
        out.print(table)


def progress_for(description: str, total: int, unit: str):
    """The progress bar the library's scorers report to (cli/progress.py)."""
    from elfctl.cli.progress import progress

    return progress(description, total, unit)


def read_inputs(patterns: list[str], need_reference: bool = False):
    from elfctl.scoring import read_inputs as read

    return read(patterns, need_reference)


# ----------------------------------------------------------------------------- score-ppl


@app.command(
    "score-ppl",
    help=PPL_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl score-ppl outputs/owt-b-sde32/samples.jsonl\n\n"
        "  elfctl score-ppl 'outputs/*/samples.jsonl' --combined\n\n"
        "  elfctl score-ppl outputs/run1 outputs/run2 --model gpt2 --batch-size 16 --json"
    ),
)
@handle_errors
def score_ppl_command(
    files: list[str] = typer.Argument(..., help=FILES_HELP, show_default=False),
    model: str = typer.Option(
        None,
        "--model",
        help="Scorer: a causal LM hub id, local folder or testbed:grammar/scorer (default: "
        "the test bed's scorer for samples of a test-bed model, else gpt2-large).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples per forward pass."),
    max_length: int = typer.Option(
        1024, "--max-length", min=2, help="Truncate each sample to this many GPT-2 tokens."
    ),
    combined: bool = flag("--combined", help="Also score all files together (one corpus)."),
    json_out: bool = JSON_OPTION,
    cpu: Cpu = False,
    eos_mode: str = typer.Option(
        "ours",
        "--eos-mode",
        help="ours (each sample's own tokens) or official (also one eos after every sample "
        "shorter than the file's longest, as the official script).",
    ),
) -> None:
    """Gen PPL + entropy of each file (help text: PPL_HELP)."""
    from elfctl.cli.app import quiet_unless_main
    from elfctl.distributed import processes
    from elfctl.scoring import check_scorer, default_scorer_for, score_ppl_files

    check_choice("--eos-mode", eos_mode, ("ours", "official"))
    inputs = read_inputs(files)
    model = model or default_scorer_for(inputs)
    check_scorer(model, "--model")
    if combined and eos_mode == "official" and len(inputs) > 1:
        raise UserError(
            "--combined needs --eos-mode ours: the official mode's extra eos depends on the "
            "longest sample of each scored corpus, so files cannot simply be added up."
        )
    procs = processes(cpu)  # under accelerate launch, each process scores a share
    quiet_unless_main(procs)
    result_records = score_ppl_files(
        inputs,
        model,
        batch_size=batch_size,
        max_length=max_length,
        procs=procs,
        combined=combined,
        eos_mode=eos_mode,
        progress=progress_for,
        log=log,
    )
    columns = [
        ("empty", "n_empty"),
        ("tokens", "n_tokens"),
        ("Gen PPL", "ppl"),
        ("entropy", "entropy"),
        ("samples/s", "samples_per_s"),
    ]
    if procs.is_main:  # under accelerate launch every process has the result
        report(result_records, f"Gen PPL ({model})", columns, json_out)


# ----------------------------------------------------------------------------- BLEU / ROUGE


@app.command(
    "score-bleu",
    help=BLEU_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl score-bleu outputs/de-en-b/samples.jsonl\n\n"
        "  elfctl score-bleu 'outputs/de-en-*' --json"
    ),
)
@handle_errors
def score_bleu_command(
    files: list[str] = typer.Argument(..., help=FILES_HELP, show_default=False),
    json_out: bool = JSON_OPTION,
) -> None:
    """BLEU of each file (help text: BLEU_HELP)."""
    from elfctl.scoring import score_bleu_files

    inputs = read_inputs(files, need_reference=True)
    columns = [
        ("BLEU", "bleu"),
        ("BP", "brevity_penalty"),
        ("hyp len", "hyp_len"),
        ("ref len", "ref_len"),
    ]
    report(score_bleu_files(inputs), "BLEU (sacrebleu)", columns, json_out)


@app.command(
    "score-rouge",
    help=ROUGE_HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl score-rouge outputs/xsum-b/samples.jsonl\n\n"
        "  elfctl score-rouge outputs/xsum-b outputs/xsum-b-cfg2 --json"
    ),
)
@handle_errors
def score_rouge_command(
    files: list[str] = typer.Argument(..., help=FILES_HELP, show_default=False),
    json_out: bool = JSON_OPTION,
) -> None:
    """ROUGE of each file (help text: ROUGE_HELP)."""
    from elfctl.scoring import score_rouge_files

    inputs = read_inputs(files, need_reference=True)
    columns = [("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL")]
    records = score_rouge_files(inputs, progress=progress_for)
    report(records, "ROUGE (rouge_score)", columns, json_out)
