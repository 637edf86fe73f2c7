"""Sample runs: checkpoint + tokenizer + settings -> a directory with samples.jsonl and run.json.

`elfctl sample` and `elfctl eval` are thin layers over `SampleJob.run`.

Conditional runs (a job with `conditions`) encode each batch's sources with the frozen
encoder just before sampling that batch (ELF_SPEC.md section 5), so memory holds one
batch of condition latents, never the whole input's.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__, records
from .checkpoints import Checkpoint, build_model, load_checkpoint
from .config import Config, SamplingSetting, resolve
from .errors import UserError
from .model import size_name
from .sampler import Condition, Generation, generate, setting_kwargs


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    config: Config
    checkpoint: Checkpoint
    encoder: torch.nn.Module | None = None  # the frozen encoder, loaded for conditional runs


def load_for_sampling(
    source: str,
    preset: str | Config | None = None,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    with_encoder: bool = False,
    for_prompting: bool = False,
) -> LoadedModel:
    """The EMA model, its tokenizer and the config that describes it.

    See `checkpoint_config` for how the checkpoint and `preset` (a name or a Config)
    combine. `with_encoder` also loads the frozen encoder of `config.encoder`, which
    only conditional sampling needs; `for_prompting` loads it for any model (prompts and
    infill templates need their clean latents).
    """
    from .encoder import load_encoder, load_tokenizer

    ckpt = load_checkpoint(source)
    config = checkpoint_config(ckpt, preset)
    model = build_model(ckpt.state_dict, config.model, source).to(device).eval()
    model.requires_grad_(False)
    tok = load_tokenizer(tokenizer or config.encoder.tokenizer)
    if len(tok) != config.model.vocab_size:
        raise UserError(
            f"The checkpoint's vocabulary has {config.model.vocab_size} entries but the tokenizer "
            f"'{tokenizer or config.encoder.tokenizer}' has {len(tok)}; pass the matching "
            "--tokenizer."
        )
    encoder = None
    if with_encoder or for_prompting:
        if with_encoder:
            check_conditional(config, source)
        encoder = load_encoder(config.encoder, device)
        if encoder.width != config.model.latent_dim:
            raise UserError(
                f"The checkpoint works in {config.model.latent_dim}-wide latents but the encoder "
                f"'{config.encoder.encoder}' is {encoder.width} wide; pass the matching --preset."
            )
    return LoadedModel(model, tok, config, ckpt, encoder)


def check_conditional(config: Config, source: str) -> None:
    """Conditional sampling needs a model trained on conditions, with a condition budget."""
    data = config.data
    if not data.conditional or not 0 < data.max_input_length < data.max_length:
        raise UserError(
            f"{source} is not described as a conditional model (data.conditional "
            f"{str(data.conditional).lower()}, max_input_length {data.max_input_length}); "
            "sampling from sources needs one, e.g. --preset de-en-b or xsum-b for an official "
            "checkpoint."
        )


def checkpoint_config(ckpt: Checkpoint, preset: str | Config | None) -> Config:
    """The config that describes a checkpoint.

    The network always comes from the checkpoint (our own checkpoints also bring the
    latent space they were trained in: tokenizer, encoder, latent statistics). A preset
    supplies everything else (data layout, sampling settings); without one, our own
    checkpoints use the config they were trained with and official ones the built-in
    defaults (T5-small and the official unconditional sampling settings).
    """
    if preset is None:
        if ckpt.config is not None:
            return ckpt.config
        config = Config()
    else:
        config = copy.deepcopy(resolve(preset) if isinstance(preset, str) else preset)
    if ckpt.config is not None:
        config.model, config.encoder = ckpt.config.model, ckpt.config.encoder
    else:
        config.model = ckpt.model_config
    return config


@dataclass
class SampleJob:
    """Everything that defines a sample run (recorded verbatim in run.json)."""

    setting: SamplingSetting
    num_samples: int
    length: int
    seed: int = 0
    batch_size: int = 32
    precision: str = "auto"
    compile: bool = False
    conditions: list[str] | None = None  # source texts, for conditional models
    references: list[str | None] | None = None
    meta: dict = field(default_factory=dict)
    # Prompting / infilling (`prompting`): row i holds prompts[i % len] or templates[i % len].
    prompts: list[str] | None = None
    templates: list[str] | None = None
    hold: str | None = None  # default: prompting.DEFAULT_HOLD
    known_encoding: str | None = None  # default: prompting.DEFAULT_ENCODING
    trajectory: int = 0  # record x_hat's text at this many evenly spaced steps

    def run(
        self,
        loaded: LoadedModel,
        out_dir: Path,
        on_batch: Callable[[int], None] | None = None,
        condition: Condition | None = None,
    ) -> dict:
        """Sample, then write samples.jsonl and run.json into `out_dir`; returns run.json.

        With `conditions` (source texts) and no ready `condition`, each batch of sources
        is encoded with `loaded.encoder` and sampled with its own seed (`batch_seeds`).
        """
        device = next(loaded.model.parameters()).device
        start = time.perf_counter()
        truncated = None
        if self.conditions is not None and condition is None:
            result, truncated = self._generate_conditional(loaded, on_batch)
        else:
            result = self._generate(
                loaded, condition, self.seed, self.num_samples, self.batch_size, on_batch
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        rows = [
            records.sample_row(
                i,
                text,
                tokens=tokens,
                condition=self.conditions[i] if self.conditions else None,
                reference=self.references[i] if self.references else None,
                seed=self.seed,
                meta=self._row_meta(i, result),
            )
            for i, (text, tokens) in enumerate(zip(result.texts, result.tokens, strict=True))
        ]
        out_dir.mkdir(parents=True, exist_ok=True)
        records.write_samples(out_dir, rows)
        info = self.describe(loaded, device, wall)
        if truncated is not None:
            data = loaded.config.data
            info["conditioning"] = {
                "max_length": data.max_length,
                "max_input_length": data.max_input_length,
                "output_length": data.max_length - data.max_input_length,
                "truncated_sources": truncated,
            }
        records.write_run_json(out_dir, info)
        return info

    def _known_given(self) -> list[str] | None:
        return self.prompts or self.templates

    def _row_meta(self, i: int, result: Generation) -> dict:
        """A row's prompt or template, and its trajectory when one was recorded."""
        meta = {}
        given = self._known_given()
        if given:
            meta["prompt" if self.prompts else "template"] = given[i % len(given)]
        if result.trajectories is not None:
            record = result.trajectories[i]
            meta["trajectory"] = {k: record[k] for k in ("steps", "t", "texts")}
        return meta

    def _known_options(self) -> dict:
        from .prompting import DEFAULT_ENCODING, DEFAULT_HOLD

        return {
            "hold": self.hold or DEFAULT_HOLD,
            "known_encoding": self.known_encoding or DEFAULT_ENCODING,
        }

    def _generate(
        self,
        loaded: LoadedModel,
        condition: Condition | None,
        seed: int,
        num_samples: int,
        batch_size: int,
        on_batch: Callable[[int], None] | None,
        known=None,
    ) -> Generation:
        prompting = {}
        if self._known_given() and known is None:
            prompting = (
                dict(prompt=self.prompts, infill=self.templates, encoder=loaded.encoder)
                | self._known_options()
            )
        return generate(
            loaded.model,
            loaded.tokenizer,
            **setting_kwargs(self.setting),
            num_samples=num_samples,
            length=self.length,
            seed=seed,
            condition=condition,
            batch_size=batch_size,
            precision=self.precision,
            compile=self.compile,
            on_batch=on_batch,
            known=known,
            trajectory=self.trajectory,
            **prompting,
        )

    def _generate_conditional(
        self, loaded: LoadedModel, on_batch: Callable[[int], None] | None
    ) -> tuple[Generation, int]:
        """Encode and sample one batch of sources at a time -> (outputs in order, # cut)."""
        from .conditions import encode_conditions

        if loaded.encoder is None:
            raise ValueError("conditional sampling needs load_for_sampling(..., with_encoder=True)")
        if self.num_samples > len(self.conditions):
            raise ValueError(f"{self.num_samples} samples but {len(self.conditions)} conditions")
        data = loaded.config.data
        device = next(loaded.model.parameters()).device
        sources = self.conditions[: self.num_samples]
        starts = range(0, len(sources), self.batch_size)
        seeds = batch_seeds(self.seed, len(starts))
        layouts = self._layouts(loaded, data.max_length - data.max_input_length)
        tokens: list[list[int]] = []
        texts: list[str] = []
        trajectories: list[dict] | None = [] if self.trajectory else None
        truncated = 0
        for start, seed in zip(starts, seeds, strict=True):
            chunk = sources[start : start + self.batch_size]
            condition, cut = encode_conditions(
                loaded.encoder,
                loaded.tokenizer,
                chunk,
                data.max_length,
                data.max_input_length,
                device,
                data.pad_token,
            )
            known = None
            if layouts:
                from .prompting import known_tokens

                options = self._known_options()
                known = known_tokens(
                    loaded.encoder,
                    loaded.tokenizer,
                    [layouts[i % len(layouts)] for i in range(start, start + len(chunk))],
                    data.max_length,
                    hold=options["hold"],
                    encoding=options["known_encoding"],
                    sources=chunk,
                    max_input_length=data.max_input_length,
                    pad_token=data.pad_token,
                    device=device,
                )
            part = self._generate(
                loaded, condition, seed, len(chunk), len(chunk), on_batch, known=known
            )
            tokens.extend(part.tokens)
            texts.extend(part.texts)
            if trajectories is not None:
                trajectories.extend(part.trajectories)
            truncated += cut
        return Generation(tokens=tokens, texts=texts, trajectories=trajectories), truncated

    def _layouts(self, loaded: LoadedModel, budget: int) -> list:
        """Parsed prompts or templates, checked to fit in `budget` output tokens."""
        from .prompting import check_fits, layouts_for

        layouts = layouts_for(loaded.tokenizer, self.prompts, self.templates)
        check_fits(layouts, budget)
        return layouts

    def describe(self, loaded: LoadedModel, device: torch.device, wall: float) -> dict:
        ckpt = loaded.checkpoint
        return {
            "elfctl_version": __version__,
            "checkpoint": {
                "path": ckpt.path,
                "format": ckpt.format,
                "step": ckpt.step,
                "sha256": ckpt.sha256(),
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
            "num_samples": self.num_samples,
            "length": self.length,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": str(device),
            "device_name": _device_name(device),
            "dtype": _dtype_name(device, self.precision),
            "compile": self.compile,
            "wall_seconds": round(wall, 3),
            "samples_per_s": round(self.num_samples / max(wall, 1e-9), 4),
            "meta": self.meta,
            "setting_full": asdict(self.setting),
            **self._prompting_info(),
        }

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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _dtype_name(device: torch.device, precision: str) -> str:
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16-autocast" if bf16 else "fp32"
    return "bf16-autocast" if precision == "bf16" else "fp32"


def batch_seeds(seed: int, n: int) -> list[int]:
    """Seeds for n batches of one conditional run: a pure function of (seed, n).

    Each batch has its own noise; reusing `seed` for every batch would give every
    batch the same noise.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()
