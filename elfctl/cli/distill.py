"""`elfctl distill`: progressive distillation of a teacher into few-step students."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from elfctl.cli.app import app, console, handle_errors, out
from elfctl.cli.options import MixedPrecision, json_flag, md
from elfctl.cli.options import TrainCpu as Cpu
from elfctl.cli.progress import fit_with_progress
from elfctl.cli.train import LogWith, PrintConfig, resolve_run_config, time_cap_note
from elfctl.config import preset_names


@app.command(
    help=md(
        "Distil a many-step ELF teacher into few-step students (progressive distillation, "
        "docs/method.md section 8).\n\n"
        "Round k trains a student that covers span distill.spans[k-1] in one step against "
        "the frozen teacher's Euler sub-steps. Each round is a normal run directory "
        "RUN_DIR/round_<k> whose checkpoints `elfctl sample` loads; re-running skips "
        "finished rounds and resumes an unfinished one.\n\n"
        "Beyond the official recipe: --set distill.target=consistency, "
        "distill.teacher_sampler=sde (docs/distillation.md)."
    ),
    epilog=(
        "Examples:\n\n"
        "  elfctl distill --preset owt-b-pd\n\n"
        "  elfctl distill --preset owt-b-pd --teacher embedded-language-flows/ELF-B-owt-torch "
        "--round 3 --run-dir runs/owt-b-pd\n\n"
        "  elfctl distill --preset tiny --teacher runs/tiny --rounds 3-4 "
        "--set distill.steps_per_round=300\n\n"
        "  accelerate launch -m elfctl distill --preset owt-b-pd --set train.micro_batch=64\n\n"
        "  elfctl sample --repo runs/owt-b-pd/round_5 --steps 1"
    ),
)
@handle_errors
def distill(
    teacher: str = typer.Option(
        None,
        "--teacher",
        help="The teacher: hub repo, checkpoint file or directory, or a run dir "
        "(default: the preset's distill.teacher).",
    ),
    preset: str = typer.Option(
        None, "--preset", help=f"Data, encoder and settings: one of {', '.join(preset_names())}."
    ),
    config_file: Path = typer.Option(None, "--config", help="A YAML config file."),
    rounds: str = typer.Option(None, "--rounds", help="Rounds to run, K or A-B (default: all)."),
    round_: int = typer.Option(None, "--round", help="Run this one round only."),
    sets: list[str] = typer.Option(
        None, "--set", help="Override a config value: dotted.key=value (repeatable)."
    ),
    run_dir: Path = typer.Option(
        None, "--run-dir", help="Curriculum directory (default runs/<preset>-pd)."
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", min=1, help="Steps per round (distill.steps_per_round)."
    ),
    resume: str = typer.Option("auto", "--resume", help="auto (resume each round) or never."),
    log_with: LogWith = None,
    print_config: PrintConfig = False,
    cpu: Cpu = False,
    mixed_precision: MixedPrecision = None,
    json_out: bool = json_flag("a summary", table=False),
) -> None:
    from elfctl.config import dump_yaml
    from elfctl.errors import UserError

    if rounds is not None and round_ is not None:
        raise UserError("Give either --rounds or --round, not both.")
    if resume not in ("auto", "never"):
        raise UserError(f"--resume must be auto or never, got '{resume}'.")
    overrides = {"distill.teacher": teacher, "distill.steps_per_round": max_steps}
    cfg = resolve_run_config(preset, config_file, overrides, sets, mixed_precision)
    if print_config:
        out.print(dump_yaml(cfg), highlight=False, soft_wrap=True)
        return

    from elfctl.training import check_distill_config, parse_log_with, parse_rounds

    check_distill_config(cfg)
    trackers = parse_log_with(log_with)
    n = len(cfg.distill.spans)
    chosen = parse_rounds(str(round_) if round_ is not None else (rounds or f"1-{n}"), n)
    if run_dir is None:
        run_dir = Path("runs") / (cfg.name if cfg.name.endswith("-pd") else f"{cfg.name}-pd")

    from elfctl.precision import training_precision
    from elfctl.training import distill as run_curriculum
    from elfctl.training import make_accelerator

    precision = training_precision(cpu, mixed_precision, cfg.train.gpu_precision)
    accelerator = make_accelerator(cpu=cpu, mixed_precision=precision.mode)
    main = accelerator.is_main_process

    def run_round(trainer):
        if main:
            where = f"resuming from step {trainer.step}" if trainer.resume_from else "starting"
            console.print(
                f"round {trainer.round}: span {trainer.span:g} in one step vs {trainer.substeps} "
                f"teacher sub-steps; {where} in {trainer.run_dir}; {trainer.total_steps} steps "
                f"of {cfg.train.global_batch} x {cfg.data.max_length} tokens on "
                f"{accelerator.device}, precision {precision.describe()}",
                highlight=False,
            )
            return fit_with_progress(trainer, f"round {trainer.round}", "pd")
        return trainer.fit()

    results = run_curriculum(
        cfg,
        run_dir,
        chosen,
        accelerator=accelerator,
        resume=resume,
        run_round=run_round,
        log_with=trackers,
    )
    if not main:
        return
    for r in results:
        if r.skipped:
            console.print(f"round {r.round}: already finished (step {r.step})", highlight=False)
            continue
        rec = r.result.last_record or {}
        state = "done" if r.step >= r.total_steps else "stopped"
        console.print(
            f"round {r.round}: {state} at step {r.step}/{r.total_steps} in "
            f"{r.result.seconds:.0f}s, loss {rec.get('loss', 0):.4f} "
            f"(pd {rec.get('l2', 0):.4f}, ce {rec.get('ce', 0):.4f}); student in {r.run_dir}"
            + time_cap_note(r.step, r.total_steps, cfg.train.max_minutes),
            highlight=False,
        )
    if json_out:
        summary = {
            "run_dir": str(run_dir),
            "rounds": [
                {
                    "round": r.round,
                    "span": r.span,
                    "teacher_substeps": r.substeps,
                    "run_dir": str(r.run_dir),
                    "step": r.step,
                    "total_steps": r.total_steps,
                    "skipped": r.skipped,
                    "seconds": r.result.seconds if r.result else 0.0,
                    "last": (r.result.last_record if r.result else None) or {},
                }
                for r in results
            ],
        }
        out.print_json(json.dumps(summary))
