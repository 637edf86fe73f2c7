"""Export a run or checkpoint as a shareable folder, optionally pushed to the hub.

Two layouts, both with the resolved config (`config.yaml`) and a model card (`README.md`:
architecture, data, steps, tokenizer/encoder, latent statistics, sampling settings,
fine-tuning provenance, and the figures of any `eval.json` given or found in the run dir):

* `official` (default): the official PyTorch port's layout, docs/method.md section 7: one
  file `checkpoint_<step>`, a `torch.save` dict whose `params` (raw weights) and
  `ema_params1` (EMA weights) use the official key names, so the official code loads them
  with `load_state_dict(strict=True)`. Where the source holds no raw weights (our
  `model.safetensors` alone, or a folder exported before), `params` repeats the EMA weights
  and the card says so.
* `elfctl`: our checkpoint layout (`model.safetensors` with the EMA weights, `config.yaml`,
  `meta.json`).

`elfctl sample --repo OUT` reads either and samples exactly as from the source: the config
beside the checkpoint brings the tokenizer, encoder, latent statistics and sampling
settings. The folder is built under a temporary name and renamed into place; an existing
OUT is replaced only with `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from elfctl import hub, records
from elfctl.config import Config, describe_sampler, dump_yaml
from elfctl.errors import UserError
from elfctl.model.checkpoints import (
    checkpoint_config,
    load_checkpoint,
    save_model_checkpoint,
    save_official_checkpoint,
)
from elfctl.model.network import size_name
from elfctl.version import __version__

FORMATS = ("official", "elfctl")
CARD_FILE = "README.md"


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    step: int
    files: list[str]
    raw_weights: bool  # the official `params` hold real raw weights (not a copy of the EMA)


def export(
    source: str,
    out_dir: str | Path,
    fmt: str = "official",
    *,
    eval_files: list[str | Path] | None = None,
    force: bool = False,
) -> ExportResult:

    if fmt not in FORMATS:
        raise UserError(f"--format must be official or elfctl, got '{fmt}'.")
    out_dir = Path(out_dir)
    check_export_dir(out_dir, force)
    ema = load_checkpoint(source)
    config = checkpoint_config(ema, None)
    raw = _raw_weights(source)
    step = int(ema.step or 0)
    evals = [_read_eval(Path(p)) for p in (eval_files or _found_evals(source))]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        if fmt == "official":
            epoch = int(round(json.loads(_meta(ema.path)).get("epoch", 0) or 0))
            params = raw if raw is not None else ema.state_dict
            save_official_checkpoint(
                stage / f"checkpoint_{step}", params, ema.state_dict, step, epoch
            )
            (stage / "config.yaml").write_text(dump_yaml(config))
        else:
            save_model_checkpoint(
                stage / "model", ema.state_dict, config, step, {"exported_from": ema.path}
            )
            for item in (stage / "model").iterdir():
                os.replace(item, stage / item.name)
            (stage / "model").rmdir()
        card = model_card(config, step, fmt, ema, raw is not None, evals)
        (stage / CARD_FILE).write_text(card)
        # mkdtemp (and safetensors) make things private; an export is meant to be shared.
        os.chmod(stage, 0o755)
        for item in stage.iterdir():
            os.chmod(item, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    files = sorted(p.name for p in out_dir.iterdir())
    return ExportResult(out_dir, fmt, step, files, raw is not None)


def check_export_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a folder to export into.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists and is not empty; pass --force to replace it.")


def _raw_weights(source: str):
    """The source's raw training weights, or None where it holds only EMA weights."""

    try:
        return load_checkpoint(source, weights="params").state_dict
    except UserError:
        return None


def _meta(path: str) -> str:
    meta = Path(path) / "meta.json"
    return meta.read_text() if meta.is_file() else "{}"


def _found_evals(source: str) -> list[Path]:
    """An eval.json kept in the run directory (`RUN/eval.json` or `RUN/eval/eval.json`)."""
    root = Path(source).expanduser()
    candidates = [root / "eval.json", root / "eval" / "eval.json"]
    return [p for p in candidates if p.is_file()]


def _read_eval(path: Path) -> dict:
    fix = f"run `elfctl eval` again to rewrite it, or leave {path.name} out of the card."
    data = records.read_json_state(path, fix)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise UserError(f"{path} is not an eval.json written by `elfctl eval` (no rows).")
    return data


# ---------------------------------------------------------------------------
# The model card


def model_card(config: Config, step: int, fmt: str, ckpt, has_raw: bool, evals: list) -> str:

    m, e, d = config.model, config.encoder, config.data
    lines = [
        "---",
        "library_name: elfctl",
        "tags: [elf, embedded-language-flows, flow-matching, diffusion-language-model]",
        "---",
        "",
        f"# {config.name} ({size_name(m)}, step {step})",
        "",
        "An ELF (Embedded Language Flows) model: a continuous flow-matching diffusion language "
        "model that denoises in a frozen T5 embedding space and decodes to tokens at the last "
        f"step. Exported by elfctl {__version__} in the `{fmt}` layout.",
        "",
        "## Use",
        "",
        "```bash",
        "elfctl sample --repo THIS_FOLDER_OR_REPO --num-samples 16",
        "```",
        "",
    ]
    if fmt == "official":
        weights = "raw training weights" if has_raw else "the EMA weights again (no raw kept)"
        lines += [
            f"`checkpoint_{step}` is a `torch.save` dict: `ema_params1` holds the EMA weights "
            f"(use these to sample), `params` {weights}; both load into the official PyTorch "
            "model with `load_state_dict(strict=True)`.",
            "",
        ]
    lines += [
        "## Architecture",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(
            f"| {k} | {v} |"
            for k, v in [
                ("hidden size H", m.hidden_size),
                ("depth", m.depth),
                ("heads", m.num_heads),
                ("MLP ratio", m.mlp_ratio),
                ("bottleneck", m.bottleneck),
                ("latent width C", m.latent_dim),
                ("vocabulary V", m.vocab_size),
                (
                    "time / SC-CFG / mode tokens",
                    f"{m.num_time_tokens} / {m.num_sc_tokens} / {m.num_mode_tokens}",
                ),
                ("self-conditioning", m.self_cond),
                ("parameters", f"{sum(v.numel() for v in ckpt.state_dict.values()):,}"),
            ]
        ),
        "",
        "## Latent space",
        "",
        f"* tokenizer: `{e.tokenizer}`",
        f"* frozen encoder: `{e.encoder}`",
        f"* latent statistics: mean {e.latent_mean:g}, std {e.latent_std:g} (x = (h - mean) / std)",
        "",
        "## Training",
        "",
        f"* data: `{d.train}` (split `{d.split}`), rows of {d.max_length} tokens, "
        + (
            f"conditional (condition budget {d.max_input_length} tokens)"
            if d.conditional
            else "unconditional"
        )
        + f", `{d.pad_token}` padding",
        f"* steps: {step} at a global batch of {config.train.global_batch}; optimiser "
        f"{config.optim.name}, blr {config.optim.blr:g}, EMA {config.optim.ema_decay:g}",
    ]
    init = config.train.init_from
    if init:
        lines.append(
            f"* fine-tuned from `{init.get('source')}` ({init.get('weights')} weights of step "
            f"{init.get('step')}, sha256 `{init.get('sha256')}`)"
        )
    lines += ["", "## Sampling settings", ""]
    lines += [
        f"* `{s.name}`: {describe_sampler(s)}, {s.time_schedule} grid" for s in config.sampling
    ]
    for ev in evals:
        lines += ["", f"## Evaluation ({ev.get('preset', '')}, seed {ev.get('seed')})", ""]
        lines += ["| setting | n | metric | value | paper |", "| --- | --- | --- | --- | --- |"]
        for row in ev["rows"]:
            for name, metric in (row.get("metrics") or {}).items():
                lines.append(
                    f"| {row.get('setting')} | {row.get('n')} | {name} | "
                    f"{_number(metric.get('value'))} | {_number(metric.get('paper'))} |"
                )
    lines += [
        "",
        "Method: Hu et al., *ELF: Embedded Language Flows*, arXiv 2605.10938.",
        "",
    ]
    return "\n".join(lines)


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------
# The hub


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload the exported folder to a hub model repo (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    with hub.access(repo_id, f"the exported folder {folder}", upload=True):
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"elfctl export ({folder.name})",
        )
    return str(url)
