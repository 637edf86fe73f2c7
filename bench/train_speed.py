"""Training throughput: one full ELF training step (encoder, the two no-grad
self-conditioning forwards, the grad forward, backward, optimiser, EMA), timed.

    python bench/train_speed.py                       # tiny net and ELF-B, AdamW and Muon
    python bench/train_speed.py --sizes tiny --steps 20

The encoder is a randomly initialised T5 of the right width (T5-small's architecture for
ELF-B), built locally: weights do not change the cost. The official PyTorch port,
measured side by side with this script on this 2-core CPU (docs/benchmarks.md, quiet machine,
default threads): tiny net, batch 16, length 64, AdamW: 8.3 steps/s; ELF-B, batch 4,
length 128, AdamW: 0.270 steps/s. The "vs recorded" column is our steps/s over those, and
the two steps do NOT do the same work: ours includes a real T5 encoder forward (the
T5-small architecture for ELF-B), while the port's timing used a cheap stand-in encoder
(an embedding lookup). A ratio below 1 therefore overstates how much slower we are.
"""

from __future__ import annotations

import argparse
import time

import torch

from elfctl.config import ModelConfig, ObjectiveConfig, OptimConfig
from elfctl.model import ELF
from elfctl.training import EMA, build_optimizer, draw, elf_loss

SIZES = {
    # name: (model, batch, length, T5 (d_model, layers, heads, d_ff))
    "tiny": (
        ModelConfig(
            hidden_size=128, depth=4, num_heads=4, bottleneck=64, latent_dim=64, vocab_size=512
        ),
        16,
        64,
        (64, 2, 4, 256),
    ),
    "elf-b": (ModelConfig(), 4, 128, (512, 6, 8, 2048)),
}
# The official port's steps/s with AdamW on the 2-core CPU, side by side with ours
# (docs/benchmarks.md, 2026-12-02), timed with a stand-in encoder (an embedding lookup).
OFFICIAL = {"tiny": 8.3, "elf-b": 0.270}


def build_encoder(vocab: int, d_model: int, layers: int, heads: int, d_ff: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_model // heads,
        num_heads=heads,
        d_ff=d_ff,
        num_layers=layers,
    )
    return T5EncoderModel(cfg).eval().requires_grad_(False)


def time_steps(size: str, optimizer_name: str, steps: int, device) -> tuple[float, float]:
    model_cfg, batch, length, t5 = SIZES[size]
    torch.manual_seed(0)
    model = ELF(model_cfg).to(device)
    encoder = build_encoder(model_cfg.vocab_size, *t5).to(device)
    optimizer = build_optimizer(model, OptimConfig(name=optimizer_name), lr=1e-4)
    ema = EMA(model, 0.9999)
    objective = ObjectiveConfig()
    ids = torch.randint(3, model_cfg.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    cond = torch.zeros_like(mask)

    def step() -> None:
        with torch.no_grad():
            h = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        x = h / 0.2
        d = draw(batch, length, model_cfg.latent_dim, objective, device)
        parts = elf_loss(model, x, ids, cond, mask, d, objective, model_cfg.t_eps)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - start)
    return rate, rate * batch * length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "elf-b"], choices=sorted(SIZES))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"{'size':<7}{'batch x len':>12}{'optimiser':>11}{'steps/s':>10}{'tokens/s':>11}"
        f"{'vs recorded':>13}"
    )
    print(
        "(vs recorded: our step, with a real T5 encoder, over the official port's steps/s with a "
        "stand-in encoder RECORDED on a quiet 2-core CPU, not measured in this run: on another "
        "machine this ratio means little)"
    )
    for size in args.sizes:
        _, batch, length, _ = SIZES[size]
        for name in args.optimizers:
            steps = args.steps if size == "tiny" else max(2, args.steps // 5)
            rate, tokens = time_steps(size, name, steps, device)
            ratio = ""
            if name == "adamw" and device.type == "cpu":
                ratio = f"{rate / OFFICIAL[size]:.2f}x"
            print(
                f"{size:<7}{f'{batch} x {length}':>12}{name:>11}{rate:>10.3f}{tokens:>11.0f}"
                f"{ratio:>13}"
            )


if __name__ == "__main__":
    main()
