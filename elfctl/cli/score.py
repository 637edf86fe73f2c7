"""`elfctl score-ppl`, `score-bleu`, `score-rouge`: score generated JSONL files.

Every input is read and checked before anything is scored or written, so a malformed
line stops the command (exit 2, naming file and line) with no metrics.jsonl touched.
Each file is scored on its own, shown in a table and recorded in the metrics.jsonl
beside it; `--json` puts the same records on stdout.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from elfctl import records
from elfctl.cli.app import app, console, handle_errors, out
from elfctl.errors import UserError

FILES_HELP = (
    "Samples files (JSONL), sample run directories (their samples.jsonl) or glob patterns "
    "such as 'outputs/*/samples.jsonl' (quote them to let elfctl expand them)."
)
JSON_HELP = "Print the metrics records as JSON on stdout (the table goes to stderr)."

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

# A glob stands for the sample files it matches, not for our own side files.
_SIDE_FILES = {records.METRICS_FILE, records.RUN_FILE}


# ----------------------------------------------------------------------------- inputs


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """The samples files named by `patterns` (files, run dirs, globs), in order, no repeats."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
            matches = [
                records.samples_path(m)
                for m in matches
                if (m.is_file() and m.name not in _SIDE_FILES)
                or (m.is_dir() and (m / records.SAMPLES_FILE).is_file())
            ]
            if not matches:
                raise UserError(f"no samples file matches '{pattern}'.")
            paths.extend(matches)
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


def read_inputs(
    patterns: list[str], need_reference: bool = False
) -> list[tuple[Path, list[dict[str, Any]]]]:
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


def _progress_for(description: str, total: int):
    from elfctl.cli.progress import progress

    return progress(description, total=total, unit="samples")


# ----------------------------------------------------------------------------- score-ppl


def score_ppl_files(
    inputs: list[tuple[Path, list[dict[str, Any]]]],
    model_name: str,
    *,
    batch_size: int,
    max_length: int,
    cpu: bool = False,
    combined: bool = False,
    write: bool = True,
    eos_mode: str = "ours",
) -> list[dict[str, Any]]:
    """Score each input with Gen PPL + entropy; append a record beside each (if `write`).

    Returns the records (plus one for all files together if `combined`).
    """
    from elfctl.cli.app import quiet_unless_main
    from elfctl.distributed import processes
    from elfctl.scoring import metrics as scoring

    procs = processes(cpu)  # under accelerate launch, each process scores a share
    quiet_unless_main(procs)
    device = procs.device
    dtype = "bf16-autocast" if device.type == "cuda" else "fp32"
    console.print(f"loading scorer {model_name} on {device} ({dtype})", highlight=False)
    model, tokenizer = scoring.load_scorer(model_name, device)
    settings = {"max_length": max_length, "batch_size": batch_size, "device": str(device)}
    settings["dtype"] = dtype
    settings["eos_mode"] = eos_mode
    settings["processes"] = procs.world

    results, out_records = [], []
    for path, rows in inputs:
        texts = [row["text"] for row in rows]
        with _progress_for(f"Gen PPL {path}", len(texts)) as advance:
            done = 0

            def on_batch(n_done: int, n_total: int) -> None:
                nonlocal done
                advance(n_done - done)
                done = n_done

            result = scoring.score_ppl(
                texts,
                model,
                tokenizer,
                batch_size=batch_size,
                max_length=max_length,
                eos_mode=eos_mode,
                on_batch=on_batch,
                procs=procs,
            )
            if done < len(texts):  # empty samples are counted, not batched
                advance(len(texts) - done)
        results.append(result)
        record = records.metrics_record(
            path.resolve(), "gen_ppl", result.to_dict(), scorer=model_name, n=len(rows), **settings
        )
        if write and procs.is_main:
            records.append_metrics(path.parent, record)
        out_records.append(record)

    if combined:
        total = scoring.combine_ppl(results)
        record = records.metrics_record(
            "combined",
            "gen_ppl",
            total.to_dict(),
            scorer=model_name,
            n=sum(len(rows) for _, rows in inputs),
            files=[str(path.resolve()) for path, _ in inputs],
            **settings,
        )
        out_records.append(record)
    return out_records


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
        "gpt2-large", "--model", help="Scorer: a causal LM hub id or local folder."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Samples per forward pass."),
    max_length: int = typer.Option(
        1024, "--max-length", min=2, help="Truncate each sample to this many GPT-2 tokens."
    ),
    combined: bool = typer.Option(
        False, "--combined", help="Also score all files together (one corpus)."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
    cpu: bool = typer.Option(False, "--cpu", help="Score on the CPU even if a GPU is present."),
    eos_mode: str = typer.Option(
        "ours",
        "--eos-mode",
        help="ours (each sample's own tokens) or official (also one eos after every sample "
        "shorter than the file's longest, as the official script).",
    ),
) -> None:
    """Gen PPL + entropy of each file (help text: PPL_HELP)."""
    if eos_mode not in ("ours", "official"):
        raise UserError(f"--eos-mode must be ours or official, got '{eos_mode}'.")
    inputs = read_inputs(files)
    if combined and eos_mode == "official" and len(inputs) > 1:
        raise UserError(
            "--combined needs --eos-mode ours: the official mode's extra eos depends on the "
            "longest sample of each scored corpus, so files cannot simply be added up."
        )
    result_records = score_ppl_files(
        inputs,
        model,
        batch_size=batch_size,
        max_length=max_length,
        cpu=cpu,
        combined=combined,
        eos_mode=eos_mode,
    )
    columns = [
        ("empty", "n_empty"),
        ("tokens", "n_tokens"),
        ("Gen PPL", "ppl"),
        ("entropy", "entropy"),
        ("samples/s", "samples_per_s"),
    ]
    from elfctl.distributed import processes

    if processes(cpu).is_main:  # under accelerate launch every process has the result
        report(result_records, f"Gen PPL ({model})", columns, json_out)


# ----------------------------------------------------------------------------- BLEU / ROUGE


def score_bleu_files(
    inputs: list[tuple[Path, list[dict[str, Any]]]], write: bool = True
) -> list[dict[str, Any]]:
    from elfctl.scoring import metrics as scoring

    out_records = []
    for path, rows in inputs:
        result = scoring.score_bleu([r["text"] for r in rows], [r["reference"] for r in rows])
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
    inputs: list[tuple[Path, list[dict[str, Any]]]], write: bool = True
) -> list[dict[str, Any]]:
    from elfctl.scoring import metrics as scoring

    out_records = []
    for path, rows in inputs:
        with _progress_for(f"ROUGE {path}", len(rows)) as advance:
            done = 0

            def on_batch(n_done: int, n_total: int) -> None:
                nonlocal done
                advance(n_done - done)
                done = n_done

            result = scoring.score_rouge(
                [r["text"] for r in rows], [r["reference"] for r in rows], on_batch=on_batch
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
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """BLEU of each file (help text: BLEU_HELP)."""
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
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """ROUGE of each file (help text: ROUGE_HELP)."""
    inputs = read_inputs(files, need_reference=True)
    columns = [("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL")]
    report(score_rouge_files(inputs), "ROUGE (rouge_score)", columns, json_out)
