"""What `elfctl show` displays: a sample run's texts and denoising trajectories.

A trajectory (recorded by `elfctl sample --trajectory K`, see `trajectory.py`) lives in
each row's `meta["trajectory"]`: the step numbers, the times, and the text x_hat decoded
to at each recorded step. This module reads them, marks the words that changed since the
step before, and draws them (one line per step) as a PNG or an animated GIF. Drawing
needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elfctl import records
from elfctl.errors import UserError
from elfctl.sampling.trajectory import frame_changes

PLOT_SUFFIXES = (".png", ".gif")


@dataclass
class Trajectory:
    id: int
    steps: list[int]
    times: list[float]
    texts: list[str]  # one per recorded step
    final: str  # the sample's text
    known: str | None = None  # its prompt or template, if any

    def words(self) -> list[list[str]]:
        return [text.split() for text in self.texts]

    def changes(self) -> list[list[bool]]:
        """Per step, per word: did it change since the previous recorded step?"""
        return frame_changes(self.words())


def load_rows(samples_dir: str | os.PathLike[str]) -> list[dict]:
    path = records.samples_path(samples_dir)
    if not path.is_file():
        raise UserError(f"{samples_dir} holds no samples.jsonl.")
    return records.read_samples(path)


def trajectory_of(row: dict) -> Trajectory | None:
    """The row's recorded trajectory, or None when it has none."""
    record = row["meta"].get("trajectory")
    if record is None:
        return None
    try:
        steps, times, texts = list(record["steps"]), list(record["t"]), list(record["texts"])
    except (KeyError, TypeError):
        raise UserError(
            f"Sample {row['id']}: its meta.trajectory is not a recorded trajectory."
        ) from None
    if not (len(steps) == len(times) == len(texts)) or not texts:
        raise UserError(f"Sample {row['id']}: its meta.trajectory has uneven or empty lists.")
    known = row["meta"].get("prompt") or row["meta"].get("template")
    return Trajectory(row["id"], steps, times, texts, row["text"], known)


def pick(rows: list[dict], sample_id: int | None) -> list[dict]:
    """The row with `sample_id` (all rows when None)."""
    if sample_id is None:
        return rows
    chosen = [r for r in rows if r["id"] == sample_id]
    if not chosen:
        raise UserError(f"No sample with id {sample_id} (ids run {_id_range(rows)}).")
    return chosen


def _id_range(rows: list[dict]) -> str:
    ids = [r["id"] for r in rows]
    return f"{min(ids)}-{max(ids)}" if ids else "nowhere: the file is empty"


# ---------------------------------------------------------------------------
# Drawing


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "Drawing a trajectory needs matplotlib: pip install 'elfctl[plot]'."
        ) from None
    return plt


CHANGED = "#ffd54f"  # background of a word that changed since the step before
CHAR_INCH = 0.095  # width of one monospace character at FONT_SIZE
LINE_INCH = 0.32
FONT_SIZE = 11


def _layout(trajectory: Trajectory):
    """Figure size and, per line, (label, [(x in characters, word, changed)])."""
    lines = []
    for step, t, words, changed in zip(
        trajectory.steps, trajectory.times, trajectory.words(), trajectory.changes(), strict=True
    ):
        x, placed = 0, []
        for word, new in zip(words, changed, strict=True):
            placed.append((x, word, new))
            x += len(word) + 1
        lines.append((f"step {step:>3}  t={t:.2f}", placed))
    width = max((x + len(w) for _, placed in lines for x, w, _ in placed), default=10)
    return lines, max(width, 20)


def draw_trajectory(trajectory: Trajectory, out: str | os.PathLike[str]) -> Path:
    """Draw the trajectory to a .png (all steps) or .gif (one step more per frame).

    One line per recorded step; words that changed since the step before are highlighted.
    The file is written under a temporary name and renamed when complete.
    """
    out = Path(out)
    if out.suffix not in PLOT_SUFFIXES:
        raise UserError(f"--out {out}: expected a .png or .gif file.")
    plt = _pyplot()
    lines, width = _layout(trajectory)
    label_chars = max(len(label) for label, _ in lines) + 2
    total_chars = label_chars + width
    title = f"sample {trajectory.id}" + (f"  ({trajectory.known})" if trajectory.known else "")
    fig = plt.figure(figsize=(total_chars * CHAR_INCH + 0.4, (len(lines) + 1.5) * LINE_INCH))
    ax = fig.add_axes((0.01, 0.0, 0.98, 1.0))
    ax.set_xlim(0, total_chars)
    ax.set_ylim(len(lines) + 1.2, -0.2)
    ax.axis("off")
    ax.text(0, 0.1, title, family="monospace", fontsize=FONT_SIZE, weight="bold", va="center")
    artists: list[list] = []
    for row, (label, placed) in enumerate(lines, start=1):
        line = [ax.text(0, row, label, family="monospace", fontsize=FONT_SIZE, color="0.45")]
        for x, word, changed in placed:
            box = {"facecolor": CHANGED, "edgecolor": "none", "pad": 1.0} if changed else None
            line.append(
                ax.text(
                    label_chars + x,
                    row,
                    word,
                    family="monospace",
                    fontsize=FONT_SIZE,
                    bbox=box,
                    weight="bold" if changed else "normal",
                )
            )
        artists.append(line)
    for line in artists:
        for artist in line:
            artist.set_va("center")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        if out.suffix == ".png":
            fig.savefig(tmp, dpi=150)
        else:
            _save_gif(fig, artists, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a picture is for sharing
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _save_gif(fig, artists: list[list], path: str, seconds_per_step: float = 0.8) -> None:
    """Frame k shows the first k steps; the last frame is held a little longer."""
    from matplotlib.animation import PillowWriter

    writer = PillowWriter(fps=1.0 / seconds_per_step)
    with writer.saving(fig, path, dpi=100):
        for k in range(1, len(artists) + 1):
            for row, line in enumerate(artists, start=1):
                for artist in line:
                    artist.set_visible(row <= k)
            writer.grab_frame()
        for _ in range(2):
            writer.grab_frame()
