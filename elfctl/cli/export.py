"""`elfctl export`: a run or checkpoint -> a shareable folder (official layout or ours)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from elfctl.cli.app import app, console, handle_errors, out
from elfctl.cli.options import flag, json_flag


@app.command(
    help=(
        "Export a run directory or checkpoint as a shareable folder with a model card "
        "(README.md) and its config.\n\n"
        "--format official (default) writes the official PyTorch port's layout: one "
        "checkpoint_<step> torch.save dict with params and ema_params1 under the official key "
        "names. --format elfctl writes our checkpoint layout. `elfctl sample --repo OUT` "
        "loads either."
    ),
    epilog=(
        "Examples:\n\n"
        "  elfctl export runs/tiny exports/tiny\n\n"
        "  elfctl export runs/owt-b exports/elf-b --format elfctl --eval outputs/eval-owt-b/"
        "eval.json\n\n"
        "  elfctl export runs/my-finetune exports/my-finetune --push-to-hub me/my-elf"
    ),
)
@handle_errors
def export(
    source: str = typer.Argument(..., help="A run directory or any checkpoint sample accepts."),
    out_dir: Path = typer.Argument(..., help="The folder to write."),
    fmt: str = typer.Option("official", "--format", help="official or elfctl."),
    eval_files: list[Path] = typer.Option(
        None, "--eval", help="eval.json file(s) whose figures go into the model card."
    ),
    push_to_hub: str = typer.Option(
        None, "--push-to-hub", help="Upload the folder to this hub model repo (ORG/NAME)."
    ),
    private: bool = flag("--private", help="Create the hub repo as private."),
    force: bool = flag("--force", help="Replace an existing OUT folder."),
    json_out: bool = json_flag("a summary", table=False),
) -> None:
    from elfctl.convert import FORMATS
    from elfctl.convert import export as run_export
    from elfctl.convert import push_to_hub as push
    from elfctl.errors import UserError

    if fmt not in FORMATS:
        raise UserError(f"--format must be official or elfctl, got '{fmt}'.")
    if push_to_hub is not None and push_to_hub.count("/") != 1:
        raise UserError(f"--push-to-hub expects a repo id ORG/NAME, got '{push_to_hub}'.")
    result = run_export(source, out_dir, fmt, eval_files=eval_files, force=force)
    console.print(
        f"exported step {result.step} of {source} to {result.out_dir} ({fmt} layout: "
        f"{', '.join(result.files)})",
        highlight=False,
    )
    url = None
    if push_to_hub:
        url = push(result.out_dir, push_to_hub, private=private)
        console.print(f"pushed to {url}", highlight=False)
    if json_out:
        summary = {
            "out_dir": str(result.out_dir),
            "format": fmt,
            "step": result.step,
            "files": result.files,
            "raw_weights": result.raw_weights,
            "hub_url": url,
        }
        out.print_json(json.dumps(summary))
