"""Sample runs: checkpoint + tokenizer + settings -> a directory with samples.jsonl and run.json.

`elfctl sample` and `elfctl eval` are thin layers over `SampleJob.run`.

Conditional runs (a job with `conditions`) encode each batch's sources with the frozen
encoder just before sampling that batch (docs/method.md section 5), so memory holds one
batch of condition latents, never the whole input's.

A run is resumable and data-parallel: finished batches wait in `OUT/.unfinished/` (one
file per batch, written atomically, beside `job.json`, the fingerprint of the settings)
until every batch is done; then the main process writes samples.jsonl (in id order) and
run.json and removes the folder. Under `accelerate launch` each process samples every
N-th pending batch (distributed.py); samples are keyed by (seed, id) (streams.py), so
they do not depend on how the work was split or interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from elfctl import distributed, records
from elfctl.config import Config, SamplingSetting
from elfctl.errors import UserError
from elfctl.model.checkpoints import Checkpoint, build_model, checkpoint_config, load_checkpoint
from elfctl.model.encoder import load_encoder, load_tokenizer
from elfctl.model.network import size_name
from elfctl.precision import Precision, sampling_precision
from elfctl.sampling.conditions import (
    Condition,
    condition_ids_used,
    count_truncated,
    encode_conditions,
)
from elfctl.sampling.prompting import (
    DEFAULT_ENCODING,
    DEFAULT_HOLD,
    check_fits,
    known_tokens,
    layouts_for,
)
from elfctl.sampling.sampler import SamplerSettings, detokenize, sample_batch, setting_kwargs
from elfctl.sampling.solvers import check_setting, forwards_for
from elfctl.sampling.trajectory import recorded_steps
from elfctl.version import __version__


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: Config
    checkpoint: Checkpoint
    encoder: torch.nn.Module | None = None  # the frozen encoder, loaded for conditional runs


def load_for_sampling(
    checkpoint: str,
    preset: str | Config | None = None,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    with_encoder: bool = False,
    for_prompting: bool = False,
    encoder: str | None = None,
) -> LoadedModel:
    """The EMA model, its tokenizer and the config that describes it.

    See `checkpoint_config` for how the checkpoint and `preset` (a name or a Config)
    combine. `with_encoder` also loads the frozen encoder of `config.encoder`, which
    only conditional sampling needs; `for_prompting` loads it for any model (prompts and
    infill templates need their clean latents). `encoder` replaces the config's encoder (a
    local copy of it, say) as `tokenizer` replaces its tokenizer.
    """

    ckpt = load_checkpoint(checkpoint)
    config = checkpoint_config(ckpt, preset)
    if encoder is not None:
        config.encoder = dataclasses.replace(config.encoder, encoder=encoder)
    model = build_model(ckpt.state_dict, config.model, checkpoint).to(device).eval()
    model.requires_grad_(False)
    tok = load_tokenizer(tokenizer or config.encoder.tokenizer)
    if len(tok) != config.model.vocab_size:
        raise UserError(
            f"The checkpoint's vocabulary has {config.model.vocab_size} entries but the tokenizer "
            f"'{tokenizer or config.encoder.tokenizer}' has {len(tok)}; pass the matching "
            "--tokenizer."
        )
    if with_encoder or for_prompting:
        if with_encoder:
            check_conditional(config, checkpoint)
        frozen = load_encoder(config.encoder, device)
        if frozen.width != config.model.latent_dim:
            raise UserError(
                f"The checkpoint works in {config.model.latent_dim}-wide latents but the encoder "
                f"'{config.encoder.encoder}' is {frozen.width} wide; pass the matching --preset."
            )
        return LoadedModel(model, tok, config, ckpt, frozen)
    return LoadedModel(model, tok, config, ckpt, None)


def check_conditional(config: Config, checkpoint: str) -> None:
    """Conditional sampling needs a model trained on conditions, with a condition budget."""
    data = config.data
    if not data.conditional or not 0 < data.max_input_length < data.max_length:
        raise UserError(
            f"{checkpoint} is not described as a conditional model (data.conditional "
            f"{str(data.conditional).lower()}, max_input_length {data.max_input_length}); "
            "sampling from sources needs one, e.g. --preset de-en-b or xsum-b for an official "
            "checkpoint."
        )


UNFINISHED_DIR = ".unfinished"  # finished batches of a run in progress, and its settings
JOB_FILE = "job.json"


@dataclass
class SamplePlan:
    """What is left of a sample run: the batches still to sample (all processes')."""

    done: int  # samples already in finished batch files (a resumed run)
    pending: list[list[int]]  # sample ids, one list per batch, in id order
    damaged: list[str] = field(default_factory=list)  # batch files found cut short: resampled

    @property
    def pending_samples(self) -> int:
        return sum(len(batch) for batch in self.pending)


@dataclass
class SampleJob:
    """Everything that defines a sample run (recorded verbatim in run.json).

    Sample i's randomness is keyed by (seed, i) (streams.py), so the samples depend on
    the settings only: not on the batch size (with `grid="per-sample"`), the number of
    processes or which process drew them. A run keeps each finished batch in
    `out_dir/.unfinished/` until the whole run is written, so a killed run started
    again continues from its last finished batch.
    """

    setting: SamplingSetting
    num_samples: int
    length: int
    seed: int = 0
    batch_size: int = 32
    precision: str = "auto"
    compile: bool = False
    conditions: list[str] | None = None  # source texts, for conditional models
    references: list[str | None] | None = None
    condition_ids: list[list[int] | None] | None = None  # a dataset's own ids per source
    meta: dict = field(default_factory=dict)
    grid: str = "per-sample"  # "per-batch": the official port's one time grid per batch
    # Prompting / infilling (`prompting`): row i holds prompts[i % len] or templates[i % len].
    prompts: list[str] | None = None
    templates: list[str] | None = None
    hold: str | None = None  # default: prompting.DEFAULT_HOLD
    known_encoding: str | None = None  # default: prompting.DEFAULT_ENCODING
    trajectory: int = 0  # record x_hat's text at this many evenly spaced steps

    # ------------------------------------------------------------------ resuming

    def fingerprint(self, loaded: LoadedModel, device: torch.device) -> dict:
        """What the samples depend on: a run in progress resumes only under the same."""
        setting = {k: v for k, v in asdict(self.setting).items() if k not in ("paper", "name")}
        setting.pop("num_samples"), setting.pop("batch_size")
        sources = None
        if self.conditions is not None:
            text = json.dumps([self.conditions, self.references], ensure_ascii=False)
            sources = hashlib.sha256(text.encode()).hexdigest()
        return {
            "checkpoint_sha256": _checkpoint_sha256(loaded.checkpoint),
            "tokenizer": loaded.config.encoder.tokenizer,
            "sampler": setting,
            "num_samples": self.num_samples,
            "length": self.length,
            "seed": self.seed,
            "grid": self.grid,
            # A per-batch grid is keyed by the batch: only then does the batch size matter.
            "batch_size": self.batch_size if self.grid == "per-batch" else None,
            "dtype": self.precision_for(loaded).name,
            "device_type": device.type,
            "sources_sha256": sources,
            "prompts": self.prompts,
            "templates": self.templates,
            **(self._known_options() if self._known_given() else {}),
            "trajectory": self.trajectory,
        }

    def plan(self, loaded: LoadedModel, out_dir: Path, resume: str = "auto") -> SamplePlan:
        """The batches left to sample in `out_dir`, checking a run in progress there.

        resume "auto" continues an unfinished run of the same settings (a different one
        is an error), "must" requires one, "never" starts over (the unfinished batches
        are discarded when `run` starts).
        """
        device = next(loaded.model.parameters()).device
        check_setting(self.setting.method, self.setting.time_schedule)
        self._layouts(loaded)  # prompts and templates must fit before anything is written
        unfinished = Path(out_dir) / UNFINISHED_DIR
        done: set[int] = set()
        damaged: list[str] = []
        if resume != "never" and (unfinished / JOB_FILE).exists():
            recorded = records.read_json_state(
                unfinished / JOB_FILE,
                f"pass --force to start the run in {out_dir} over (its finished batches are "
                f"discarded), or delete {unfinished}.",
            )
            wanted = self.fingerprint(loaded, device)
            if recorded != wanted:
                changed = sorted(k for k in wanted if recorded.get(k) != wanted[k])
                raise UserError(
                    f"{out_dir} holds an unfinished run with other settings ({', '.join(changed)}"
                    "); run the same command to resume it, or pass --force to start over."
                )
            batches, damaged = _finished_batches(unfinished)
            for rows in batches:
                done.update(row["id"] for row in rows)
        elif resume == "must":
            raise UserError(f"--resume: {out_dir} holds no unfinished sample run to resume.")
        pending = [i for i in range(self.num_samples) if i not in done]
        return SamplePlan(len(done), distributed.batches(pending, self.batch_size), damaged)

    def finished(self, loaded: LoadedModel, out_dir: Path) -> dict | None:
        """run.json of a finished run of these settings in `out_dir`; None if there is none.

        A finished run of other settings is an error (it is never overwritten silently).
        """
        out_dir = Path(out_dir)
        if not (out_dir / records.SAMPLES_FILE).exists():
            return None
        run_file = out_dir / records.RUN_FILE
        fix = f"pass --force to sample {out_dir} again, or another --out."
        info = records.read_json_state(run_file, fix) if run_file.exists() else {}
        device = next(loaded.model.parameters()).device
        if info.get("fingerprint") != self.fingerprint(loaded, device):
            raise UserError(
                f"{out_dir} already holds samples of other settings; pass --force or another --out."
            )
        return info

    # ------------------------------------------------------------------ running

    def run(
        self,
        loaded: LoadedModel,
        out_dir: Path,
        on_batch: Callable[[int], None] | None = None,
        condition: Condition | None = None,
        procs: distributed.Processes | None = None,
        plan: SamplePlan | None = None,
        resume: str = "auto",
    ) -> dict:
        """Sample what `plan` leaves (default: `self.plan(..., resume)`), then write
        samples.jsonl and run.json into `out_dir`; returns run.json.

        Under several processes each samples every N-th pending batch, and the main
        process writes the files. `condition` (encoded conditions for all samples)
        replaces encoding `conditions` batch by batch with `loaded.encoder`.
        """
        procs = procs or distributed.Processes(device=next(loaded.model.parameters()).device)
        device = next(loaded.model.parameters()).device
        out_dir = Path(out_dir)
        unfinished = out_dir / UNFINISHED_DIR
        plan = plan or self.plan(loaded, out_dir, resume)
        if not procs.all_same(plan.pending):
            raise RuntimeError("the processes see different unfinished batches in " + str(out_dir))
        procs.barrier()  # everyone has read the unfinished batches before any are added
        if procs.is_main:
            if resume == "never":
                shutil.rmtree(unfinished, ignore_errors=True)
            for name in plan.damaged:  # their samples are in plan.pending: sampled again
                (unfinished / name).unlink(missing_ok=True)
            records.atomic_write_json(unfinished / JOB_FILE, self.fingerprint(loaded, device))
        procs.barrier()

        start = time.perf_counter()
        mine = distributed.my_share(plan.pending, procs)
        net = torch.compile(loaded.model) if self.compile else loaded.model
        for ids in mine:
            rows = self._sample_rows(loaded, net, ids, condition)
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            records.atomic_write_text(unfinished / _batch_name(ids), lines)
            if on_batch is not None:
                on_batch(len(ids) * procs.world)  # the main process speaks for all
        if device.type == "cuda":
            torch.cuda.synchronize()
        mine_seconds = time.perf_counter() - start
        per_process = procs.gather(
            {"samples": sum(len(ids) for ids in mine), "seconds": mine_seconds}
        )
        procs.barrier()  # every batch file is written
        wall = time.perf_counter() - start
        info = self.describe(loaded, device, wall, plan, per_process)
        if plan.damaged:
            info["resampled_batches"] = list(plan.damaged)
        info["fingerprint"] = self.fingerprint(loaded, device)
        if procs.is_main:
            rows = _rows_in_order(unfinished, self.num_samples)
            records.write_samples(out_dir, rows)
            records.write_run_json(out_dir, info)
            shutil.rmtree(unfinished)
        procs.barrier()
        return info

    def _sample_rows(self, loaded, net, ids: list[int], condition: Condition | None) -> list[dict]:
        """One batch of sample rows (ids consecutive or not), conditioned where asked."""
        cond = None
        if self.conditions is not None or condition is not None:
            cond = self._batch_condition(loaded, ids, condition)
        out = sample_batch(
            net,
            sampler_settings(self.setting),
            ids,
            self.seed,
            self.length,
            cond,
            self.grid,
            self.precision_for(loaded).sampling,
            pad_id=_token_id(loaded.tokenizer.pad_token_id, 0),
            eos_id=_token_id(loaded.tokenizer.eos_token_id, 1),
            known=self._batch_known(loaded, ids),
            trajectory=self.trajectory,
        )
        tokens, trajectories = out.tokens, out.trajectories or [None] * len(ids)
        texts = detokenize(loaded.tokenizer, tokens)
        return [
            records.sample_row(
                i,
                text,
                tokens=row_tokens,
                condition=self.conditions[i] if self.conditions else None,
                reference=self.references[i] if self.references else None,
                seed=self.seed,
                meta=self._row_meta(loaded, i, trajectory),
            )
            for i, text, row_tokens, trajectory in zip(
                ids, texts, tokens, trajectories, strict=True
            )
        ]

    # ------------------------------------------------------------------ prompting

    def _known_given(self) -> list[str] | None:
        return self.prompts or self.templates

    def _known_options(self) -> dict:

        return {
            "hold": self.hold or DEFAULT_HOLD,
            "known_encoding": self.known_encoding or DEFAULT_ENCODING,
        }

    def _layouts(self, loaded: LoadedModel) -> list:
        """Parsed prompts or templates, checked to fit in the output tokens ([] if none)."""
        if not self._known_given():
            return []

        data = loaded.config.data
        conditional = self.conditions is not None
        budget = data.max_length - data.max_input_length if conditional else self.length
        layouts = layouts_for(loaded.tokenizer, self.prompts, self.templates)
        check_fits(layouts, budget)
        return layouts

    def _batch_known(self, loaded: LoadedModel, ids: list[int]):
        """The known tokens of one batch (`prompting.KnownTokens`), or None."""
        layouts = self._layouts(loaded)
        if not layouts:
            return None

        if loaded.encoder is None:
            raise ValueError("prompting needs load_for_sampling(..., for_prompting=True)")
        options = self._known_options()
        data = loaded.config.data
        conditional = self.conditions is not None
        return known_tokens(
            loaded.encoder,
            loaded.tokenizer,
            [layouts[i % len(layouts)] for i in ids],
            data.max_length if conditional else self.length,
            hold=options["hold"],
            encoding=options["known_encoding"],
            sources=[self.conditions[i] for i in ids] if conditional else None,
            max_input_length=data.max_input_length,
            pad_token=data.pad_token,
            device=next(loaded.model.parameters()).device,
            token_ids=[self.condition_ids[i] for i in ids]
            if conditional and self.condition_ids
            else None,
        )

    def _row_meta(self, loaded: LoadedModel, i: int, trajectory: dict | None) -> dict:
        """A row's prompt or template, and its trajectory when one was recorded."""
        meta = {}
        given = self._known_given()
        if given:
            meta["prompt" if self.prompts else "template"] = given[i % len(given)]
        if trajectory is not None:
            texts = detokenize(loaded.tokenizer, trajectory["tokens"])
            meta["trajectory"] = {
                "steps": trajectory["steps"],
                "t": trajectory["t"],
                "texts": texts,
            }
        return meta

    def _prompting_info(self) -> dict:
        info = {}
        given = self._known_given()
        if given:
            info["prompting"] = {
                "kind": "prompt" if self.prompts else "infill",
                "count": len(given),
                **self._known_options(),
            }
        if self.trajectory:
            info["trajectory"] = {"k": self.trajectory}
        return info

    def forwards(self, plan: SamplePlan | None = None) -> dict:
        """Network forwards: per sample (the sampler's true count, the decode, one decode per
        trajectory frame) and in all for the batches this session sampled. A CFG pair run
        as one forward of twice the rows counts once."""
        sampling = forwards_for(self.setting.method, self.setting.steps)
        frames = len(recorded_steps(self.setting.steps, self.trajectory)) if self.trajectory else 0
        per_batch = sampling + 1 + frames
        if plan is not None:
            batches = len(plan.pending)
        else:
            batches = -(-self.num_samples // self.batch_size)
        return {
            "sampling": sampling,
            "decode": 1,
            "trajectory": frames,
            "per_batch": per_batch,
            "batches": batches,
            "total": per_batch * batches,
        }

    def precision_for(self, loaded: LoadedModel) -> Precision:
        """The precision this job samples in: `precision.resolve_sampling` of --precision
        and the model config's train.gpu_precision, on the model's device."""
        device = next(loaded.model.parameters()).device
        return sampling_precision(self.precision, loaded.config.train.gpu_precision, device)

    def _batch_condition(self, loaded, ids: list[int], condition: Condition | None) -> Condition:
        """The encoded conditions of one batch: rows of `condition`, or encoded here."""
        device = next(loaded.model.parameters()).device
        if condition is not None:
            index = torch.tensor(ids, device=condition.latents.device)
            return Condition(
                latents=condition.latents[index].to(device),
                mask=condition.mask[index].to(device),
                lengths=condition.lengths[index].to(device),
                max_input_length=condition.max_input_length,
            )

        if loaded.encoder is None:
            raise ValueError("conditional sampling needs load_for_sampling(..., with_encoder=True)")
        if self.num_samples > len(self.conditions):
            raise ValueError(f"{self.num_samples} samples but {len(self.conditions)} conditions")
        data = loaded.config.data
        encoded, _ = encode_conditions(
            loaded.encoder,
            loaded.tokenizer,
            [self.conditions[i] for i in ids],
            data.max_length,
            data.max_input_length,
            device,
            data.pad_token,
            token_ids=[self.condition_ids[i] for i in ids] if self.condition_ids else None,
        )
        return encoded

    def describe(
        self,
        loaded: LoadedModel,
        device: torch.device,
        wall: float,
        plan: SamplePlan | None = None,
        per_process: list[dict] | None = None,
    ) -> dict:
        ckpt = loaded.checkpoint
        sampled = plan.pending_samples if plan is not None else self.num_samples
        per_process = per_process or [{"samples": sampled, "seconds": wall}]
        precision = self.precision_for(loaded)
        info = {
            "elfctl_version": __version__,
            "checkpoint": {
                "path": ckpt.path,
                "format": ckpt.format,
                "step": ckpt.step,
                "sha256": _checkpoint_sha256(ckpt),
                "model": size_name(loaded.config.model),
            },
            "preset": loaded.config.name,
            "tokenizer": loaded.config.encoder.tokenizer,
            "sampler": {
                "method": self.setting.method,
                "steps": self.setting.steps,
                "gamma": self.setting.gamma,
                "cfg": self.setting.cfg,
                "sc_cfg": self.setting.sc_cfg,
                "time_schedule": self.setting.time_schedule,
                "noise_scale": self.setting.noise_scale,
                "setting": self.setting.name,
            },
            "forwards": self.forwards(plan),
            "grid": self.grid,
            "num_samples": self.num_samples,
            "length": self.length,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": str(device),
            "device_name": _device_name(device),
            "dtype": precision.name,
            "precision_reason": precision.reason,
            "compile": self.compile,
            "processes": len(per_process),
            # This session's sampling: a resumed run counts only what it sampled itself.
            "resumed_samples": plan.done if plan is not None else 0,
            "sampled_samples": sampled,
            "wall_seconds": round(wall, 3),
            "samples_per_s": round(sampled / max(wall, 1e-9), 4),
            "samples_per_s_per_process": [
                round(p["samples"] / max(p["seconds"], 1e-9), 4) for p in per_process
            ],
            "meta": self.meta,
            "setting_full": asdict(self.setting),
            **self._prompting_info(),
        }
        if self.conditions is not None:
            data = loaded.config.data
            n = self.num_samples
            ids = self.condition_ids[:n] if self.condition_ids else None
            info["conditioning"] = {
                "max_length": data.max_length,
                "max_input_length": data.max_input_length,
                "output_length": data.max_length - data.max_input_length,
                "truncated_sources": count_truncated(
                    loaded.tokenizer, self.conditions[:n], data.max_input_length, ids
                ),
                **condition_ids_used(self.condition_ids, n),
            }
        return info


_SHA256: dict[tuple, str] = {}


def _checkpoint_sha256(ckpt: Checkpoint) -> str:
    """The checkpoint's sha256, hashed once per file version (plans and run.json need it)."""
    file = Path(ckpt.path)
    stat = (file / "model.safetensors" if file.is_dir() else file).stat() if file.exists() else None
    key = (str(file), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)
    if key not in _SHA256:
        _SHA256[key] = ckpt.sha256()
    return _SHA256[key]


def sampler_settings(setting: SamplingSetting) -> SamplerSettings:
    return SamplerSettings(**setting_kwargs(setting))


def _token_id(value: int | None, default: int) -> int:
    return default if value is None else value


def _batch_name(ids: list[int]) -> str:
    return f"batch_{ids[0]:09d}_{len(ids):06d}.jsonl"


def _finished_batches(unfinished: Path) -> tuple[list[list[dict]], list[str]]:
    """The rows of every complete batch file, and the names of damaged ones.

    Batch files are written by atomic rename, but a disk that fills or a copy cut short
    can still leave one incomplete: a line that is not JSON, a row without an id, or
    fewer rows than its name says. Such a batch is not trusted: it is sampled again.
    """
    batches, damaged = [], []
    for path in sorted(unfinished.glob("batch_*.jsonl")):
        rows = _read_batch(path)
        if rows is None:
            damaged.append(path.name)
        else:
            batches.append(rows)
    return batches, damaged


def _read_batch(path: Path) -> list[dict] | None:
    """A batch file's rows, or None when it is damaged."""
    match = re.fullmatch(r"batch_(\d+)_(\d+)\.jsonl", path.name)
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ids = [row.get("id") if isinstance(row, dict) else None for row in rows]
    if match is None or not all(isinstance(i, int) for i in ids) or len(rows) != int(match[2]):
        return None
    return rows


def _rows_in_order(unfinished: Path, num_samples: int) -> list[dict]:
    by_id = {row["id"]: row for rows in _finished_batches(unfinished)[0] for row in rows}
    missing = [i for i in range(num_samples) if i not in by_id]
    if missing:
        raise RuntimeError(f"{len(missing)} samples missing from {unfinished}, first {missing[0]}")
    return [by_id[i] for i in range(num_samples)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
