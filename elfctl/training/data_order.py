"""Which rows each optimiser step trains on, in each process (docs/method.md section 4).

Prepared rows are read in an order that is a pure function of (seed, epoch), each process
taking its share (`data.rows.EpochShuffler`); with data.streaming, each process reads its own
share of the stream. Where in that order training stands (epoch and position, or the
stream's state) is saved with every checkpoint, so a resumed run reads the same rows next.
"""

from __future__ import annotations

import math

from elfctl.config import Config
from elfctl.data.pipeline import check_data_settings
from elfctl.data.rows import EpochShuffler, load_corpus
from elfctl.data.streamed_rows import RowStream
from elfctl.errors import UserError
from elfctl.training import autoconfig


def check_settings(cfg: Config) -> None:
    """Data settings a run cannot use, refused before anything heavy is loaded."""
    check_data_settings(cfg.data)
    if not cfg.data.streaming:
        return
    if cfg.train.max_steps is None:
        raise UserError("data.streaming needs train.max_steps: a stream's length is unknown.")
    if cfg.optim.warmup_epochs is not None and cfg.optim.warmup_steps is None:
        raise UserError("data.streaming needs optim.warmup_steps, not optim.warmup_epochs.")


class DataOrder:
    """This process's rows in training order, and where in that order training stands."""

    def __init__(self, cfg: Config, tokenizer, accelerator, data_progress=None):
        self.cfg, self.tokenizer, self.acc = cfg, tokenizer, accelerator
        self.epoch, self.position = 0, 0
        self.rows, self.prepared, self.stream = None, None, None
        if cfg.data.streaming:
            self.stream = RowStream(
                cfg.data.train,
                cfg.data,
                tokenizer,
                cfg.data.split,
                accelerator.process_index,
                accelerator.num_processes,
            )
            self.steps_per_epoch = None  # a stream's length is not known
            return
        self.rows, self.prepared = self._load_rows(data_progress)
        n_rows = len(self.rows)
        if n_rows < cfg.train.global_batch:
            raise UserError(
                f"The training data has {n_rows} rows, fewer than one global batch "
                f"({cfg.train.global_batch})."
            )
        self.shuffler = EpochShuffler(
            n_rows, cfg.train.seed, accelerator.process_index, accelerator.num_processes
        )
        self.steps_per_epoch = n_rows // cfg.train.global_batch

    def _load_rows(self, data_progress=None):
        """(rows, pipeline.PreparedRows or None). Raw text and packed rows are built once,
        by the main process; the others wait, then read its cache (they never tokenize)."""
        data, acc = self.cfg.data, self.acc
        with acc.main_process_first():
            loaded = load_corpus(
                data.train,
                data,
                self.tokenizer,
                data.split,
                may_build=acc.is_main_process,
                on_progress=data_progress if acc.is_main_process else None,
            )
        return loaded.rows, loaded.prepared

    def total_steps(self) -> int:
        """The run's length: train.max_steps, else train.epochs of the rows."""
        train = self.cfg.train
        return train.max_steps or math.ceil(train.epochs * self.steps_per_epoch)

    def stats_rows(self):
        """The rows where `auto` latent statistics are measured: the prepared rows, or the
        stream's first `encoder.latent_stats_rows` (as one process sees the whole stream);
        None for a stream when no statistic is auto."""
        if self.stream is None:
            return self.rows
        if not autoconfig.needs_latent_stats(self.cfg):
            return None
        from datasets import Dataset

        cfg = self.cfg
        stream = RowStream(cfg.data.train, cfg.data, self.tokenizer, cfg.data.split)
        return Dataset.from_list(stream.take(cfg.encoder.latent_stats_rows))

    def batches(self, size: int):
        """Batches of `size` rows from where training stands (the position advances)."""
        if self.stream is not None:
            while True:
                yield self.stream.take(size)
        order = self.shuffler.batches(size, self.epoch, self.position)
        while True:
            indices, self.epoch, self.position = next(order)
            columns = self.rows[indices]  # {column: [value per row]}
            yield [{name: columns[name][i] for name in columns} for i in range(len(indices))]

    def epochs_done(self, step: int) -> float:
        """Passes over the data after `step` steps (over this process's stream when
        streaming)."""
        if self.stream is not None:
            return self.stream.epoch
        return step / self.steps_per_epoch

    def state(self) -> dict:
        """Where training stands in the prepared rows' order (saved in trainer.json)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, epoch: int, position: int, stream_state: dict | None) -> None:
        self.epoch, self.position = epoch, position
        if self.stream is not None:
            self.stream.load_state_dict(stream_state)
