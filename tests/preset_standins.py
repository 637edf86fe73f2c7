"""Local stand-ins for the official presets' hub assets, and one real-size step of a preset.

The official presets name hub assets (t5-small, embedded-language-flows/* datasets). To
run them at their real sizes offline we build assets of the same shapes and formats:

* a 32100-entry tokenizer (built with `tokenizers`, saved in Hugging Face format), with
  T5's special ids: <pad> 0, </s> 1, <unk> 2;
* a randomly initialised T5 encoder of T5-small's exact shape (transformers' T5Config of
  t5-small: d_model 512, 6 layers, 8 heads, d_ff 2048, vocabulary 32128), save_pretrained;
* `save_to_disk` datasets in the official row format: `input_ids` rows of 1024 tokens for
  OpenWebText; `condition_input_ids` + `input_ids` (and the `input` / `target` texts the
  evaluation reads) for WMT14 de-en and XSum.

`python -m tests.preset_standins ASSETS PRESET RUN_DIR [LENGTH]` builds one preset's
trainer on them, runs one training step at batch 1 (and, without LENGTH, one sampling
step at the preset's length and, for conditional presets, `elfctl eval`), and prints what
it measured as one JSON line: times, resident memory, parameter counts.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from pathlib import Path

VOCAB = 32100  # the official presets' model.vocab_size: len(t5-small's tokenizer)
T5_SMALL = dict(
    vocab_size=32128,
    d_model=512,
    d_kv=64,
    d_ff=2048,
    num_layers=6,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="relu",
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
ROW_TOKENS = 1024  # the official OpenWebText rows
ROWS = 2
# (condition tokens, target tokens) of the conditional stand-ins, as long as each preset
# keeps: de-en-b cuts sources at 64 of 128, xsum-b at 1024 of 1088.
CONDITIONAL = {"wmt": (64, 64), "xsum": (1024, 64)}


def word(i: int) -> str:
    return f"w{i}"


def build_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({word(i): i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return folder


def build_encoder(folder: Path) -> Path:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    T5EncoderModel(T5Config(**T5_SMALL)).save_pretrained(str(folder))
    return folder


def _ids(generator, n: int) -> list[int]:
    return [int(t) for t in generator.integers(3, VOCAB, size=n)]


def build_datasets(root: Path) -> dict[str, Path]:
    import numpy as np
    from datasets import Dataset

    generator = np.random.default_rng(0)
    out = {"owt": root / "openwebtext-t5"}
    Dataset.from_dict(
        {"input_ids": [_ids(generator, ROW_TOKENS) for _ in range(ROWS)]}
    ).save_to_disk(str(out["owt"]))
    for name, (n_condition, n_target) in CONDITIONAL.items():
        conditions = [_ids(generator, n_condition) for _ in range(ROWS)]
        targets = [_ids(generator, n_target) for _ in range(ROWS)]
        out[name] = root / f"{name}-t5"
        Dataset.from_dict(
            {
                "condition_input_ids": conditions,
                "input_ids": targets,
                "input": [" ".join(map(word, ids)) for ids in conditions],
                "target": [" ".join(map(word, ids)) for ids in targets],
            }
        ).save_to_disk(str(out[name]))
    return out


def build_assets(root: Path) -> Path:
    """Everything the official presets need, in `root` (about 160 MB, mostly the encoder)."""
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer(root / "tokenizer")
    build_encoder(root / "encoder")
    build_datasets(root)
    return root


def preset_sets(preset: str, assets: Path, length: int | None = None) -> list[str]:
    """`--set` overrides pointing a preset at the stand-ins, at batch 1."""
    data = {"de-en-b": "wmt-t5", "xsum-b": "xsum-t5"}.get(preset, "openwebtext-t5")
    sets = [
        f"encoder.tokenizer={assets / 'tokenizer'}",
        f"encoder.encoder={assets / 'encoder'}",
        f"data.train={assets / data}",
        "train.global_batch=1",
        "train.max_steps=1",
        "train.sample_count=1",
    ]
    if preset in ("de-en-b", "xsum-b"):
        sets.append(f"data.validation={assets / data}")
    if length is not None:
        sets.append(f"data.max_length={length}")
    return sets


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def hwm_bytes() -> int:
    """The peak resident memory since the last `reset_hwm` (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident memory starts again from now


def activation_bytes(trainer) -> int:
    """What one forward and backward at batch 1 holds at its peak, beyond the run's state
    and the gradients: the activations (the first step's peak is the optimizer's own)."""
    import gc

    batches = trainer._micro_batches()
    gc.collect()
    reset_hwm()
    start = rss_bytes()
    parts = trainer.micro_loss(batches[0], trainer.loss_denominator(batches))
    parts.loss.backward()
    peak = hwm_bytes()
    trainer.optimizer.zero_grad(set_to_none=True)
    gradients = 4 * sum(p.numel() for p in trainer.raw_model.parameters())
    return max(peak - start - gradients, 0)


def cpu_seconds() -> float:
    """CPU time of this process (user + system): what a step costs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def measure(assets: Path, preset: str, run_dir: Path, length: int | None = None) -> dict:
    import torch

    from elfctl.config import resolve
    from elfctl.training import Trainer, make_accelerator

    torch.manual_seed(0)
    cfg = resolve(preset, sets=preset_sets(preset, assets, length))
    for setting in cfg.sampling:
        setting.steps, setting.num_samples = 1, 1  # one sampling step at the preset's length
    start = time.perf_counter()
    if cfg.distill.teacher:  # owt-b-pd: round 1 of the curriculum, from a random teacher
        from elfctl.training import DistillTrainer, round_config

        cfg.distill.teacher = str(random_teacher(cfg, run_dir / "teacher"))
        cfg = round_config(cfg, 1)
        cfg.train.max_steps = 1
        trainer = DistillTrainer(cfg, run_dir / "round_1", make_accelerator(cpu=True), "never")
    else:
        trainer = Trainer(cfg, run_dir, make_accelerator(cpu=True), resume="never")
    result = {
        "preset": preset,
        "length": cfg.data.max_length,
        "optimizer": cfg.optim.name,
        "parameters": sum(p.numel() for p in trainer.raw_model.parameters()),
        "encoder_parameters": sum(p.numel() for p in trainer.encoder.parameters()),
        "setup_s": time.perf_counter() - start,
        "setup_rss": rss_bytes(),
    }
    start, cpu = time.perf_counter(), cpu_seconds()
    out = trainer.train_step()
    result["train_step_s"] = time.perf_counter() - start
    result["train_step_cpu_s"] = cpu_seconds() - cpu
    result["train_peak_rss"] = peak_rss_bytes()
    result["after_step_rss"] = rss_bytes()
    ce, l2, ce_tokens, l2_tokens = out["sums"].tolist()
    result["loss_finite"] = math.isfinite(ce) and math.isfinite(l2) and l2_tokens > 0
    result["muon_state"] = sum(
        1 for state in trainer.optimizer.state_dict()["state"].values() if state
    )
    result["activation_bytes"] = activation_bytes(trainer)
    if length is None:
        start, cpu = time.perf_counter(), cpu_seconds()
        texts = trainer.sample_now()
        result["sample_step_s"] = time.perf_counter() - start
        result["sample_step_cpu_s"] = cpu_seconds() - cpu
        result["sample_peak_rss"] = peak_rss_bytes()
        result["sample_tokens"] = len(texts[0].split()) if texts else 0
        if cfg.data.conditional:
            result["eval"] = evaluate(trainer, run_dir)
    return result


def random_teacher(cfg, folder: Path) -> Path:
    """A randomly initialised network of the preset's shape, in the official format."""
    import torch

    from elfctl.model import ELF, save_official_checkpoint

    torch.manual_seed(1)
    state = ELF(cfg.model).state_dict()
    return save_official_checkpoint(folder / "checkpoint_0", state, state, step=0)


GPU_BYTES = 80e9  # an 80 GB GPU
GPU_OVERHEAD = 2 * 1024**3  # CUDA context and allocator slack, on paper


MIN_MEASURABLE = 64 * 2**20  # activations below this do not show in the peak RSS


def estimate_batch_80gb(result: dict, full_length: int) -> dict:
    """The micro-batch that fits an 80 GB GPU, estimated on paper from one CPU step.

    Held for the whole run, in fp32 as the trainer keeps them: weights, EMA and gradients
    (4 bytes each per parameter), Muon's momentum (4) or Adam's two moments (8; taken
    for every parameter, an upper bound), and the frozen encoder (4 per parameter).
    Per sample: the activations of one forward and backward at batch 1 in fp32
    (`activation_bytes`), scaled linearly to `full_length` (memory-efficient attention
    keeps activations linear in length). bf16 autocast would store most activations in
    half the bytes, so the estimate errs on the small side.
    """
    params, encoder = result["parameters"], result["encoder_parameters"]
    held = (4 + 4 + 4 + 8) * params + 4 * encoder + GPU_OVERHEAD
    if result["activation_bytes"] < MIN_MEASURABLE:
        # Short rows fit in memory the allocator already holds, so the peak does not move:
        # no per-sample figure, rather than a batch of billions (docs/presets.md scales
        # owt-b's measured activations instead).
        return {"held_gb": held / 1e9, "per_sample_gb": None, "batch_80gb": None}
    per_sample = result["activation_bytes"] * full_length / result["length"]
    return {
        "held_gb": held / 1e9,
        "per_sample_gb": per_sample / 1e9,
        "batch_80gb": max(int((GPU_BYTES - held) // per_sample), 0),
    }


def evaluate(trainer, run_dir: Path) -> dict:
    """`elfctl eval` on the step's checkpoint: one sample of the preset's setting, scored."""
    from typer.testing import CliRunner

    from elfctl.cli import app
    from elfctl.config import dump_yaml

    trainer.save()
    config = run_dir / "eval-config.yaml"
    config.write_text(dump_yaml(trainer.cfg))
    args = ["eval", "--repo", str(run_dir), "--config", str(config), "--num-samples", "1"]
    args += ["--cpu", "--out", str(run_dir / "eval"), "--json"]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        return {"exit_code": result.exit_code, "output": result.output[-2000:]}
    summary = json.loads(result.stdout)
    return {
        "exit_code": 0,
        "seconds": time.perf_counter() - start,
        "rows": [
            {"setting": row["setting"], **{k: m["value"] for k, m in row["metrics"].items()}}
            for row in summary["rows"]
        ],
    }


if __name__ == "__main__":
    assets_dir, preset_name, run = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    short = int(sys.argv[4]) if len(sys.argv) > 4 else None
    measured = measure(assets_dir, preset_name, run, short)
    from elfctl.config import resolve as resolve_preset

    full = resolve_preset(preset_name).data.max_length
    print(json.dumps({**measured, **estimate_batch_80gb(measured, full)}))
