"""`elfctl show`: a sample run's texts and denoising trajectories, in the terminal or drawn."""

from __future__ import annotations

from pathlib import Path

import typer

from elfctl.cli.app import app, console, handle_errors
from elfctl.cli.options import flag
from elfctl.errors import UserError


@app.command(
    epilog=(
        "Examples:\n\n"
        "  elfctl sample --repo runs/tiny --num-samples 4 --trajectory 8 --out outputs/traj\n\n"
        "  elfctl show outputs/traj                 # every sample, step by step\n\n"
        "  elfctl show outputs/traj --id 2 --out trajectory.png\n\n"
        "  elfctl show outputs/traj --id 2 --out trajectory.gif\n\n"
        "  elfctl show outputs/sweep-tiny --out sweep.png   # a sweep's table, re-plotted"
    )
)
@handle_errors
def show(
    samples_dir: Path = typer.Argument(
        ..., help="A sample run directory, samples.jsonl, or a sweep directory (sweep.json)."
    ),
    sample_id: int = typer.Option(None, "--id", help="Only the sample with this id."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Draw the trajectory of --id to a .png or .gif, or a sweep's plot to a .png "
        "(needs elfctl[plot]).",
    ),
    force: bool = flag("--force", help="Overwrite an existing --out file."),
    limit: int = typer.Option(
        10, "--limit", min=1, help="Show at most this many samples without --id."
    ),
) -> None:
    """Show a sample run: each sample's text and, when recorded, how it formed from noise.

    A trajectory (`elfctl sample --trajectory K`) is shown as one line per recorded step
    with the words that changed since the step before highlighted. A sweep directory
    (`elfctl sweep`) shows its table and where its plot is; --out draws the plot again.
    """
    from elfctl.runs import PLOT_SUFFIXES, draw_trajectory, load_rows, pick, trajectory_of

    if out is not None:
        if out.suffix not in PLOT_SUFFIXES:
            raise UserError(f"--out {out}: expected a .png or .gif file.")
        if out.exists() and not force:
            raise UserError(f"{out} already exists; pass --force or another --out.")
    if (samples_dir / "sweep.json").is_file():
        _show_sweep(samples_dir, out)
        return
    rows = pick(load_rows(samples_dir), sample_id)
    if out is not None:
        if sample_id is None and len(rows) > 1:
            raise UserError("--out draws one sample: choose it with --id.")
        trajectory = trajectory_of(rows[0])
        if trajectory is None:
            raise UserError(
                f"Sample {rows[0]['id']} has no trajectory; sample with --trajectory K first."
            )
        draw_trajectory(trajectory, out)
        console.print(f"wrote {out} ({len(trajectory.steps)} steps)", highlight=False)
        return
    for row in rows[:limit]:
        _print_row(row, trajectory_of(row))
    if len(rows) > limit:
        console.print(f"[dim]... {len(rows) - limit} more (--limit, --id)[/]", highlight=False)


def _print_row(row: dict, trajectory) -> None:
    from rich.text import Text

    header = Text(f"#{row['id']}", style="bold")
    known = row["meta"].get("prompt") or row["meta"].get("template")
    if row["condition"] is not None:
        header.append(f"  < {row['condition'][:200]}", style="dim")
    if known:
        header.append(f"  ({known})", style="dim")
    console.print(header)
    if trajectory is None:
        console.print(Text(f"  {row['text']}"))
        return
    for step, t, words, changed in zip(
        trajectory.steps, trajectory.times, trajectory.words(), trajectory.changes(), strict=True
    ):
        line = Text(f"  step {step:>3}  t={t:.2f}  ", style="dim")
        for word, new in zip(words, changed, strict=True):
            line.append(word, style="bold black on yellow" if new else "")
            line.append(" ")
        console.print(line)
    console.print(Text(f"  final          {row['text']}", style="bold"))


def _show_sweep(directory: Path, out: Path | None) -> None:
    from elfctl.cli.sweep import report
    from elfctl.runs import sweep

    summary = sweep.load(directory)
    report(summary, json_out=False)
    if out is not None:
        if out.suffix != ".png":
            raise UserError(f"--out {out}: a sweep is drawn to a .png file.")
        console.print(f"wrote {sweep.plot(summary, out)}", highlight=False)
    elif (directory / sweep.PLOT_FILE).exists():
        console.print(f"plot: {directory / sweep.PLOT_FILE}", highlight=False)
