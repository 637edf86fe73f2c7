"""Optimiser, learning-rate schedule and weight EMA for ELF training (docs/method.md section 4).

The reference trains with Muon for every 2-D weight matrix and Adam for everything
else, both driven by the same bias-corrected Nesterov momentum direction

    m_t = b m_{t-1} + (1 - b) g_t
    d_t = b m_t / (1 - b^(t+1)) + (1 - b) g_t / (1 - b^t)        (t = 1, 2, ...)

Muon (b = 0.95) orthogonalises d_t with 5 quintic Newton-Schulz steps and scales
the result by sqrt(max(1, fan_out / fan_in)); Adam (b1 = 0.9) divides d_t by
sqrt(v_t / (1 - b2^t)) + eps. Both then do `p -= lr * update`.

Public API:
    MuonAdam                    the combined optimiser (one torch Optimizer, groups flagged)
    build_optimizer(model, cfg, lr)
    learning_rate(cfg, global_batch)
    resolve_warmup_steps(cfg, steps_per_epoch)
    lr_lambda(step, warmup_steps, total_steps, schedule)
    build_scheduler(optimizer, warmup_steps, total_steps, schedule)
    EMA                         fp32 shadow weights, decay with optional warm-up
    newton_schulz, nesterov_direction, muon_update_scale, parameter_kind
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from elfctl.config import OptimConfig
from elfctl.errors import UserError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-8  # added to the Frobenius norm before Newton-Schulz

# Raw parameters stored input-major, (in, out): their fan-out is the SECOND axis.
# Every other 2-D parameter is a torch Linear weight, (out, in).
INPUT_MAJOR_PARAMETERS = ("proj_kernel", "unembed_kernel")

ParameterKind = Literal["muon", "muon_input_major", "adam"]


# ---------------------------------------------------------------------------
# The pieces of one update, as plain functions (the tests pin each one)


def nesterov_direction(momentum: Tensor, grad: Tensor, beta: float, step: int) -> Tensor:
    """Bias-corrected Nesterov direction `b m_t / (1 - b^(t+1)) + (1-b) g_t / (1 - b^t)`.

    `momentum` must already hold m_t (the average updated with this step's grad);
    `step` is t, counting from 1.
    """
    momentum_weight = beta / (1.0 - beta ** (step + 1))
    grad_weight = (1.0 - beta) / (1.0 - beta**step)
    return momentum.mul(momentum_weight).add_(grad, alpha=grad_weight)


def newton_schulz(
    matrix: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Approximately orthogonalise a 2-D matrix with the quintic Newton-Schulz iteration.

    X <- a X + (b A + c A^2) X with A = X X^T, starting from X = M / (||M||_F + eps),
    iterated on the orientation with rows <= cols (so A is the small Gram matrix).
    With these coefficients the singular values do not converge to 1 but land in a
    band of roughly 0.7-1.2, which is what Muon wants (a fast, not exact, polar factor).

    Computed in `dtype`, fp32 by default whatever the input dtype: the JAX reference runs
    it in the fp32 dtype of its updates (TF32 matmuls on its GPUs), and fp32 is exact
    enough to test on CPU. bf16 is what torch.optim.Muon uses for speed.
    Returns an fp32 tensor of the input's shape.
    """
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    x = matrix.to(dtype)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T  # (rows <= cols): the Gram matrix below is (rows, rows), the smaller side
    x = x / (torch.linalg.matrix_norm(x) + eps)  # Frobenius norm >= spectral norm, so sigma <= 1
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        polynomial = b * gram + c * (gram @ gram)  # (r, r)
        x = a * x + polynomial @ x  # (r, c)
    x = x.T if transposed else x
    return x.float()


def muon_update_scale(shape: tuple[int, ...] | torch.Size, input_major: bool) -> float:
    """sqrt(max(1, fan_out / fan_in)) for a 2-D parameter of this layout.

    torch Linear weights are (out, in): fan_out / fan_in = rows / cols.
    Input-major raw kernels are (in, out): fan_out / fan_in = cols / rows,
    so `unembed_kernel` (512, 32100) gets sqrt(32100 / 512) ~= 7.92.
    """
    rows, cols = shape
    fan_in, fan_out = (rows, cols) if input_major else (cols, rows)
    return math.sqrt(max(1.0, fan_out / fan_in))


def parameter_kind(name: str, param: Tensor) -> ParameterKind:
    """Which update an ELF parameter gets, from its state-dict name and shape.

    Matching uses the last name component, so prefixes added by wrappers
    (`module.`, `_orig_mod.`) do not change the answer.
    """
    leaf_name = name.rsplit(".", 1)[-1]
    if leaf_name in INPUT_MAJOR_PARAMETERS:
        if param.ndim != 2:
            raise ValueError(f"{name} should be a 2-D input-major kernel, got {tuple(param.shape)}")
        return "muon_input_major"
    return "muon" if param.ndim == 2 else "adam"


# ---------------------------------------------------------------------------
# The optimiser


class MuonAdam(torch.optim.Optimizer):
    """Muon for 2-D weight matrices and Adam for the rest, in one torch Optimizer.

    Each param group carries two flags: `use_muon` (Muon update; every parameter in the
    group must be 2-D) and `input_major` (the group's matrices are stored (in, out), which
    only changes the fan-out/fan-in scale). Groups keep the usual `lr` key, so
    `torch.optim.lr_scheduler`, accelerate's optimizer wrapper and
    `state_dict()`/`load_state_dict()` work as for any torch optimizer. Per-parameter
    state: `step` (python int, t), `exp_avg` (m_t) and, for Adam, `exp_avg_sq` (v_t).

    Update for a parameter p with gradient g at step t (see `nesterov_direction`):
        Muon:  p -= lr * sqrt(max(1, fan_out/fan_in)) * NS5(d_t)          (b = muon_momentum)
        Adam:  p -= lr * d_t / (sqrt(v_t / (1 - b2^t)) + adam_eps)          (b = b1)
    and, when weight_decay > 0, first the decoupled decay p -= lr * weight_decay * p
    (not multiplied by the Muon scale). The spec trains with weight_decay = 0.

    How this differs from `torch.optim.Muon` (nesterov=True, adjust_lr_fn="original"):
    * Momentum: torch uses the uncorrected `(1-b) g_t + b m_t`. Here the two terms are
      bias-corrected separately, as the reference does. At t = 1 both directions are
      multiples of g_1, so after Frobenius normalisation the first step is identical;
      from t = 2 the relative weight of m_t and g_t differs, and the difference fades
      as b^t -> 0 (after ~100 steps at b = 0.95).
    * Layout: torch assumes (out, in) and scales by sqrt(max(1, rows/cols)); here the
      `input_major` flag makes it cols/rows for the raw (in, out) kernels.
    * Precision: Newton-Schulz runs in fp32 here by default (`ns_dtype="bfloat16"` gives
      torch's choice), bf16 in torch; norm eps 1e-8 vs 1e-7. On GPUs,
      `torch.set_float32_matmul_precision("high")` makes the fp32 iteration use TF32, as
      JAX's default fp32 matmul precision does on such GPUs (presumably how the reference
      ran; not verified).
    * Defaults: torch.optim.Muon decays weights by 0.1 unless told otherwise; here 0.
    * torch.optim.Muon has no Adam fallback for non-matrix parameters.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        *,
        use_muon: bool = False,
        input_major: bool = False,
        muon_momentum: float = 0.95,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        ns_dtype: Literal["float32", "bfloat16"] = "float32",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not 0.0 <= muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {muon_momentum}")
        if not all(0.0 <= beta < 1.0 for beta in adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {adam_betas}")
        defaults = dict(
            lr=lr,
            use_muon=use_muon,
            input_major=input_major,
            muon_momentum=muon_momentum,
            ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients),
            ns_eps=ns_eps,
            ns_dtype=ns_dtype,
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["input_major"] and not group["use_muon"]:
            raise ValueError("input_major only means something for a use_muon group")
        if group["ns_dtype"] not in ("float32", "bfloat16"):
            raise ValueError(f"ns_dtype must be 'float32' or 'bfloat16', got {group['ns_dtype']!r}")
        if group["use_muon"]:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(
                        f"a use_muon group holds a parameter of shape {tuple(param.shape)}; "
                        "Muon only updates 2-D matrices"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MuonAdam does not support sparse gradients")
                if group["use_muon"]:
                    self._muon_update(param, group)
                else:
                    self._adam_update(param, group)
        return loss

    def _muon_update(self, param: Tensor, group: dict) -> None:
        grad = param.grad
        state = self.state[param]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        beta = group["muon_momentum"]
        state["exp_avg"].lerp_(grad, 1.0 - beta)  # m_t = b m_{t-1} + (1 - b) g_t
        direction = nesterov_direction(state["exp_avg"], grad, beta, state["step"])
        orthogonal = newton_schulz(
            direction,
            group["ns_steps"],
            group["ns_coefficients"],
            group["ns_eps"],
            getattr(torch, group["ns_dtype"]),
        )
        scale = muon_update_scale(param.shape, group["input_major"])
        self._apply(param, orthogonal.to(param.dtype), group, scale)

    def _adam_update(self, param: Tensor, group: dict) -> None:
        grad = param.grad
        state = self.state[param]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["adam_betas"]
        state["exp_avg"].lerp_(grad, 1.0 - beta1)  # m_t
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t
        direction = nesterov_direction(state["exp_avg"], grad, beta1, step)
        denominator = (state["exp_avg_sq"] / (1.0 - beta2**step)).sqrt_().add_(group["adam_eps"])
        self._apply(param, direction.div_(denominator), group, 1.0)

    @staticmethod
    def _apply(param: Tensor, update: Tensor, group: dict, scale: float) -> None:
        lr = group["lr"]
        if group["weight_decay"] != 0.0:
            param.mul_(1.0 - lr * group["weight_decay"])  # decoupled: p -= lr * wd * p
        param.add_(update, alpha=-lr * scale)


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    *,
    ns_dtype: Literal["float32", "bfloat16"] = "float32",
) -> torch.optim.Optimizer:
    """The training optimiser for `model`: MuonAdam (cfg.name "muon") or torch AdamW.

    Muon groups, in this order: (out, in) matrices, then the input-major kernels;
    then one Adam group for everything else (see `parameter_kind`). Empty groups are left
    out. Only parameters with requires_grad are optimised. AdamW decays every parameter
    by cfg.weight_decay (0 in every preset).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            [p for _, p in named],
            lr=lr,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name != "muon":
        raise UserError(f"Unknown optimiser {cfg.name!r}: choose 'muon' or 'adamw'.")
    by_kind: dict[ParameterKind, list[Tensor]] = {"muon": [], "muon_input_major": [], "adam": []}
    for name, param in named:
        by_kind[parameter_kind(name, param)].append(param)
    groups = [
        {"params": by_kind["muon"], "use_muon": True, "input_major": False},
        {"params": by_kind["muon_input_major"], "use_muon": True, "input_major": True},
        {"params": by_kind["adam"], "use_muon": False, "input_major": False},
    ]
    return MuonAdam(
        [group for group in groups if group["params"]],
        lr=lr,
        muon_momentum=cfg.muon_momentum,
        ns_steps=cfg.muon_ns_steps,
        ns_dtype=ns_dtype,
        adam_betas=tuple(cfg.adam_betas),
        adam_eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


# ---------------------------------------------------------------------------
# Learning rate


def learning_rate(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule: lr = blr * global_batch / 256."""
    return cfg.blr * global_batch / 256


def resolve_warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimiser steps: `warmup_steps` if set, else epochs x steps/epoch."""
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    if cfg.warmup_epochs is not None:
        return round(cfg.warmup_epochs * steps_per_epoch)
    return 0


def lr_lambda(step: int, warmup_steps: int, total_steps: int | None, schedule: str) -> float:
    """Multiplier of the peak lr for the update made at optimiser step `step` (from 0).

    Warm-up: factor = step / warmup_steps for step < warmup_steps, i.e. linear from 0,
    like the reference's linear schedule from 0 (the first update has lr 0 but still
    fills the momentum). Then "constant": 1, or "cosine": 0.5 (1 + cos(pi p)) with
    p = (step - warmup) / (total - warmup) clipped to [0, 1], reaching 0 at total_steps.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("the cosine schedule needs total_steps")
        decay_steps = total_steps - warmup_steps
        progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"Unknown lr schedule {schedule!r}: choose 'constant' or 'cosine'.")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int | None,
    schedule: str,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_lambda`; call `scheduler.step()` once after each optimiser step."""
    lr_lambda(0, warmup_steps, total_steps, schedule)  # validate the schedule name up front

    def factor(step: int) -> float:
        return lr_lambda(step, warmup_steps, total_steps, schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------
# EMA of the weights


class EMA:
    """Exponential moving average of a model's parameters, kept as fp32 shadows by name.

    `update(model)` does shadow <- decay * shadow + (1 - decay) * param in place (a lerp on
    the device, no host sync). The decay is `decay`, or with `warmup` the ramp
    min(decay, (1 + n) / (10 + n)) where n is the number of updates done before this one.
    Give it the unwrapped model (names as in docs/method.md section 7).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: param.detach().to(torch.float32, copy=True)
            for name, param in model.named_parameters()
        }

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the shadows toward the model's current parameters (decay overrides the rule)."""
        decay = self.current_decay() if decay is None else decay
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach().to(torch.float32), 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averaged weights (cast to their dtype)."""
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])

    def averaged_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """`model.state_dict()` with every parameter replaced by its fp32 shadow (for saving)."""
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        for name, shadow in self.shadow.items():
            state[name] = shadow
        return state

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {name: tensor.to(device) for name, tensor in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`; the parameter names and shapes must match this model."""
        saved = state["shadow"]
        if set(saved) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(saved))
            unexpected = sorted(set(saved) - set(self.shadow))
            raise UserError(
                f"The saved EMA weights do not match the model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})."
            )
        for name, tensor in saved.items():
            if tensor.shape != self.shadow[name].shape:
                raise UserError(
                    f"The saved EMA weight {name} has shape {tuple(tensor.shape)} but the "
                    f"model's has {tuple(self.shadow[name].shape)}."
                )
        with torch.no_grad():
            for name, tensor in saved.items():
                self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
