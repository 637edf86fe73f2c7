"""`elfctl sample`: draw samples from a checkpoint into a sample run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from elfctl.cli.app import app, console, handle_errors, out, quiet_unless_main
from elfctl.cli.options import (
    Compile,
    Cpu,
    Precision,
    check_choice,
    check_precision,
    flag,
    json_flag,
    md,
)
from elfctl.cli.progress import progress
from elfctl.errors import UserError

# Prompting and infilling flags, shared with `elfctl eval` (see prompting_fields).
PROMPT_OPTION = typer.Option(
    None,
    "--prompt",
    help=(
        "Fix the first tokens of each sample to this text (repeatable: sample i gets "
        "prompt i mod the number of prompts). Words the tokenizer does not know are refused."
    ),
)
PROMPTS_FILE_OPTION = typer.Option(
    None, "--prompts", help="Prompts from a file: .txt (one per line) or .jsonl ('prompt')."
)
INFILL_OPTION = typer.Option(
    None,
    "--infill",
    help=md("Fill the gaps of a template, e.g. 'the dog [gap:5] the cat .' (repeatable)."),
)
HOLD_OPTION = typer.Option(
    None, "--hold", help="How known tokens are held: clean (default, measured best) or noised."
)
KNOWN_ENCODING_OPTION = typer.Option(
    None,
    "--known-encoding",
    help="How known tokens are encoded: masked (default: one pass) or segments.",
)
# The latent space's pieces, shared with `elfctl eval`.
TOKENIZER_OPTION = typer.Option(
    None, "--tokenizer", help="Tokenizer hub id or local folder (default: the config's)."
)
ENCODER_OPTION = typer.Option(
    None,
    "--encoder",
    help="Frozen encoder hub id or local folder, for --input, --prompt and --infill "
    "(default: the config's, t5-small for official checkpoints).",
)

SAMPLE_HELP = md(
    """Sample texts from an ELF checkpoint (defaults: the preset's official settings).

--prompt / --prompts fix a prefix and --infill fixes the tokens around [gap:N] gaps, for
unconditional and conditional models alike; known tokens come back unchanged and each
row records its prompt or template in `meta`. Without --num-samples, one prompt or
template gets the setting's number of samples and several get one sample each.

With --input, the model is conditioned on each source in turn (a conditional model:
its own run config or a conditional --preset); rows carry `condition` and, where the
input has one, `reference`, ready for score-bleu / score-rouge."""
)


@app.command(
    help=SAMPLE_HELP,
    epilog=md(
        "Examples:\n\n"
        "  elfctl sample --repo embedded-language-flows/ELF-B-owt-torch --steps 32\n\n"
        "  elfctl sample --repo runs/tiny --num-samples 64 --out outputs/tiny\n\n"
        "  elfctl sample --repo ckpts/checkpoint_95000 --preset owt-b --setting sde-64\n\n"
        "  elfctl sample --repo runs/tiny-translate --input sources.jsonl --out outputs/tt\n\n"
        "  elfctl sample --repo ckpts/de-en --preset de-en-b "
        "--input embedded-language-flows/wmt14_de-en_validation_t5 --num-samples 1000\n\n"
        "  elfctl sample --repo runs/tiny --prompt 'the dog' --num-samples 8\n\n"
        "  elfctl sample --repo runs/tiny --infill 'the [gap:2] dog [gap:3] .'\n\n"
        "  elfctl sample --repo runs/tiny --num-samples 4 --trajectory 8 --out outputs/traj "
        "&& elfctl show outputs/traj"
    ),
)
@handle_errors
def sample(
    repo: str = typer.Option(
        ..., "--repo", help="Hub repo id, hub sub-path, local file or directory, or a run dir."
    ),
    preset: str = typer.Option(
        None, "--preset", help="Preset for official checkpoints (tokenizer, sampling defaults)."
    ),
    setting: str = typer.Option(
        None, "--setting", help="Named official sampling setting of the preset (default: first)."
    ),
    steps: int = typer.Option(None, "--steps", min=1, help="Sampling steps."),
    sampler: str = typer.Option(
        None, "--sampler", help="ode or sde (official), or heun, dpm2m... (docs/solvers.md)."
    ),
    gamma: float = typer.Option(None, "--gamma", min=0.0, help="SDE churn."),
    sc_cfg: float = typer.Option(None, "--sc-cfg", help="Self-conditioning guidance scale."),
    cfg: float = typer.Option(None, "--cfg", help="Classifier-free guidance scale."),
    time_schedule: str = typer.Option(
        None, "--time-schedule", help="logit_normal (official), uniform, quantile, karras..."
    ),
    num_samples: int = typer.Option(None, "--num-samples", min=1, help="How many samples."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Samples per forward."),
    length: int = typer.Option(None, "--length", min=1, help="Sequence length in tokens."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same device: same text)."),
    tokenizer: str = TOKENIZER_OPTION,
    encoder: str = ENCODER_OPTION,
    out_dir: Path = typer.Option(None, "--out", help="Output directory (default outputs/...)."),
    force: bool = flag(
        "--force",
        help="Overwrite an existing sample run, its metrics.jsonl included (or start an "
        "unfinished one over).",
    ),
    resume: bool = flag(
        "--resume",
        help=(
            "Continue the unfinished run in --out from its last finished batch (also done "
            "automatically when --out holds one of the same settings); an error if none."
        ),
    ),
    grid: str = typer.Option(
        "per-sample",
        "--grid",
        help=(
            "per-sample: each sample its own time grid (keyed by seed and sample id); "
            "per-batch: one grid per batch, as the official port (samples then depend on "
            "--batch-size)."
        ),
    ),
    precision: Precision = "auto",
    compile: Compile = False,
    cpu: Cpu = False,
    json_out: bool = json_flag("run.json"),
    input: str = typer.Option(
        None,
        "--input",
        help=(
            "Sources to condition on: a .jsonl file, a .txt file (one source per line), a "
            "save_to_disk folder or a hub dataset. Outputs keep the input order."
        ),
    ),
    source_field: str = typer.Option(
        None, "--source-field", help="Source field of --input rows (default: data.source_field)."
    ),
    reference_field: str = typer.Option(
        None,
        "--reference-field",
        help="Reference field of --input rows, optional in each row (default: data.target_field).",
    ),
    split: str = typer.Option(
        None,
        "--split",
        help=(
            "Dataset split of --input (default: data.validation_split for the model's own "
            "validation set, else validation, test or the only split)."
        ),
    ),
    prompt: list[str] = PROMPT_OPTION,
    prompts_file: Path = PROMPTS_FILE_OPTION,
    infill: list[str] = INFILL_OPTION,
    hold: str = HOLD_OPTION,
    known_encoding: str = KNOWN_ENCODING_OPTION,
    trajectory: int = typer.Option(
        0,
        "--trajectory",
        min=0,
        help="Record the text x_hat decodes to at K evenly spaced steps (see elfctl show).",
    ),
) -> None:
    """Sample texts from an ELF checkpoint (help text: SAMPLE_HELP)."""
    from elfctl.distributed import processes
    from elfctl.runs import SampleRequest, check_request, prepare_sample
    from elfctl.sampling import GRIDS, SAMPLER_NAMES, check_schedule

    check_choice("--sampler", sampler, SAMPLER_NAMES), check_schedule(time_schedule)
    check_precision(precision)
    check_choice("--grid", grid, GRIDS)
    request = SampleRequest(
        checkpoint=repo,
        out_dir=out_dir or Path("outputs") / time.strftime("sample-%Y%m%d-%H%M%S"),
        preset=preset,
        setting=setting,
        overrides=dict(
            steps=steps,
            method=sampler,
            gamma=gamma,
            sc_cfg=sc_cfg,
            cfg=cfg,
            time_schedule=time_schedule,
        ),
        num_samples=num_samples,
        batch_size=batch_size,
        length=length,
        seed=seed,
        tokenizer=tokenizer,
        encoder=encoder,
        precision=precision,
        compile=compile,
        grid=grid,
        trajectory=trajectory,
        force=force,
        resume=resume,
        prompting=prompting_fields(prompt, prompts_file, infill, hold, known_encoding),
        input=input,
        source_field=source_field,
        reference_field=reference_field,
        split=split,
    )
    check_request(request)  # before the model, tokenizer and encoder load
    procs = processes(cpu)
    quiet_unless_main(procs)
    prepared = prepare_sample(request, procs.device)
    for warning in prepared.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    _run(prepared, request, json_out, procs)


def _run(prepared, request, json_out: bool, procs) -> None:
    """Say what is sampled and how, sample with a progress bar, summarise."""
    from elfctl.runs import run_sample

    job, loaded, out_dir = prepared.job, prepared.loaded, request.out_dir
    plan = job.plan(loaded, out_dir, request.resume_mode)  # checks an unfinished run first
    s = job.setting
    gamma = f", gamma {s.gamma}" if s.method == "sde" else ""
    where = f"{procs.world} processes on {procs.device.type}" if procs.world > 1 else procs.device
    console.print(
        f"sampling {prepared.what} ({s.method.upper()}, {s.steps} steps{gamma}, SC-CFG "
        f"{s.sc_cfg}, CFG {s.cfg}, {s.time_schedule} grid {job.grid}) on {where}, "
        f"precision {job.precision_for(loaded).describe()}",
        highlight=False,
    )
    if plan.done:
        console.print(
            f"resuming the unfinished run in {out_dir}: {plan.done} of {job.num_samples} "
            "samples already done",
            highlight=False,
        )
    if plan.damaged:
        console.print(
            f"resampling damaged batch file(s): {', '.join(plan.damaged)}", highlight=False
        )
    with progress("sampling", plan.pending_samples, "samples") as advance:
        info = run_sample(prepared, request, plan, procs, on_batch=advance)
    if procs.is_main:
        _summarise(out_dir, info, json_out)


def prompting_fields(
    prompt: list[str] | None,
    prompts_file: Path | None,
    infill: list[str] | None,
    hold: str | None,
    known_encoding: str | None,
) -> dict:
    """SampleJob's prompting fields from the flags ({} without prompts or templates)."""
    from elfctl.sampling import ENCODINGS, HOLDS, read_prompts

    if hold is not None and hold not in HOLDS:
        raise UserError(f"--hold must be noised or clean, got '{hold}'.")
    if known_encoding is not None and known_encoding not in ENCODINGS:
        raise UserError(f"--known-encoding must be masked or segments, got '{known_encoding}'.")
    prompts = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if prompts and infill:
        raise UserError("--prompt/--prompts and --infill cannot be combined; choose one.")
    if not prompts and not infill:
        if hold is not None or known_encoding is not None:
            raise UserError("--hold and --known-encoding need --prompt, --prompts or --infill.")
        return {}
    return {
        "prompts": prompts or None,
        "templates": list(infill) if infill else None,
        "hold": hold,
        "known_encoding": known_encoding,
    }


def _summarise(out_dir: Path, info: dict, json_out: bool) -> None:
    from elfctl import records

    rows = records.read_samples(out_dir / "samples.jsonl")
    console.print(
        f"wrote {len(rows)} samples to {out_dir}/samples.jsonl in {info['wall_seconds']:.1f}s "
        f"({info['samples_per_s']:.2f} samples/s, {info['dtype']} on {info['device']})",
        highlight=False,
    )
    for row in rows[:3]:
        if row["condition"] is not None:
            console.print(f"  [dim]#{row['id']} <[/] {row['condition'][:200]}", highlight=False)
        console.print(f"  [dim]#{row['id']}[/] {row['text'][:200]}", highlight=False)
    if json_out:
        out.print_json(json.dumps(info))
