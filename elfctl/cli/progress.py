"""Progress reporting: a rich bar on a terminal, plain periodic lines in a log.

A rich bar prints nothing to a non-terminal until it ends, so when stderr is not
a terminal we write one readable line every `log_every_s` seconds instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from elfctl.cli.app import console, is_terminal


@contextlib.contextmanager
def progress(
    description: str,
    total: int,
    unit: str,
    extra: Callable[[], str] | None = None,
    log_every_s: float = 10.0,
) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; shows done/total, rate in `unit`/s, elapsed and remaining time.

    `extra` returns a short status string (e.g. the latest loss) shown beside the bar.
    """
    start = time.perf_counter()
    done = 0
    if is_terminal():
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
        ]
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(description, total=total, rate="", extra="")

            def advance(n: int = 1) -> None:
                nonlocal done
                done += n
                rate = done / max(time.perf_counter() - start, 1e-9)
                status = extra() if extra else ""
                bar.update(task, advance=n, rate=f"{rate:.2f} {unit}/s", extra=status)

            yield advance
        return

    last_log = start

    def advance_plain(n: int = 1) -> None:
        nonlocal done, last_log
        done += n
        now = time.perf_counter()
        if now - last_log >= log_every_s or done >= total:
            last_log = now
            rate = done / max(now - start, 1e-9)
            status = f" {extra()}" if extra else ""
            console.print(
                f"{description}: {done}/{total} ({rate:.2f} {unit}/s, {now - start:.0f}s){status}",
                highlight=False,
            )

    yield advance_plain


class ChunkProgress:
    """A `pipeline.Progress` callback (documents done, documents in all, tokens done):
    the `progress` bar in documents/s, with tokens/s beside it."""

    def __init__(self, description: str = "tokenizing"):
        self.description = description
        self.stack = contextlib.ExitStack()
        self.advance: Callable[[int], None] | None = None
        self.done = self.tokens = 0
        self.start = time.perf_counter()

    def _rate(self) -> str:
        return f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tokens/s"

    def __call__(self, done: int, total: int, tokens: int) -> None:
        if self.advance is None:
            self.start = time.perf_counter()
            bar = progress(self.description, total, "docs", extra=self._rate)
            self.advance = self.stack.enter_context(bar)
        self.tokens = tokens
        self.advance(done - self.done)
        self.done = done
        if done >= total:
            self.stack.close()


def fit_with_progress(trainer, description: str = "training", l2_name: str = "l2"):
    """Run `trainer.fit` under a progress bar whose status is the latest logged record.

    `l2_name` labels the regression part of the loss ("pd" for distillation).
    """
    latest: dict = {}

    def status() -> str:
        if not latest:
            return ""
        r = latest
        return (
            f"loss {r['loss']:.3f} {l2_name} {r['l2']:.3f} ce {r['ce']:.3f} lr {r['lr']:.2e} "
            f"{r['tokens_per_s']:.0f} tok/s"
        )

    remaining = trainer.total_steps - trainer.step
    with progress(description, remaining, "steps", extra=status) as advance:

        def on_step(report) -> None:
            if report.record is not None:
                latest.update(report.record)
            advance(1)

        return trainer.fit(on_step)
