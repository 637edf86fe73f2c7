"""Dynamic batching: requests arriving within a window are sampled together.

One sampling thread owns the model. When it is idle and a job arrives, it waits up to the
window for more jobs of the same key (sequence length, sampler settings, conditioning),
or until they fill `max_batch` rows, then samples them as one batch. Jobs arriving while
a batch runs wait for the next one; jobs of other keys wait for their own batch, oldest
key first. A job whose client went away before its batch started is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    dropped: int = 0  # jobs whose clients left before their batch
    running: int = 0  # jobs in the batch being sampled now

    def as_dict(self) -> dict:
        return {
            "running_requests": self.running,
            "batches": self.batches,
            "rows": self.rows,
            "dropped_jobs": self.dropped,
        }


class Batcher:
    """Collects jobs (each with .key, .rows, .arrived, .cancelled, .deliver) into batches
    and runs `run_batch(jobs)` on its own thread."""

    def __init__(
        self,
        run_batch: Callable[[list], None],
        max_batch: int = 32,
        window_s: float = 0.01,
        on_error: Callable[[BaseException], None] | None = None,
    ):
        self.run_batch, self.max_batch, self.window_s = run_batch, max_batch, window_s
        self.on_error = on_error
        self.stats = BatcherStats()
        self._pending: list = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="elfctl-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job) -> None:
        if job.rows > self.max_batch:
            raise ValueError(f"a job of {job.rows} rows is over max_batch {self.max_batch}")
        with self._lock:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            self._lock.notify()

    def queued(self) -> int:
        with self._lock:
            return len(self._pending)

    def stop(self, timeout: float | None = None) -> None:
        """Sample every job already submitted, then end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if not jobs:
                continue
            self.stats.running = len(jobs)
            try:
                self.run_batch(jobs)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                for job in jobs:
                    job.deliver("error", f"Sampling failed: {type(e).__name__}: {e}")
                if self.on_error is not None:
                    self.on_error(e)
            self.stats.running = 0
            self.stats.batches += 1
            self.stats.rows += sum(job.rows for job in jobs)

    def _take(self) -> list | None:
        """The next batch: the oldest job and the same-key jobs behind it that fit."""
        with self._lock:
            while True:
                self._drop_cancelled()
                if self._pending:
                    break
                if self._stopping:
                    return None
                self._lock.wait()
            key = self._pending[0].key
            deadline = self._pending[0].arrived + self.window_s
            while not self._stopping and self._rows_of(key) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            self._drop_cancelled()
            if not self._pending:
                return []
            key = self._pending[0].key
            batch, rows = [], 0
            for job in list(self._pending):
                if job.key == key and rows + job.rows <= self.max_batch:
                    batch.append(job)
                    rows += job.rows
                    self._pending.remove(job)
            return batch

    def _rows_of(self, key) -> int:
        return sum(job.rows for job in self._pending if job.key == key)

    def _drop_cancelled(self) -> None:
        kept = [job for job in self._pending if not job.cancelled]
        self.stats.dropped += len(self._pending) - len(kept)
        self._pending = kept
