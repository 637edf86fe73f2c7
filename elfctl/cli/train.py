"""`elfctl train`: train or resume a run from a preset or a config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from elfctl.cli.app import app, console, handle_errors, out
from elfctl.cli.options import MixedPrecision, flag_info, json_flag
from elfctl.cli.options import TrainCpu as Cpu
from elfctl.cli.progress import ChunkProgress, fit_with_progress
from elfctl.config import Config, preset_names

# Options shared by the training commands (train, distill).
PrintConfig = Annotated[bool, flag_info("--print-config", help="Print the config and exit.")]
LogWith = Annotated[
    list[str],
    typer.Option(
        "--log-with",
        help="Experiment trackers through Accelerate: tensorboard, wandb, mlflow, ... "
        "(comma-separated or repeated; tensorboard and wandb come with elfctl's extras "
        "of the same names).",
    ),
]


def print_resolved(trainer) -> None:
    """What training found out for the user: `auto` settings and fine-tuning provenance."""
    auto = dict(trainer.auto_settings)
    rows = auto.pop("rows", None)
    for key, value in auto.items():
        how = (
            "from the tokenizer"
            if key == "model.vocab_size"
            else (f"measured on {rows} training rows (seed {trainer.cfg.train.seed})")
        )
        shown = f"{value:.6g}" if isinstance(value, float) else value
        console.print(f"auto: {key} = {shown} ({how})", highlight=False)
    init = trainer.cfg.train.init_from
    if init and trainer.resume_from is None:
        console.print(
            f"fine-tuning from {init['source']}: {init['weights']} weights of step "
            f"{init['step']} ({init['format']}, sha256 {init['sha256'][:12]}...)",
            highlight=False,
        )


def resolve_run_config(
    preset: str | None,
    config_file: Path | None,
    overrides: dict,
    sets: list[str] | None,
    mixed_precision: str | None,
) -> Config:
    """A training command's config, after checking the flags train and distill share."""
    from elfctl.cli.options import check_mixed_precision
    from elfctl.config import resolve
    from elfctl.errors import UserError

    if preset is None and config_file is None:
        raise UserError(
            f"Give --preset NAME or --config FILE (presets: {', '.join(preset_names())})."
        )
    check_mixed_precision(mixed_precision)
    return resolve(preset, config_file, overrides, sets)


def print_prepared_rows(corpus: str, prepared) -> None:
    """One line on the rows the data pipeline built or found in its cache."""
    if prepared is None:
        return
    m = prepared.manifest
    kind = "packed rows" if m["settings"].get("packing") else "rows"
    what = "tokenized" if "files" in m else "packed"
    verb = f"{what} now" if prepared.built else "reused from the cache"
    console.print(
        f"data: {corpus}: {m['rows']:,} {kind} ({m['tokens']:,} tokens, "
        f"{m['documents']:,} documents), {verb}: {prepared.folder}",
        highlight=False,
    )


def time_cap_note(step: int, total: int, max_minutes: float | None) -> str:
    """What a run that stopped before its last step adds to its closing line: the time cap
    stopped it, and the same command goes on ("" for a finished run)."""
    if step >= total:
        return ""
    return (
        f"; train.max_minutes={max_minutes:g} stopped it: run the same command again to go "
        "on (or --set train.max_minutes=null)"
    )


def _done_line(
    result, rec: dict, run_dir: Path, start_step: int, total: int, max_minutes: float | None
) -> str:
    """The closing line. A run with nothing left to train says so, one that logged no
    loss shows none (rather than a made-up 0.0000), and one the time cap stopped says so."""
    where = f"checkpoints in {run_dir}/checkpoints" + time_cap_note(result.step, total, max_minutes)
    if result.step <= start_step:
        return (
            f"already finished: step {result.step}, nothing left to train (raise --max-steps "
            f"to go on); {where}"
        )
    state = "done: step" if result.step >= total else "stopped at step"
    ran = f"{state} {result.step}" + ("" if result.step >= total else f" of {total}")
    if not rec:
        return f"{ran} in {result.seconds:.0f}s (no loss logged yet); {where}"
    return (
        f"{ran} in {result.seconds:.0f}s, loss {rec['loss']:.4f} "
        f"(l2 {rec['l2']:.4f}, ce {rec['ce']:.4f}); {where}"
    )


def _train_help() -> str:
    return (
        "Train an ELF model from a preset or config file; re-running resumes the run.\n\n"
        f"Presets: {', '.join(preset_names())}.\n\n"
        "Several processes: `accelerate launch --multi_gpu --num_processes N -m elfctl train "
        "...` (add --cpu for N CPU processes; without --multi_gpu, accelerate starts one "
        "process on a machine without GPUs). The start-up line says how many processes run."
    )


@app.command(
    help=_train_help(),
    epilog=(
        "Examples:\n\n"
        "  elfctl train --preset tiny\n\n"
        "  elfctl train --preset owt-b --run-dir runs/owt-b --set train.micro_batch=64\n\n"
        "  accelerate launch --multi_gpu --num_processes 2 -m elfctl train --preset tiny "
        "--cpu\n\n"
        "  elfctl train --preset xsum-b --print-config\n\n"
        "  elfctl train --preset owt-b --init embedded-language-flows/ELF-B-owt-torch "
        "--set data.train=./my_corpus/ --run-dir runs/my-finetune\n\n"
        "  elfctl train --preset tiny --log-with tensorboard,wandb"
    ),
)
@handle_errors
def train(
    preset: str = typer.Option(None, "--preset", help=f"One of: {', '.join(preset_names())}."),
    config_file: Path = typer.Option(None, "--config", help="A YAML config file."),
    sets: list[str] = typer.Option(
        None, "--set", help="Override a config value: dotted.key=value (repeatable)."
    ),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (default runs/<name>)."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    resume: str = typer.Option(
        "auto", "--resume", help="auto (newest checkpoint in the run dir), never, or a path."
    ),
    init: str = typer.Option(
        None,
        "--init",
        help="Fine-tune: start from these weights (hub id, checkpoint file or folder, "
        "converted JAX checkpoint, or run dir) with a fresh optimiser, step count and EMA.",
    ),
    init_weights: str = typer.Option(
        None, "--init-weights", help="ema (default) or raw: which weights of --init to use."
    ),
    log_with: LogWith = None,
    print_config: PrintConfig = False,
    cpu: Cpu = False,
    mixed_precision: MixedPrecision = None,
    json_out: bool = json_flag("a summary", table=False),
) -> None:
    from elfctl.config import dump_yaml
    from elfctl.errors import UserError
    from elfctl.training import parse_log_with

    if init_weights not in (None, "ema", "raw"):
        raise UserError(f"--init-weights must be ema or raw, got '{init_weights}'.")

    overrides = {
        "train.max_steps": max_steps,
        "train.init": init,
        "train.init_weights": init_weights,
    }
    cfg = resolve_run_config(preset, config_file, overrides, sets, mixed_precision)
    if init_weights is not None and cfg.train.init is None:
        raise UserError(
            "--init-weights chooses which weights of --init to use, but nothing is to be "
            "fine-tuned from; add --init SOURCE."
        )
    if print_config:
        out.print(dump_yaml(cfg), highlight=False, soft_wrap=True)
        return
    trackers = parse_log_with(log_with)

    from elfctl.precision import training_precision
    from elfctl.training import Trainer, make_accelerator

    precision = training_precision(cpu, mixed_precision, cfg.train.gpu_precision)
    accelerator = make_accelerator(cpu=cpu, mixed_precision=precision.mode)
    run_dir = run_dir or Path("runs") / cfg.name
    trainer = Trainer(
        cfg, run_dir, accelerator, resume, data_progress=ChunkProgress(), log_with=trackers
    )
    main = accelerator.is_main_process
    if main:
        print_prepared_rows(cfg.data.train, trainer.prepared)
        print_resolved(trainer)
        where = f"resuming from step {trainer.step}" if trainer.resume_from else "starting"
        console.print(
            f"{cfg.name}: {where} in {run_dir}; {trainer.total_steps} steps of "
            f"{cfg.train.global_batch} x {cfg.data.max_length} tokens "
            f"({trainer.micro} per device x {accelerator.num_processes} processes x "
            f"{trainer.accum} accumulation) on {accelerator.device}, precision "
            f"{precision.describe()}",
            highlight=False,
        )
    start_step = trainer.step
    result = fit_with_progress(trainer) if main else trainer.fit()
    if main:
        rec = result.last_record or {}
        line = _done_line(
            result, rec, run_dir, start_step, trainer.total_steps, cfg.train.max_minutes
        )
        console.print(line, highlight=False)
        if json_out:
            out.print_json(
                json.dumps(
                    {
                        "run_dir": str(run_dir),
                        "step": result.step,
                        "seconds": result.seconds,
                        "last": rec,
                    }
                )
            )
