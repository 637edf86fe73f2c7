"""Gen PPL scoring throughput (samples/s) at 1024 tokens per sample.

Times `elfctl.scoring.sample_nll` (the forward pass + per-sample NLL that `score_ppl`
runs for each batch) on random token ids, for a tiny GPT-2 and for the GPT-2 Large
architecture with random weights (the real weights need the hub; speed does not
depend on the weight values). Tokenization is left out: it is a small fraction here.

    .venv/bin/python bench/score_speed.py                       # CPU, defaults
    .venv/bin/python bench/score_speed.py --large-samples 4 --batch-size 2
    .venv/bin/python bench/score_speed.py --device cuda --large-samples 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from elfctl.scoring import sample_nll

GPT2_VOCAB = 50257


def architectures() -> dict[str, GPT2Config]:
    return {
        "tiny GPT-2 (2 layers, 32 wide)": GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=1024, vocab_size=GPT2_VOCAB
        ),
        "GPT-2 Large arch (36 layers, 1280 wide)": GPT2Config(
            n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=GPT2_VOCAB
        ),
    }


def time_scoring(
    config: GPT2Config, n_samples: int, batch_size: int, length: int, device: str
) -> tuple[float, float, int]:
    """(seconds, samples/s, parameters) for scoring n_samples after one warm-up batch."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (n_samples, length), generator=generator).tolist()
    pad_id = config.eos_token_id

    sample_nll(ids[:1], model, pad_id)  # warm-up: allocator, kernels
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, n_samples, batch_size):
        sample_nll(ids[first : first + batch_size], model, pad_id)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    return seconds, n_samples / seconds, n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tiny-samples", type=int, default=64)
    parser.add_argument("--large-samples", type=int, default=2)
    args = parser.parse_args()

    counts = [args.tiny_samples, args.large_samples]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"| scorer | parameters | samples x {args.length} tokens | batch | seconds | samples/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, config), n_samples in zip(architectures().items(), counts, strict=True):
        batch = min(args.batch_size, n_samples)
        seconds, rate, n_params = time_scoring(config, n_samples, batch, args.length, args.device)
        print(
            f"| {name} | {n_params / 1e6:.1f} M | {n_samples} | {batch} "
            f"| {seconds:.1f} | {rate:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
