"""The conditional training loss on fixed batches and draws: what the decoder-branch fix moved.

Builds the `tiny-translate` trainer (same data order, same random draws: every number
here is a function of --seed), optionally loads weights into it, and evaluates the
objective and its gradient on the first --batches global batches, without an optimiser
step. Run it with two versions of elfctl on the PYTHONPATH to compare them on the same
batches and draws: the draws do not depend on the version, only what is built from them.

    python bench/conditional_loss.py                                  # random init, seed 0
    python bench/conditional_loss.py --weights RUN_DIR/checkpoints/step_00000800
    python bench/conditional_loss.py --save-grads after.pt
    PYTHONPATH=/path/to/old/elfctl python bench/conditional_loss.py --compare-grads after.pt

(run from outside the checkout, so that PYTHONPATH, not the current folder, picks the
version). --compare-grads prints, per parameter tensor, the relative difference
|g - g_other| / |g_other| of the summed gradients against a file saved by another run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    file = path / "model.safetensors" if path.is_dir() else path
    model.load_state_dict(load_file(str(file)), strict=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="global batches to evaluate")
    parser.add_argument("--seed", type=int, default=0, help="train.seed: init, order, draws")
    parser.add_argument("--weights", type=Path, help="a checkpoint dir or model.safetensors")
    parser.add_argument("--save-grads", type=Path, help="save the summed gradients here")
    parser.add_argument("--compare-grads", type=Path, help="compare with gradients saved here")
    args = parser.parse_args()

    import elfctl
    from elfctl.config import resolve
    from elfctl.training import Trainer, make_accelerator

    cfg = resolve("tiny-translate", sets=[f"train.seed={args.seed}"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", make_accelerator(cpu=True), resume="never")
    if args.weights is not None:
        load_weights(trainer.raw_model, args.weights)
    trainer.model.train()
    sums = torch.zeros(4)
    for _ in range(args.batches):
        batches = trainer._micro_batches()
        denominator = trainer.loss_denominator(batches)
        for batch in batches:
            parts = trainer.micro_loss(batch, denominator)
            parts.loss.backward()  # gradients add up over the batches
            sums += torch.stack([parts.ce_sum, parts.l2_sum, parts.ce_tokens, parts.l2_tokens])
    ce_sum, l2_sum, ce_tokens, l2_tokens = sums.tolist()
    grads = {n: p.grad.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    grad_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()

    print(f"elfctl from {Path(elfctl.__file__).parent}")
    print(
        f"tiny-translate, seed {args.seed}, {args.batches} batches of {cfg.train.global_batch}, "
        f"weights {args.weights or 'random init'}"
    )
    print(
        f"loss {(ce_sum + l2_sum) / (ce_tokens + l2_tokens):.6f}  "
        f"ce {ce_sum / max(ce_tokens, 1):.6f} ({ce_tokens:.0f} decoder tokens)  "
        f"l2 {l2_sum / max(l2_tokens, 1):.6f} ({l2_tokens:.0f} denoiser tokens)  "
        f"grad norm {grad_norm:.6f}"
    )
    if args.save_grads is not None:
        torch.save(grads, args.save_grads)
    if args.compare_grads is not None:
        other = torch.load(args.compare_grads, weights_only=True)
        rel = {
            n: ((g - other[n]).norm() / other[n].norm().clamp_min(1e-30)).item()
            for n, g in grads.items()
        }
        values = sorted(rel.values())
        print(
            f"per-tensor relative gradient difference vs {args.compare_grads}: "
            f"median {values[len(values) // 2]:.1%}, max {values[-1]:.1%} "
            f"({max(rel, key=rel.get)}), {len(values)} tensors"
        )


if __name__ == "__main__":
    main()
