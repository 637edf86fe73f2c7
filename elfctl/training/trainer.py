"""The training loop on Hugging Face Accelerate (docs/method.md section 4).

One optimiser step = one global batch = per-device micro-batches x processes x
accumulation. Every micro-batch's loss is divided by the global number of
loss-mask tokens, so accumulation and data parallelism keep the objective's
single denominator. The data order is a pure function of (seed, epoch), and a
checkpoint stores where in it training stands plus every RNG state, so a resumed
run continues exactly where the checkpoint left it.

Run directory:
    config.yaml            the resolved config
    train_log.jsonl        one line per logged step
    checkpoints/step_N/    model.safetensors (EMA weights), config.yaml, meta.json,
                           training_state/ (raw weights, optimiser, scheduler, RNG)
    samples/step_N.jsonl   periodic samples from the EMA weights
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elfctl import records
from elfctl.config import Config, dump_yaml, to_dict
from elfctl.data.inputs import read_input_rows
from elfctl.data.pipeline import check_data_settings
from elfctl.data.rows import Collator, EpochShuffler, load_corpus
from elfctl.data.streamed_rows import RowStream
from elfctl.errors import UserError
from elfctl.model.checkpoints import (
    WEIGHTS_FILE,
    list_step_dirs,
    read_config_state,
    save_model_checkpoint,
)
from elfctl.model.encoder import load_encoder, load_tokenizer
from elfctl.model.network import ELF
from elfctl.precision import Precision, training_precision
from elfctl.sampling.conditions import encode_conditions
from elfctl.sampling.sampler import generate, setting_kwargs
from elfctl.training import autoconfig
from elfctl.training.finetune import init_model, load_init_weights
from elfctl.training.objective import draw, elf_loss, encode_batch
from elfctl.training.optim import (
    EMA,
    build_optimizer,
    build_scheduler,
    learning_rate,
    resolve_warmup_steps,
)
from elfctl.training.tracking import Tracking

# Config sections that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.max_minutes",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_every",
    "train.sample_count",
    "train.epochs",
    "train.compile",
    "train.gpu_precision",  # a resumed run may move to other hardware
    "data.num_proc",  # how the rows are prepared, not what they are
    "data.cache_dir",
    "description",
}


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


def prepare_run_dir(run_dir: Path, cfg: Config, resume: str) -> Path | None:
    """Check the run directory against the config; return the checkpoint to resume from."""
    checkpoints = list_step_dirs(run_dir / "checkpoints")
    saved_config = run_dir / "config.yaml"
    saved = read_saved_config(run_dir)
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "meta.json").is_file() or not (path / "training_state").is_dir():
            raise UserError(f"--resume {resume} is not a complete training checkpoint directory.")
        return path
    if resume == "never" and (checkpoints or saved_config.exists()):
        raise UserError(
            f"{run_dir} already holds a run; resume it with --resume auto or choose a new "
            "--run-dir."
        )
    if saved is not None:
        _check_same_run(saved, cfg, run_dir)
    return checkpoints[-1] if checkpoints else None


def read_saved_config(run_dir: Path) -> Config | None:
    """The resolved config a run directory was started with, if any."""
    path = Path(run_dir) / "config.yaml"
    fix = f"restore it (it records how {run_dir} was started), or use another --run-dir."
    return read_config_state(path, fix) if path.exists() else None


def _check_same_run(saved: Config, cfg: Config, run_dir: Path) -> None:
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key in RESUMABLE_CHANGES or key.startswith(("sampling", "train.init_from")):
            continue
        if old.get(key) != new.get(key):
            raise UserError(
                f"{run_dir} was trained with {key}={old.get(key)!r}, not {new.get(key)!r}; "
                "use a new --run-dir or the original settings."
            )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "paper":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trainer:
    """Holds the pieces of a run; `fit` runs the loop. Only the main process writes."""

    def __init__(
        self, cfg: Config, run_dir: Path, accelerator, resume: str = "auto", data_progress=None
    ):

        cfg = copy.deepcopy(cfg)  # `auto` values and init provenance are resolved in place
        self.cfg, self.run_dir, self.acc = cfg, Path(run_dir), accelerator
        self.device = accelerator.device
        self.micro, self.accum = plan_batches(cfg, accelerator.num_processes)

        self._check_data_settings()  # before anything heavy is loaded
        saved = read_saved_config(self.run_dir) if resume != "never" else None
        if saved is not None:  # a resumed run keeps the numbers it was started with
            autoconfig.inherit_resolved(cfg, saved)
            cfg.train.init_from = saved.train.init_from
        else:
            cfg.train.init_from = {}  # filled by initial_model when fine-tuning
        self.tokenizer = load_tokenizer(cfg.encoder.tokenizer)
        self.auto_settings = autoconfig.resolve_vocab_size(cfg, self.tokenizer)
        self.resume_from = prepare_run_dir(self.run_dir, cfg, resume)
        if len(self.tokenizer) != cfg.model.vocab_size:
            raise UserError(
                f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer "
                f"'{cfg.encoder.tokenizer}' has {len(self.tokenizer)} entries."
            )
        measuring = autoconfig.needs_latent_stats(cfg)
        self.encoder = load_encoder(cfg.encoder, self.device, measuring=measuring)
        if self.encoder.width != cfg.model.latent_dim:
            raise UserError(
                f"model.latent_dim is {cfg.model.latent_dim} but the encoder "
                f"'{cfg.encoder.encoder}' has width {self.encoder.width}."
            )
        self.collate = Collator.for_tokenizer(cfg.data, self.tokenizer)
        self.stream = None  # streaming.RowStream when data.streaming
        if cfg.data.streaming:
            self.rows, self.prepared, self.stream = None, None, self._open_stream()
            self.auto_settings.update(
                autoconfig.resolve_latent_stats(
                    cfg, self.encoder, self._first_streamed_rows(), self.collate, self.device
                )
            )
            self.steps_per_epoch = None  # a stream's length is not known
            self.total_steps = cfg.train.max_steps
        else:
            self.rows, self.prepared = self._load_rows(data_progress)
            self.auto_settings.update(
                autoconfig.resolve_latent_stats(
                    cfg, self.encoder, self.rows, self.collate, self.device
                )
            )
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
            self.total_steps = cfg.train.max_steps or math.ceil(
                cfg.train.epochs * self.steps_per_epoch
            )

        model = self.initial_model().to(self.device)
        self.ema = EMA(model, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        optimizer = build_optimizer(
            model, cfg.optim, learning_rate(cfg.optim, cfg.train.global_batch)
        )
        warmup = resolve_warmup_steps(cfg.optim, self.steps_per_epoch)
        self.scheduler = build_scheduler(optimizer, warmup, self.total_steps, cfg.optim.schedule)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw_model = model
        self.forward_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.step, self.epoch, self.position = 0, 0, 0
        self.log_with: list[str] = []  # Accelerate trackers (elfctl/tracking.py)
        self.tracker_name = self.run_dir.name
        # Per-rank training randomness, independent of the (shared) init seed.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1000 + 17 + accelerator.process_index)
        if self.resume_from is not None:
            self._load(self.resume_from)

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

    def _check_data_settings(self) -> None:

        cfg = self.cfg
        check_data_settings(cfg.data)
        if not cfg.data.streaming:
            return
        if cfg.train.max_steps is None:
            raise UserError("data.streaming needs train.max_steps: a stream's length is unknown.")
        if cfg.optim.warmup_epochs is not None and cfg.optim.warmup_steps is None:
            raise UserError("data.streaming needs optim.warmup_steps, not optim.warmup_epochs.")

    def _open_stream(self):
        """This process's streamed rows (data.streaming); the run's length must be given."""

        cfg, acc = self.cfg, self.acc
        return RowStream(
            cfg.data.train,
            cfg.data,
            self.tokenizer,
            cfg.data.split,
            acc.process_index,
            acc.num_processes,
        )

    def _first_streamed_rows(self):
        """The stream's first `encoder.latent_stats_rows` rows (as one process sees the whole
        stream), where `auto` latent statistics are measured; None if none are auto."""

        if not autoconfig.needs_latent_stats(self.cfg):
            return None
        from datasets import Dataset

        cfg = self.cfg
        stream = RowStream(cfg.data.train, cfg.data, self.tokenizer, cfg.data.split)
        return Dataset.from_list(stream.take(cfg.encoder.latent_stats_rows))

    def _epoch(self) -> float:
        if self.stream is not None:
            return self.stream.epoch  # passes over this process's stream
        return self.step / self.steps_per_epoch

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
        rows = self._row_batches()
        for _ in range(self.accum):
            batch = self.collate(next(rows))
            batches.append({k: v.to(self.device) for k, v in batch.items()})
        return batches

    def _row_batches(self):
        """Micro-batches of rows from where training stands (the position advances)."""
        if self.stream is not None:
            while True:
                yield self.stream.take(self.micro)
        order = self.shuffler.batches(self.micro, self.epoch, self.position)
        while True:
            indices, self.epoch, self.position = next(order)
            columns = self.rows[indices]  # {column: [value per row]}
            yield [{name: columns[name][i] for name in columns} for i in range(len(indices))]

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
            self.run_dir.mkdir(parents=True, exist_ok=True)
            records.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
            self._trim_log()

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
                    _append_jsonl(self.run_dir / "train_log.jsonl", last_record)
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
            "epoch": round(self._epoch(), 4),
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
        name = f"step_{self.step:08d}"
        staging = self.run_dir / "checkpoints" / f".staging-{name}"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        rank = acc.process_index
        _atomic_torch_save(
            {"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
            staging / f"rng_rank{rank}.pt",
        )
        if self.stream is not None:  # each process's own position in the stream
            state = json.dumps(self.stream.state_dict())
            records.atomic_write_text(staging / f"stream_rank{rank}.json", state)
        acc.wait_for_everyone()
        target = self.run_dir / "checkpoints" / name
        if acc.is_main_process:
            raw = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
            torch.save(raw, staging / "model_raw.pt")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            torch.save(self.ema.state_dict()["num_updates"], staging / "ema_updates.pt")
            meta = {"epoch": self.epoch, "position": self.position, "world_size": acc.num_processes}
            (staging / "trainer.json").write_text(json.dumps(meta))
            save_model_checkpoint(
                target,
                self.ema.averaged_state_dict(self.raw_model),
                self.cfg,
                self.step,
                extra_meta={
                    "epoch": self._epoch(),
                    "data": meta,
                    "precision": precision_name(acc.mixed_precision),
                },
                extra_files={"training_state": staging},
            )
            self._apply_retention()
        acc.wait_for_everyone()
        return target

    def _apply_retention(self) -> None:
        keep = max(1, self.cfg.train.keep_checkpoints)
        for old in list_step_dirs(self.run_dir / "checkpoints")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, checkpoint: Path) -> None:
        state = checkpoint / "training_state"
        fix = (
            f"delete {checkpoint} to resume from the checkpoint before it, or pass --resume never "
            "to start over."
        )

        def read(path: Path, reader: Callable = torch.load, **kwargs):
            with records.reading_state(path, fix):
                return reader(path, **kwargs)

        trainer = records.read_json_state(state / "trainer.json", fix)
        if trainer["world_size"] != self.acc.num_processes:
            raise UserError(
                f"{checkpoint} was written by {trainer['world_size']} processes; resume it with "
                f"the same number (this run has {self.acc.num_processes})."
            )
        meta = records.read_json_state(checkpoint / "meta.json", fix)
        self.step, self.epoch, self.position = meta["step"], trainer["epoch"], trainer["position"]
        raw = read(state / "model_raw.pt", map_location=self.device, weights_only=True)
        self.raw_model.load_state_dict(raw, strict=True)
        self.optimizer.load_state_dict(
            read(state / "optimizer.pt", map_location=self.device, weights_only=True)
        )
        self.scheduler.load_state_dict(read(state / "scheduler.pt", weights_only=True))
        ema_weights = read(checkpoint / WEIGHTS_FILE, _load_safetensors, device=str(self.device))
        self.ema.load_state_dict(
            {
                "shadow": {k: ema_weights[k] for k in self.ema.shadow},
                "num_updates": read(state / "ema_updates.pt", weights_only=True),
                "decay": self.ema.decay,
                "warmup": self.ema.warmup,
            }
        )
        if self.stream is not None:
            rank = self.acc.process_index
            self.stream.load_state_dict(
                records.read_json_state(state / f"stream_rank{rank}.json", fix)
            )
        rng = read(state / f"rng_rank{self.acc.process_index}.pt", weights_only=True)
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])

    def _trim_log(self) -> None:
        """Drop log lines past the resumed step: those steps will be trained again."""
        log = self.run_dir / "train_log.jsonl"
        if not log.exists():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill
        records.atomic_write_text(log, "".join(kept))

    # -- samples -----------------------------------------------------------------------

    def sample_now(self) -> list[str]:
        """A few samples from the EMA weights into samples/step_N.jsonl (main process).

        Conditional runs sample the first validation sources, with the preset's guidance.
        """
        if not self.acc.is_main_process:
            return []

        cfg = self.cfg
        with torch.device("meta"):
            ema_model = ELF(cfg.model)
        ema_model.load_state_dict(self.ema.averaged_state_dict(self.raw_model), assign=True)
        ema_model.eval()
        setting = cfg.sampling[0]
        kwargs = setting_kwargs(setting)
        condition, sources, references = self._sample_conditions()
        if condition is None:
            kwargs["cfg"] = 1.0  # nothing to guide towards
        result = generate(
            ema_model,
            self.tokenizer,
            **kwargs,
            num_samples=cfg.train.sample_count,
            length=setting.length or cfg.data.max_length,
            seed=cfg.train.seed,
            condition=condition,
            precision="bf16" if self.acc.mixed_precision == "bf16" else "fp32",  # as training
        )
        rows = [
            records.sample_row(
                i,
                text,
                tokens=tokens,
                condition=sources[i] if sources else None,
                reference=references[i] if references else None,
                seed=cfg.train.seed,
                meta={"step": self.step},
            )
            for i, (text, tokens) in enumerate(zip(result.texts, result.tokens, strict=True))
        ]
        records.write_samples(self.run_dir / "samples" / f"step_{self.step:08d}.jsonl", rows)
        return result.texts

    def _sample_conditions(self):
        """(Condition, sources, references) of the first validation rows, or Nones."""
        data = self.cfg.data
        if not data.conditional or not data.validation:
            return None, None, None
        if not hasattr(self, "_conditions"):
            rows = read_input_rows(
                data.validation,
                data.source_field,
                data.target_field,
                split=data.validation_split,
                limit=self.cfg.train.sample_count,
            )
            condition, _ = encode_conditions(
                self.encoder,
                self.tokenizer,
                rows.texts,
                data.max_length,
                data.max_input_length,
                self.device,
                data.pad_token,
                token_ids=rows.token_ids,  # the set's own condition ids, as in evaluation
            )
            self._conditions = condition, rows.texts, rows.references
        return self._conditions


def _maybe_no_sync(accelerator, model, sync: bool):
    import contextlib

    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def _append_jsonl(path: Path, record: dict) -> None:
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
) -> TrainResult:
    """Train (or resume) a run; the library entry point behind `elfctl train`."""
    accelerator = accelerator or make_accelerator(gpu_precision=cfg.train.gpu_precision)
    return Trainer(cfg, Path(run_dir), accelerator, resume).fit(on_step)


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)
