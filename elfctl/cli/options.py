"""Options every command shares, defined once: precision, compile, CPU, JSON, lists.

`flag` is how every on/off option is declared: typer 0.29 shows each option's type beside
it, which for an on/off switch reads `--force <bool>` as if it took a value; an empty
metavar leaves the type column empty (tests/test_cli_help.py renders every command's help
to keep it so). Checks of option values raise UserError so that they read as the other
bad-input errors (one sentence, exit 2), and run before any work.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from elfctl.errors import UserError
from elfctl.precision import SAMPLING_FLAGS, TRAINING_FLAGS


def flag(*decls: str, help: str, **kwargs: Any) -> Any:
    """An on/off option (default off) shown without a value in the help."""
    return typer.Option(False, *decls, help=help, metavar="", **kwargs)


def flag_info(*decls: str, help: str) -> Any:
    """`flag` for an `Annotated[bool, ...]` declaration (the default sits on the parameter)."""
    return typer.Option(*decls, help=help, metavar="")


def md(text: str) -> str:
    """Help text with its square brackets shown as written (`[gap:5]`, `elfctl[plot]`):
    rich would otherwise take them for markup and drop them."""
    return text.replace("[", "\\[")


# ----------------------------------------------------------------------------- sampling

Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (on a GPU the config's train.gpu_precision, bf16 in the official presets; "
        "fp32 on the CPU), bf16 or fp32.",
    ),
]
Compile = Annotated[bool, flag_info("--compile", help="torch.compile the network.")]
Cpu = Annotated[bool, flag_info("--cpu", help="Run on the CPU even if a GPU is present.")]


def json_flag(what: str, table: bool = True) -> Any:
    """`--json`: print `what` as JSON on stdout; messages (and the table) go to stderr."""
    moved = " (the table goes to stderr)" if table else ""
    return flag("--json", help=f"Print {what} as JSON on stdout{moved}.")


def check_precision(precision: str) -> None:
    if precision not in SAMPLING_FLAGS:
        raise UserError(f"--precision must be auto, bf16 or fp32, got '{precision}'.")


# ----------------------------------------------------------------------------- training

MixedPrecision = Annotated[
    str,
    typer.Option(
        "--mixed-precision",
        help="no or bf16 (default: Accelerate's bf16/fp16 if it names one, else the config's "
        "train.gpu_precision on a GPU, bf16 in the official presets; fp32 on the CPU).",
    ),
]
TrainCpu = Annotated[bool, flag_info("--cpu", help="Train on the CPU even if a GPU is present.")]


def check_mixed_precision(mixed_precision: str | None) -> None:
    if mixed_precision is not None and mixed_precision not in TRAINING_FLAGS:
        raise UserError(f"--mixed-precision must be no or bf16, got '{mixed_precision}'.")


# ----------------------------------------------------------------------------- choices


def check_choice(option: str, value: str | None, choices: tuple[str, ...] | list[str]) -> None:
    """`--sampler must be ode or sde, got 'x'.`; None (not given) passes."""
    if value is None or value in choices:
        return
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
    raise UserError(f"{option} must be {listed}, got '{value}'.")


def parse_int_list(text: str, option: str, minimum: int = 0, what: str = "value") -> list[int]:
    """'8,16,32' -> [8, 16, 32]: the one parser of every comma-separated list of integers
    (--steps, --seeds), with one message: distinct integers, each at least `minimum`, no
    empty entries ('8,,16' is a typo, not two values)."""
    kind = "non-negative integers" if minimum == 0 else f"integers of at least {minimum}"
    shape = f"{option} must be distinct {kind} separated by commas, got '{text}'."
    example = ",".join(str(minimum + i) for i in range(3))
    if not text.strip():
        raise UserError(f"{option} names no values; {shape}")
    parts = [part.strip() for part in text.split(",")]
    if not all(part.lstrip("-").isdigit() for part in parts):
        raise UserError(f"{shape} Give comma-separated integers, e.g. {example}.")
    values = [int(part) for part in parts]
    if min(values) < minimum:
        raise UserError(f"{shape} Each must be at least {minimum}.")
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise UserError(f"{option} names {what} {twice} twice.")
    return values
