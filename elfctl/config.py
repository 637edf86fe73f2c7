"""Typed configuration: dataclasses, presets, overrides and validation.

A config is plain data. It is built from layers, later layers winning:
built-in defaults < preset < config file < explicit flags < `--set key=value`.
Every key is checked against the dataclass fields, so a typo is an error that
names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from elfctl.errors import UserError


@dataclass
class ModelConfig:
    """The ELF network (docs/method.md section 3). Defaults are ELF-B on T5-small."""

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    bottleneck: int = 128
    latent_dim: int = 512  # C, the encoder width
    # V, the tokenizer's length (not the padded T5 table); "auto" reads it from the tokenizer.
    vocab_size: int | Literal["auto"] = 32100
    num_time_tokens: int = 4
    num_sc_tokens: int = 4  # SC-CFG tokens; 0 disables SC-CFG conditioning
    num_mode_tokens: int = 4
    self_cond: bool = True
    t_eps: float = 0.05


@dataclass
class EncoderConfig:
    """Tokenizer and frozen T5 encoder that define the latent space (section 1)."""

    tokenizer: str = "t5-small"
    encoder: str = "t5-small"
    # "auto": measured by `elfctl train` with the frozen encoder on `latent_stats_rows`
    # training rows drawn with train.seed (elfctl/autoconfig.py); the run's config.yaml
    # then holds the numbers.
    latent_mean: float | Literal["auto"] = 0.0
    latent_std: float | Literal["auto"] = 0.2
    latent_stats_rows: int = 1024


@dataclass
class DataConfig:
    """Where training rows come from and how they are collated (section 2)."""

    train: str = "embedded-language-flows/openwebtext-t5"
    validation: str | None = None
    split: str = "train"
    validation_split: str = "validation"
    text_field: str = "text"  # raw-text sources (.jsonl / .txt)
    text_mode: Literal["line", "file"] = "line"  # .txt: one example per line, or per file
    source_field: str = "input"  # raw conditional sources
    target_field: str = "target"
    conditional: bool = False
    max_length: int = 1024
    max_input_length: int = 0  # condition budget; 0 for unconditional data
    pad_token: Literal["pad", "eos"] = "pad"
    num_workers: int = 0
    # Raw text and packing (elfctl/pipeline.py): tokenizer processes, packed rows, cache.
    num_proc: int = 1
    packing: bool = False  # unconditional only: eos-joined documents cut into max_length rows
    streaming: bool = False  # hub datasets read as a stream (elfctl/streaming.py)
    cache_dir: str | None = None  # default $ELFCTL_CACHE/data (~/.cache/elfctl/data)


@dataclass
class ObjectiveConfig:
    """The training objective (section 4)."""

    time_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    p_mean: float = -1.5
    p_std: float = 0.8
    noise_scale: float = 2.0  # s, the denoiser noise scale
    decoder_prob: float = 0.2
    decoder_noise_scale: float = 5.0
    decoder_lam_mean: float = 0.8
    decoder_lam_std: float = 0.8
    self_cond_prob: float = 0.5
    sc_cfg_min: float = 0.5  # log-uniform in shifted space: a = 1 + min, b = 1 + max
    sc_cfg_max: float = 5.0
    label_drop_prob: float = 0.0


@dataclass
class OptimConfig:
    """Optimiser, schedule, clipping and EMA (section 4)."""

    name: Literal["muon", "adamw"] = "muon"
    blr: float = 1e-3  # lr = blr * global_batch / 256
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + n) / (10 + n)) when true


@dataclass
class TrainConfig:
    """The training loop."""

    global_batch: int = 512
    micro_batch: int | None = None  # per device and step; None = no accumulation
    epochs: float = 5.0
    max_steps: int | None = None
    max_minutes: float | None = None  # wall-clock budget, checked every step
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0 disables periodic samples
    sample_count: int = 16
    compile: bool = False
    # Precision on a CUDA GPU when neither a flag nor Accelerate chooses one (elfctl/precision.py);
    # bf16 autocast is the official recipe. The CPU always runs fp32 by default.
    gpu_precision: Literal["bf16", "fp32"] = "bf16"
    # Fine-tuning (elfctl/finetune.py): start from these weights (anything `elfctl sample
    # --repo` accepts) with a fresh optimiser, step count and EMA.
    init: str | None = None
    init_weights: Literal["ema", "raw"] = "ema"
    init_from: dict[str, Any] = field(default_factory=dict)  # provenance, filled by training


@dataclass
class SamplingSetting:
    """One official sampling setting (section 5) and the paper's numbers for it."""

    name: str = "default"
    # A sampler of elfctl.sampling.SOLVERS ("ode" and "sde" are the official ones) and a
    # time schedule of elfctl.model.flow ("logit_normal" and "uniform" are the official
    # ones); checked by the sampler, which this module may not import (docs/solvers.md).
    method: str = "sde"
    steps: int = 32
    gamma: float = 1.5
    sc_cfg: float = 3.0
    cfg: float = 1.0
    time_schedule: str = "logit_normal"
    noise_scale: float = 2.0
    num_samples: int = 1000
    batch_size: int = 32
    length: int | None = None  # None = data.max_length
    paper: dict[str, float] = field(default_factory=dict)


# The test bed's own Gen PPL scorer (a small GPT-2 that knows its language, built offline).
TESTBED_SCORER = "testbed:grammar/scorer"
DEFAULT_SCORER = "gpt2-large"


@dataclass
class EvalConfig:
    """How samples of this model are scored (`eval`, `sweep`, `score-ppl`)."""

    # Gen PPL model, also the tokens of the diversity metrics: a causal LM hub id, a local
    # folder, or testbed:grammar/scorer. None: the test bed's scorer for a model in the
    # test bed's language, else gpt2-large (the paper's).
    scorer: str | None = None


@dataclass
class DistillConfig:
    """Progressive distillation (section 8)."""

    teacher: str | None = None
    spans: list[float] = field(default_factory=lambda: [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0])
    teacher_resolution: int = 64  # teacher sub-steps per unit time
    epochs_per_round: float = 1.0
    steps_per_round: int | None = None  # overrides epochs_per_round when set
    round: int | None = None  # the round a run dir trains (1-based); set per round by distill
    # What the student regresses onto (docs/distillation.md): "progressive" (official) lands
    # one student step on the teacher's end point; "consistency" is the student's own
    # x-prediction (no gradient) at that end point.
    target: str = "progressive"
    # The network that gives the consistency target: "ema" (the student's EMA weights, as
    # consistency distillation's target network) or "student" (the student, no gradient).
    target_network: str = "ema"
    # How the teacher crosses the span: "ode" (official: Euler sub-steps) or "sde" (each
    # sub-step after a churn of teacher_gamma, as the SDE sampler).
    teacher_sampler: str = "ode"
    teacher_gamma: float = 1.5


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: list[SamplingSetting] = field(
        default_factory=lambda: [SamplingSetting(name="sde-32")]
    )
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def default_scorer(cfg: Config) -> str:
    """The Gen PPL scorer of a config: `eval.scorer`, else the test bed's for a model in the
    test bed's language, else gpt2-large."""
    if cfg.eval.scorer is not None:
        return cfg.eval.scorer
    in_testbed = cfg.encoder.tokenizer.startswith("testbed:grammar/")
    return TESTBED_SCORER if in_testbed else DEFAULT_SCORER


# ---------------------------------------------------------------------------
# Presets


def preset_dir() -> Path:
    """The folder of preset YAML files, in a source checkout or an installed package."""
    return Path(str(resources.files("elfctl.presets")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"Unknown preset '{name}'; available presets: {', '.join(preset_names())}.")
    return _read_yaml(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"Config file not found: {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(yaml_error_sentence(path, e)) from None
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping at the top level.")
    return data


def yaml_error_sentence(path: Path, error: yaml.YAMLError) -> str:
    """'FILE, line L, column C: what is wrong.' for a parser error (1-based, as editors count);
    PyYAML's own message is a multi-line dump with the offending lines quoted."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    what = (problem or "not valid YAML").strip()
    if mark is None:
        return f"{path}: {what}."
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: {what}."


# ---------------------------------------------------------------------------
# Building and validating


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Merge the configuration layers and validate the result."""
    merged: dict[str, Any] = {}
    if preset:
        merged = deep_merge(merged, load_preset(preset))
    if config_file:
        merged = deep_merge(merged, _read_yaml(Path(config_file)))
    for key, value in (overrides or {}).items():
        if value is not None:
            merged = deep_merge(merged, _dotted(key, value))
    for item in sets or []:
        key, value = parse_set(item)
        merged = deep_merge(merged, _dotted(key, value))
    return from_dict(merged)


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise UserError(f"--set expects dotted.key=value, got '{item}'.")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _dotted(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base`; `{"0": {...}}` merges into element 0 of a list."""
    out = dict(base)
    for key, value in update.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and key != "paper":
            out[key] = deep_merge(current, value)
        elif isinstance(value, dict) and isinstance(current, list) and _indices(value, current):
            items = list(current)
            for index, item in value.items():
                i = int(index)
                items[i] = deep_merge(items[i], item) if isinstance(item, dict) else item
            out[key] = items
        else:
            out[key] = value
    return out


def _indices(update: dict[str, Any], items: list) -> bool:
    return all(str(k).isdigit() and int(k) < len(items) for k in update)


def from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# (section, key, least value): sizes, lengths, counts and batches that must be positive.
_AT_LEAST = [
    ("model", "hidden_size", 1),
    ("model", "depth", 1),
    ("model", "num_heads", 1),
    ("model", "bottleneck", 1),
    ("model", "latent_dim", 1),
    ("model", "num_time_tokens", 0),
    ("model", "num_sc_tokens", 0),
    ("model", "num_mode_tokens", 0),
    ("encoder", "latent_stats_rows", 1),
    ("data", "max_length", 2),
    ("data", "max_input_length", 0),
    ("data", "num_workers", 0),
    ("data", "num_proc", 1),
    ("train", "global_batch", 1),
    ("train", "micro_batch", 1),
    ("train", "max_steps", 1),
    ("train", "log_every", 1),
    ("train", "checkpoint_every", 1),
    ("train", "keep_checkpoints", 1),
    ("train", "sample_every", 0),
    ("train", "sample_count", 1),
]
_SAMPLING_AT_LEAST = [("steps", 1), ("num_samples", 1), ("batch_size", 1), ("length", 1)]


def validate(cfg: Config) -> None:
    """Refuse values no run can use, naming the key, before anything is built or written."""
    for section, key, least in _AT_LEAST:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, (int, float)) and value < least:
            raise UserError(f"Config key '{section}.{key}' must be at least {least}, got {value}.")
    if isinstance(cfg.model.vocab_size, int) and cfg.model.vocab_size < 2:
        raise UserError(
            f"Config key 'model.vocab_size' must be at least 2, got {cfg.model.vocab_size}."
        )
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise UserError(
            f"Config key 'model.hidden_size' ({cfg.model.hidden_size}) must be a multiple of "
            f"model.num_heads ({cfg.model.num_heads})."
        )
    if cfg.data.max_input_length >= cfg.data.max_length:
        raise UserError(
            f"Config key 'data.max_input_length' ({cfg.data.max_input_length}) must be less than "
            f"data.max_length ({cfg.data.max_length}): the output needs tokens too."
        )
    for i, setting in enumerate(cfg.sampling):
        for key, least in _SAMPLING_AT_LEAST:
            value = getattr(setting, key)
            if value is not None and value < least:
                raise UserError(
                    f"Config key 'sampling[{i}].{key}' must be at least {least}, got {value}."
                )
    _validate_scorer(cfg.eval.scorer)


def _validate_scorer(scorer: str | None) -> None:
    if scorer is None:
        return
    if not scorer.strip():
        raise UserError("Config key 'eval.scorer' must name a scorer, got an empty string.")
    if scorer.startswith("testbed:") and scorer != TESTBED_SCORER:
        raise UserError(
            f"Config key 'eval.scorer' names an unknown test-bed scorer {scorer!r}; the test bed "
            f"has {TESTBED_SCORER}."
        )


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) suitable for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise UserError(f"Config key '{where}' must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(
                f"Unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(names))}."
            )
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"Config key '{key}' has the wrong type.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UserError(f"Config key '{key}' must be one of {choices}, got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"Config key '{key}' must be a list, got {value!r}.")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"Config key '{key}' must be a list of {len(args)} values.")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"Config key '{key}' must be a mapping, got {value!r}.")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"Config key '{key}' must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"Config key '{key}' must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"Config key '{key}' must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"Config key '{key}' must be a string, got {value!r}.")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def sampling_setting(cfg: Config, name: str | None = None) -> SamplingSetting:
    """The named official sampling setting, or the preset's first one."""
    if not cfg.sampling:
        return SamplingSetting()
    if name is None:
        return cfg.sampling[0]
    for setting in cfg.sampling:
        if setting.name == name:
            return setting
    names = ", ".join(s.name for s in cfg.sampling)
    raise UserError(f"Preset '{cfg.name}' has no sampling setting '{name}'; it has: {names}.")


def describe_sampler(setting: SamplingSetting) -> str:
    """'SDE 32 steps, gamma 1.5, SC-CFG 3, CFG 1' (gamma only for the churned samplers);
    a grid other than the official logit-normal one is named at the end."""
    parts = [f"{setting.method.upper()} {setting.steps} steps"]
    if setting.method.endswith("sde"):  # the churned samplers: sde, heun-sde, dpm2m-sde
        parts.append(f"gamma {setting.gamma:g}")
    parts += [f"SC-CFG {setting.sc_cfg:g}", f"CFG {setting.cfg:g}"]
    if setting.time_schedule != "logit_normal":
        parts.append(f"{setting.time_schedule} grid")
    return ", ".join(parts)
