"""`elfctl convert-jax`: official JAX/Flax checkpoints (Orbax or msgpack) -> PyTorch."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer

from elfctl.cli.app import app, console, handle_errors, out
from elfctl.cli.options import flag, json_flag
from elfctl.cli.progress import progress
from elfctl.errors import UserError

HELP = (
    "Convert an official JAX ELF checkpoint (or the JAX T5 encoder) to PyTorch; no JAX needed."
    "\n\nSRC: an Orbax checkpoint directory (OCDBT or one folder per leaf), a Flax msgpack "
    "file, a folder of checkpoint_<step> entries (the highest step is taken) or a hub repo "
    "id. Only the chosen weights are read. The tree is checked against the ELF architecture "
    "(every tensor used, none missing, every shape right) before anything is written; "
    "Dense kernels are transposed, all other tensors copied; output is float32."
    "\n\nDST with --format official (default): a folder that receives checkpoint_<step> (the "
    "official PyTorch port's format; with one set of weights, `params` and `ema_params1` "
    "hold the same tensors). With --format elfctl: our checkpoint directory "
    "(model.safetensors + config.yaml + meta.json); --preset supplies its tokenizer, data "
    "and sampling settings. Either loads with `elfctl sample --repo DST`."
    "\n\nA final layer that is all zeros means the checkpoint is untrained (or the weights "
    "were not found): that is an error unless --allow-untrained, which converts it with a "
    "warning."
)


@app.command(
    "convert-jax",
    help=HELP,
    epilog=(
        "Examples:\n\n"
        "  elfctl convert-jax embedded-language-flows/ELF-B-owt ckpts/elf-b\n\n"
        "  elfctl convert-jax ~/jax_run/checkpoints runs/elf-b --format elfctl --preset owt-b\n\n"
        "  elfctl convert-jax ckpt.msgpack out --weights both --force\n\n"
        "  elfctl convert-jax embedded-language-flows/t5_small_encoder_jax t5-enc --encoder "
        "--compare t5-small"
    ),
)
@handle_errors
def convert_jax(
    src: str = typer.Argument(..., help="Orbax dir, msgpack file, checkpoint folder or hub id."),
    dst: Path = typer.Argument(..., help="Where to write the converted checkpoint."),
    weights: str = typer.Option(
        "ema", "--weights", help="ema (ema_params1, used for sampling), params, or both."
    ),
    fmt: str = typer.Option("official", "--format", help="official (PyTorch port) or elfctl."),
    preset: str = typer.Option(
        None, "--preset", help="Preset whose architecture must match and whose settings are kept."
    ),
    force: bool = flag("--force", help="Overwrite an existing destination."),
    allow_untrained: bool = flag(
        "--allow-untrained", help="Convert even if the final layer is all zeros."
    ),
    encoder: bool = flag(
        "--encoder", help="SRC is the JAX T5 encoder pickle: write a T5EncoderModel folder."
    ),
    compare: str = typer.Option(
        None, "--compare", help="With --encoder: reference T5 folder or hub id to compare with."
    ),
    json_out: bool = json_flag("the summary", table=False),
) -> None:
    from elfctl.convert import jax as conv

    if compare and not encoder:
        raise UserError("--compare only applies to --encoder conversions.")
    if compare:
        _check_local_reference(compare)  # before anything is converted or written
    if encoder:
        summary = conv.convert_t5_encoder(src, dst, force=force, compare=compare)
        _print_encoder_summary(summary, json_out)
        return

    with _reading_progress() as report:
        result = conv.convert_checkpoint(
            src,
            dst,
            weights=weights,
            fmt=fmt,
            preset=preset,
            force=force,
            allow_untrained=allow_untrained,
            progress=report,
        )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    summary = result.summary()
    if json_out:
        out.print_json(json.dumps(summary))
        return
    console.print(
        f"Converted {summary['tensors']} tensors ({summary['parameters']:,} parameters per set), "
        f"step {summary['step']}, weights {summary['weights']}, "
        f"{summary['source_dtype'] or 'no floating'} -> float32, "
        f"H {summary['hidden_size']} x {summary['depth']} blocks, "
        f"{summary['seconds']:.1f} s.\n"
        f"Wrote {summary['destination']} ({summary['format']} format).",
        highlight=False,
    )


def _check_local_reference(compare: str) -> None:
    from elfctl.model.encoder import looks_like_local_path

    path = Path(compare).expanduser()
    if (looks_like_local_path(compare) or path.exists()) and not path.is_dir():
        raise UserError(f"--compare {compare}: no such folder (a T5 folder or a hub id).")


@contextlib.contextmanager
def _reading_progress():
    """A progress callback for the reader; the bar opens once the total is known."""
    stack = contextlib.ExitStack()
    state = {"advance": None, "done": 0}

    def report(done: int, total: int, unit: str) -> None:
        if state["advance"] is None:
            state["advance"] = stack.enter_context(progress("reading", total, unit))
        if done > state["done"]:
            state["advance"](done - state["done"])
            state["done"] = done

    with stack:
        yield report


def _print_encoder_summary(summary: dict, json_out: bool) -> None:
    if json_out:
        out.print_json(json.dumps(summary))
        return
    console.print(
        f"Converted the T5 encoder: {summary['tensors']} tensors, {summary['parameters']:,} "
        f"parameters, {summary['layers']} layers, d_model {summary['d_model']}, "
        f"{summary['seconds']:.1f} s.\nWrote {summary['destination']}.",
        highlight=False,
    )
    if "compare" in summary:
        console.print(
            f"Against {summary['compare']}: largest weight difference "
            f"{summary['max_weight_diff']:.3g} ({summary['max_weight_diff_tensor']}), largest "
            f"hidden-state difference {summary['max_hidden_diff']:.3g}.",
            highlight=False,
        )
