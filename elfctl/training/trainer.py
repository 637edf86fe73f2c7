"""The training loop on Hugging Face Accelerate (docs/method.md section 4).

One optimiser step = one global batch = per-device micro-batches x processes x
accumulation. Every micro-batch's loss is divided by the global number of
loss-mask tokens, so accumulation and data parallelism keep the objective's
single denominator. The data order is a pure function of (seed, epoch), and a
checkpoint stores where in it training stands plus every RNG state, so a resumed
run continues exactly where the checkpoint left it.

What a run writes and when it may resume is `run_dir.py`'s; the checkpoint's training state
is `training_state.py`'s; preview samples are `previews.py`'s.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elfctl.config import Config
from elfctl.data.rows import Collator
from elfctl.distributed import local_device
from elfctl.errors import UserError
from elfctl.model.checkpoints import save_model_checkpoint
from elfctl.model.encoder import load_encoder, load_tokenizer
from elfctl.model.network import ELF
from elfctl.precision import Precision, training_precision
from elfctl.training import autoconfig
from elfctl.training.data_order import DataOrder, check_settings
from elfctl.training.finetune import init_model, load_init_weights
from elfctl.training.objective import draw, elf_loss, encode_batch
from elfctl.training.optim import (
    EMA,
    build_optimizer,
    build_scheduler,
    learning_rate,
    resolve_warmup_steps,
)
from elfctl.training.previews import Previews
from elfctl.training.run_dir import (
    CHECKPOINTS,
    append_log,
    apply_retention,
    prepare_run_dir,
    read_saved_config,
    start_run,
    step_name,
)
from elfctl.training.tracking import Tracking
from elfctl.training.training_state import (
    STATE_DIR,
    read_training_state,
    write_process_state,
    write_shared_state,
)


@dataclass
class StepReport:
    step: int
    total_steps: int
    record: dict | None = None  # set on logging steps
    checkpoint: Path | None = None
    samples: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    seconds: float
    last_record: dict | None


def plan_batches(cfg: Config, world_size: int) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) for the configured global batch."""
    G = cfg.train.global_batch
    micro = cfg.train.micro_batch or max(1, G // world_size)
    if G % (micro * world_size):
        raise UserError(
            f"train.global_batch {G} is not a multiple of train.micro_batch {micro} x "
            f"{world_size} processes."
        )
    return micro, G // (micro * world_size)


class Trainer:
    """Holds the pieces of a run; `fit` runs the loop. Only the main process writes.

    `log_with` names Accelerate trackers (tracking.py) and `tracker_name` the run they log
    to (default: the run directory's name); `data_progress` reports the building of
    prepared rows.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        accelerator,
        resume: str = "auto",
        *,
        data_progress=None,
        log_with: Sequence[str] = (),
        tracker_name: str | None = None,
    ):
        cfg = copy.deepcopy(cfg)  # `auto` values and init provenance are resolved in place
        self.cfg, self.run_dir, self.acc = cfg, Path(run_dir), accelerator
        self.device = local_device(accelerator.device)
        self.micro, self.accum = plan_batches(cfg, accelerator.num_processes)
        self.log_with = list(log_with)
        self.tracker_name = tracker_name or self.run_dir.name

        check_settings(cfg)  # before anything heavy is loaded
        self._inherit_saved_settings(resume)
        self.tokenizer = load_tokenizer(cfg.encoder.tokenizer)
        self.auto_settings = autoconfig.resolve_vocab_size(cfg, self.tokenizer)
        self.resume_from = prepare_run_dir(self.run_dir, cfg, resume)
        self.encoder = self._load_encoder()
        self.collate = Collator.for_tokenizer(cfg.data, self.tokenizer)
        self._prepare_data(data_progress)
        self._build_model()
        self.step = 0
        # Per-rank training randomness, independent of the (shared) init seed.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1000 + 17 + accelerator.process_index)
        precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"  # as training
        self.previews = Previews(
            cfg, self.run_dir, self.tokenizer, self.encoder, self.device, precision
        )
        if self.resume_from is not None:
            self._load(self.resume_from)

    def _inherit_saved_settings(self, resume: str) -> None:
        """A resumed run keeps the numbers it was started with (`auto` values, init)."""
        cfg = self.cfg
        saved = read_saved_config(self.run_dir) if resume != "never" else None
        if saved is not None:
            autoconfig.inherit_resolved(cfg, saved)
            cfg.train.init_from = saved.train.init_from
        else:
            cfg.train.init_from = {}  # filled by initial_model when fine-tuning

    def _load_encoder(self):
        """The frozen encoder, after checking that it and the tokenizer fit the model."""
        cfg = self.cfg
        if len(self.tokenizer) != cfg.model.vocab_size:
            raise UserError(
                f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer "
                f"'{cfg.encoder.tokenizer}' has {len(self.tokenizer)} entries."
            )
        measuring = autoconfig.needs_latent_stats(cfg)
        encoder = load_encoder(cfg.encoder, self.device, measuring=measuring)
        if encoder.width != cfg.model.latent_dim:
            raise UserError(
                f"model.latent_dim is {cfg.model.latent_dim} but the encoder "
                f"'{cfg.encoder.encoder}' has width {encoder.width}."
            )
        return encoder

    def _prepare_data(self, data_progress) -> None:
        """The rows in training order, `auto` latent statistics, and the run's length."""
        self.data = DataOrder(self.cfg, self.tokenizer, self.acc, data_progress)
        self.total_steps = self.data.total_steps()
        stats = autoconfig.resolve_latent_stats(
            self.cfg, self.encoder, self.data.stats_rows(), self.collate, self.device
        )
        self.auto_settings.update(stats)

    @property
    def prepared(self):
        """The prepared rows' cache (data.pipeline.PreparedRows), or None."""
        return self.data.prepared

    def _build_model(self) -> None:
        """The network, its EMA, optimiser and schedule, prepared for the processes."""
        cfg = self.cfg
        model = self.initial_model().to(self.device)
        self.ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        optimizer = build_optimizer(
            model, cfg.optim, learning_rate(cfg.optim, cfg.train.global_batch)
        )
        warmup = resolve_warmup_steps(cfg.optim, self.data.steps_per_epoch)
        self.scheduler = build_scheduler(optimizer, warmup, self.total_steps, cfg.optim.schedule)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.raw_model = model
        self.forward_model = torch.compile(self.model) if cfg.train.compile else self.model

    def initial_model(self):
        """The network before the first step: `train.init`'s weights when fine-tuning (not
        on resume: the checkpoint brings the weights), else a seeded random init.
        Subclasses warm-start from other weights."""

        torch.manual_seed(self.cfg.train.seed)  # same initial weights on every process
        if self.cfg.train.init and self.resume_from is None:
            source = load_init_weights(self.cfg.train.init, self.cfg.train.init_weights)
            self.cfg.train.init_from = source.provenance
            return init_model(self.cfg, source)
        return ELF(self.cfg.model)

    # -- one optimiser step ----------------------------------------------------------

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        batches = []
        rows = self.data.batches(self.micro)
        for _ in range(self.accum):
            batch = self.collate(next(rows))
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def loss_denominator(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The global number of loss-mask tokens, divided by the processes whose
        gradients DDP averages, so every micro-batch shares one denominator."""
        tokens = sum(b["loss_mask"].sum() for b in batches).float()
        global_tokens = self.acc.reduce(tokens, reduction="sum").clamp_min(1)
        return global_tokens / self.acc.num_processes

    def micro_loss(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor):
        """The objective on one micro-batch -> objective.LossParts."""

        cfg = self.cfg
        B, S = batch["input_ids"].shape
        draws = draw(B, S, cfg.model.latent_dim, cfg.objective, self.device, self.generator)
        x = encode_batch(self.encoder, batch, draws.drop_condition, cfg.data.conditional)
        return elf_loss(
            self.forward_model,
            x,
            batch["input_ids"],
            batch["cond_seq_mask"],
            batch["loss_mask"],
            draws,
            cfg.objective,
            cfg.model.t_eps,
            denominator=denominator,
            no_grad_model=self.raw_model,
        )

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        batches = self._micro_batches()
        denominator = self.loss_denominator(batches)
        sums = torch.zeros(4, device=self.device)
        self.model.train()
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with self.acc.autocast(), _maybe_no_sync(self.acc, self.model, sync):
                parts = self.micro_loss(batch, denominator)
                self.acc.backward(parts.loss)
            sums += torch.stack([parts.ce_sum, parts.l2_sum, parts.ce_tokens, parts.l2_tokens])
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.raw_model)
        self.step += 1
        return {"sums": sums, "grad_norm": torch.as_tensor(grad_norm, device=self.device)}

    # -- the loop ----------------------------------------------------------------------

    def fit(self, on_step: Callable[[StepReport], None] | None = None) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        resumed_from = self.step if self.resume_from is not None else None
        if acc.is_main_process:
            start_run(self.run_dir, cfg, self.step)

        tracking = Tracking(self.log_with, self.run_dir, acc.is_main_process, self.tracker_name)
        tracking.start(cfg)
        try:
            return self._loop(on_step, tracking, resumed_from)
        finally:
            tracking.finish()

    def _loop(self, on_step, tracking, resumed_from: int | None) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        start = time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        window = torch.zeros(4, device=self.device)
        grad_norm = torch.zeros((), device=self.device)
        last_record = None
        seq_tokens = cfg.train.global_batch * cfg.data.max_length
        while self.step < self.total_steps:
            out = self.train_step()
            window += out["sums"]
            grad_norm = out["grad_norm"]
            window_steps += 1
            report = StepReport(self.step, self.total_steps)
            out_of_time = self._out_of_time(start)
            done = self.step >= self.total_steps or out_of_time
            if self.step % cfg.train.log_every == 0 or done:
                totals = acc.reduce(window.clone(), reduction="sum")
                elapsed = time.perf_counter() - window_start
                last_record = self._record(totals, grad_norm, window_steps, elapsed, seq_tokens)
                report.record = last_record
                if acc.is_main_process:
                    append_log(self.run_dir, last_record)
                tracking.log(last_record)
                window.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if self.step % cfg.train.checkpoint_every == 0 or done:
                report.checkpoint = self.save()
            if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                report.samples = self.sample_now()
                tracking.log_samples(report.samples, self.step)
            if on_step is not None:
                on_step(report)
            if out_of_time:
                break
        return TrainResult(
            self.run_dir, self.step, resumed_from, time.perf_counter() - start, last_record
        )

    def _out_of_time(self, start: float) -> bool:
        if self.cfg.train.max_minutes is None:
            return False
        late = time.perf_counter() - start > 60 * self.cfg.train.max_minutes
        flag = torch.tensor([1.0 if late else 0.0], device=self.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)  # all ranks agree

    def _record(self, totals, grad_norm, steps, elapsed, seq_tokens) -> dict:
        ce_sum, l2_sum, ce_tok, l2_tok = totals.tolist()
        return {
            "step": self.step,
            "epoch": round(self.data.epochs_done(self.step), 4),
            "loss": (ce_sum + l2_sum) / max(ce_tok + l2_tok, 1),
            "l2": l2_sum / max(l2_tok, 1),
            "ce": ce_sum / max(ce_tok, 1),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_s": steps * seq_tokens / max(elapsed, 1e-9),
            "steps_per_s": steps / max(elapsed, 1e-9),
            "precision": precision_name(self.acc.mixed_precision),
            "time": time.time(),
        }

    # -- checkpoints -------------------------------------------------------------------

    def save(self) -> Path:
        """Write checkpoints/step_N atomically; every process saves its own RNG state."""
        acc = self.acc
        name = step_name(self.step)
        staging = self.run_dir / CHECKPOINTS / f".staging-{name}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        write_process_state(staging, acc.process_index, self.generator, self.data.stream)
        acc.wait_for_everyone()
        target = self.run_dir / CHECKPOINTS / name
        if acc.is_main_process:
            data = {**self.data.state(), "world_size": acc.num_processes}
            updates = self.ema.state_dict()["num_updates"]
            write_shared_state(
                staging, self.raw_model, self.optimizer, self.scheduler, updates, data
            )
            save_model_checkpoint(
                target,
                self.ema.averaged_state_dict(self.raw_model),
                self.cfg,
                self.step,
                extra_meta={
                    "epoch": self.data.epochs_done(self.step),
                    "data": data,
                    "precision": precision_name(acc.mixed_precision),
                },
                extra_files={STATE_DIR: staging},
            )
            apply_retention(self.run_dir, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return target

    def _load(self, checkpoint: Path) -> None:
        acc = self.acc
        state = read_training_state(checkpoint, acc.process_index, acc.num_processes, self.device)
        self.step = state.step
        self.data.load_state(state.epoch, state.position, state.stream)
        self.raw_model.load_state_dict(state.raw_weights, strict=True)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.ema.load_state_dict(
            {
                "shadow": {k: state.ema_weights[k] for k in self.ema.shadow},
                "num_updates": state.ema_updates,
                "decay": self.ema.decay,
                "warmup": self.ema.warmup,
            }
        )
        self.generator.set_state(state.rng["generator"])
        torch.set_rng_state(state.rng["torch"])

    # -- samples -----------------------------------------------------------------------

    def sample_now(self) -> list[str]:
        """Preview samples from the EMA weights into samples/step_N.jsonl (main process)."""
        if not self.acc.is_main_process:
            return []
        return self.previews.write(self.ema.averaged_state_dict(self.raw_model), self.step)


def _maybe_no_sync(accelerator, model, sync: bool):
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def make_accelerator(
    cpu: bool = False, mixed_precision: str | None = None, gpu_precision: str = "bf16"
):
    """The Accelerator of a training run. Without `mixed_precision` (no, bf16, fp16), the
    precision follows `precision.resolve_training`: Accelerate's choice, else
    `gpu_precision` (a config's train.gpu_precision) on a CUDA GPU, else fp32."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if mixed_precision is None:
        mixed_precision = training_precision(cpu, None, gpu_precision).mode
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def precision_name(mixed_precision: str) -> str:
    """Accelerate's mixed_precision as run records name it: fp32, bf16-autocast, ..."""

    return Precision(str(mixed_precision), "").name


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: str = "auto",
    accelerator=None,
    on_step: Callable[[StepReport], None] | None = None,
    log_with: Sequence[str] = (),
) -> TrainResult:
    """Train (or resume) a run; the library entry point behind `elfctl train`. `log_with`
    names Accelerate trackers (tracking.py)."""
    accelerator = accelerator or make_accelerator(gpu_precision=cfg.train.gpu_precision)
    trainer = Trainer(cfg, Path(run_dir), accelerator, resume, log_with=log_with)
    return trainer.fit(on_step)
