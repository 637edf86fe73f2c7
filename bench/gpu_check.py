"""A GPU check in one call: ELF-B sampling and training speed with random weights.

Needs nothing but the checkout and a CUDA machine (no hub, no data). Prints, for ELF-B at
1024 tokens:

* sampling (32-step SDE + the decode) samples/s and achieved TFLOP/s for eager bf16,
  torch.compile, and torch.compile with CUDA graphs ("reduce-overhead") where they work;
* training tokens/s for one ELF-B step (encoder, both no-grad self-conditioning forwards,
  the grad forward, backward, Muon, EMA) at the official micro-batch (512 over 8 GPUs: 64);
* the peak GPU memory of each;
* with two or more GPUs, the same sampling and training on 2 processes (one per GPU).

On a machine without CUDA it runs the same code at tiny sizes on the CPU (slowly), so CI
keeps it working:

    python bench/gpu_check.py                      # CUDA: ELF-B; CPU: the tiny sizes
    python bench/gpu_check.py --size tiny --modes eager --processes 2   # what CI runs

FLOP count per forward (multiply-adds x 2, matrix products only; norms, RoPE, softmax and
element-wise ops are left out), with S sequence tokens, L = S + 12 prefix tokens, H width,
F = int(4H * 2/3) the SwiGLU hidden width, C latent width, V vocabulary, D depth:

    input:     S * 2 * (2C * C  +  C * 128  +  128 * H)           self_cond_proj, text_proj
    blocks:    D * L * 2 * (3H * H  +  H * H  +  H * 2F  +  F * H)  qkv, proj, w12, w3
               + D * 2 * 2 * L * L * H                              q k^T and attn @ v
    flow head: S * 2 * H * C
    decode:    S * 2 * (H * C  +  C * V)                            only the final decode
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from elfctl.config import ModelConfig, ObjectiveConfig, OptimConfig
from elfctl.model import ELF


@dataclass(frozen=True)
class Size:
    model: ModelConfig
    length: int
    sample_batch: int
    train_micro_batch: int
    t5: tuple[int, int, int, int]  # encoder d_model, layers, heads, d_ff (T5-small for ELF-B)


SIZES = {
    "elf-b": Size(ModelConfig(), 1024, 32, 64, (512, 6, 8, 2048)),
    "tiny": Size(
        ModelConfig(
            hidden_size=64, depth=2, num_heads=4, bottleneck=32, latent_dim=32, vocab_size=128
        ),
        16,
        4,
        4,
        (32, 1, 4, 64),
    ),
}
MODES = ("eager", "compile", "cudagraphs")


def forward_flops(cfg: ModelConfig, S: int, decode: bool) -> float:
    """FLOPs of one forward of B = 1 sequence (the formula in the module docstring)."""
    H, C, V, D = cfg.hidden_size, cfg.latent_dim, cfg.vocab_size, cfg.depth
    F = int(4 * H * 2 / 3)
    L = S + cfg.num_time_tokens + cfg.num_sc_tokens + cfg.num_mode_tokens
    flops = S * 2 * (2 * C * C + C * cfg.bottleneck + cfg.bottleneck * H)
    flops += D * L * 2 * (3 * H * H + H * H + H * 2 * F + F * H)
    flops += D * 2 * 2 * L * L * H
    flops += S * 2 * H * C
    if decode:
        flops += S * 2 * (H * C + C * V)
    return float(flops)


def sampling_flops(cfg: ModelConfig, S: int, steps: int) -> float:
    """One sample: `steps` denoising forwards, then one forward with the decode head."""
    return steps * forward_flops(cfg, S, False) + forward_flops(cfg, S, True)


class GraphSafe(torch.nn.Module):
    """A CUDA-graph-compiled network the sampler can call step after step: each call
    starts a new graph step and its outputs are copied out of the graph's memory (the
    sampler keeps x_hat across steps as the next self-condition)."""

    def __init__(self, model: ELF, compiled):
        super().__init__()
        self.compiled, self.cfg = compiled, model.cfg

    def forward(self, *args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(None if o is None else o.clone() for o in self.compiled(*args, **kwargs))


def build_net(model: ELF, mode: str):
    if mode == "eager":
        return model
    if mode == "compile":
        return torch.compile(model)
    if mode == "cudagraphs":
        return GraphSafe(model, torch.compile(model, mode="reduce-overhead"))
    raise ValueError(mode)


def time_sampling(net, size: Size, steps: int, device, repeats: int) -> float:
    """Seconds per batch of `size.sample_batch` samples (best of `repeats`, after warm-up)."""
    from elfctl.sampling import (
        SamplerSettings,
        SampleStreams,
        autocast_context,
        decode,
        sample_latents,
    )

    settings = SamplerSettings(steps=steps, method="sde", gamma=1.5, sc_cfg=3.0)
    B, C = size.sample_batch, size.model.latent_dim
    best = float("inf")
    for repeat in range(repeats + 1):  # the first run warms up (and compiles)
        streams = SampleStreams(repeat, range(B), device)
        noise = streams.normal((size.length, C))
        sync(device)
        start = time.perf_counter()
        with autocast_context(device, "auto"), torch.no_grad():
            z = sample_latents(net, settings, noise, streams)
            tokens = decode(net, z, settings.sc_cfg)
        tokens.cpu()
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best


def train_step_fn(size: Size, device, ddp: bool = False):
    """One full training step at the micro-batch, as `elfctl train` takes it."""
    from transformers import T5Config, T5EncoderModel

    from elfctl.training import EMA, build_optimizer, draw, elf_loss

    cfg, B, S = size.model, size.train_micro_batch, size.length
    torch.manual_seed(0)
    model = ELF(cfg).to(device)
    d_model, layers, heads, d_ff = size.t5
    t5 = T5Config(
        vocab_size=cfg.vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        num_heads=heads,
        d_ff=d_ff,
        num_layers=layers,
    )
    encoder = T5EncoderModel(t5).to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig(name="muon"), lr=1e-4)
    ema = EMA(model, 0.9999)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    objective = ObjectiveConfig()
    ids = torch.randint(3, cfg.vocab_size, (B, S), device=device)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    cond = torch.zeros_like(mask)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> None:
        with torch.no_grad():
            x = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state / 0.2
        d = draw(B, S, cfg.latent_dim, objective, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            parts = elf_loss(net, x, ids, cond, mask, d, objective, cfg.t_eps)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    return step


def time_training(size: Size, device, steps: int, ddp: bool = False) -> float:
    step = train_step_fn(size, device, ddp)
    step()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def single_process(args, size: Size, device) -> None:
    flops = sampling_flops(size.model, size.length, args.steps)
    print(
        f"sampling: {args.steps}-step SDE + decode, batch {size.sample_batch} x "
        f"{size.length} tokens; {flops / 1e9:.1f} GFLOP per sample"
    )
    torch.manual_seed(0)
    model = ELF(size.model).to(device).eval().requires_grad_(False)
    for mode in args.modes:
        if mode == "cudagraphs" and device.type != "cuda":
            print(f"  {mode:<11} skipped: CUDA graphs need a CUDA device")
            continue
        reset_peak(device)
        start = time.perf_counter()
        try:
            seconds = time_sampling(build_net(model, mode), size, args.steps, device, args.repeats)
        except Exception as e:  # noqa: BLE001 - report the mode that does not work, go on
            print(f"  {mode:<11} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            torch._dynamo.reset()
            continue
        warm_up = time.perf_counter() - start - args.repeats * seconds
        rate = size.sample_batch / seconds
        print(
            f"  {mode:<11} {rate:9.3f} samples/s  {rate * flops / 1e12:8.3f} TFLOP/s  "
            f"peak {peak_gib(device)}  (first run incl. warm-up: {warm_up:.0f}s)"
        )
        torch._dynamo.reset()
    del model

    reset_peak(device)
    seconds = time_training(size, device, args.train_steps)
    tokens = size.train_micro_batch * size.length
    print(
        f"training: one step at micro-batch {size.train_micro_batch} x {size.length} tokens "
        f"(Muon, bf16 autocast on CUDA): {tokens / seconds:,.0f} tokens/s, {seconds:.3f} s/step, "
        f"peak {peak_gib(device)}"
    )


def worker(rank: int, world: int, args, size: Size, port: int, queue) -> None:
    """One of `world` processes: sample and train on its own device, report its speed."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.cpu
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = ELF(size.model).to(device).eval().requires_grad_(False)
    dist.barrier()
    sample_s = time_sampling(model, size, args.steps, device, args.repeats)
    dist.barrier()
    train_s = time_training(size, device, args.train_steps, ddp=True)
    queue.put((rank, sample_s, train_s, peak_gib(device)))
    dist.barrier()
    dist.destroy_process_group()


def multi_process(args, size: Size, world: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.spawn(worker, args=(world, args, size, port, queue), nprocs=world, join=True)
    results = sorted(queue.get() for _ in range(world))
    samples = sum(size.sample_batch / r[1] for r in results)
    tokens = sum(size.train_micro_batch * size.length / r[2] for r in results)
    flops = sampling_flops(size.model, size.length, args.steps)
    print(
        f"{world} processes (eager): sampling {samples:.3f} samples/s in total "
        f"({samples / world:.3f} per process, {samples * flops / 1e12:.3f} TFLOP/s); "
        f"training {tokens:,.0f} tokens/s in total (DDP); peak " + ", ".join(r[3] for r in results)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["auto", *SIZES], default="auto")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=32, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument(
        "--processes", type=int, default=None, help="default: 2 if two GPUs are present"
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with CUDA")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    name = args.size if args.size != "auto" else ("elf-b" if cuda else "tiny")
    size = SIZES[name]
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"elfctl GPU check: {name} on {where}, torch {torch.__version__}")
    start = time.perf_counter()
    single_process(args, size, device)
    world = args.processes
    if world is None:
        world = 2 if cuda and torch.cuda.device_count() >= 2 else 1
    if world > 1:
        multi_process(args, size, world)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
