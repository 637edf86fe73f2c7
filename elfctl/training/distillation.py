"""Progressive distillation (docs/method.md section 8): few-step students from a many-step teacher.

A curriculum of rounds. In round k the student learns to cover a span `spans[k-1]` of flow
time in ONE Euler step, where the frozen teacher (always the original model, EMA weights)
integrates the same span in `span * teacher_resolution` Euler sub-steps. The student's
regression target is the x-prediction that makes its single step land exactly on the
teacher's end point ("target inversion"). Round 1 starts from the teacher's weights,
round k > 1 from round k-1's EMA weights, with a fresh optimiser, step count and EMA.

Beyond the official recipe (docs/distillation.md), a `DistillRule` chooses what the
student learns: the target ("progressive": the inversion above; "consistency": the
student's own x-prediction, without gradient, where the teacher's path ends) and how the
teacher crosses the span ("ode": Euler sub-steps; "sde": each sub-step after a churn, as
the SDE sampler, the better sampler of the test bed).

The maths is pure functions of tensors (`teacher_times`, `teacher_trajectory`,
`pd_target`, `consistency_target`, `student_step`, `distill_loss`); all randomness of a
step is drawn first by `draw_pd`, as in `objective.py`. `DistillTrainer` plugs the loss
into the ordinary training loop (same Accelerate loop, checkpoints and exact resume as
`elfctl train`).

Curriculum directory:
    RUN_DIR/round_<k>/     a normal run dir per round (config.yaml with distill.round = k,
                           checkpoints/step_N/ that `elfctl sample` loads, train_log.jsonl)

A round is finished when its newest checkpoint's step equals its total steps; `distill`
skips finished rounds and resumes an unfinished one where it stopped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from elfctl import records
from elfctl.config import Config, DistillConfig, ObjectiveConfig
from elfctl.distributed import local_device
from elfctl.errors import UserError
from elfctl.model import flow
from elfctl.model.checkpoints import (
    WEIGHTS_FILE,
    build_model,
    list_step_dirs,
    load_checkpoint,
    read_config_state,
)
from elfctl.model.network import ELF
from elfctl.training.objective import (
    LossParts,
    decoder_input,
    draw_branches,
    drop_labels,
    encode_batch,
    keep_condition,
    model_config,
)
from elfctl.training.trainer import StepReport, Trainer, TrainResult, make_accelerator

# Below this span the inversion divides by almost nothing; the official code then regresses
# straight onto the teacher's x-prediction instead.
MIN_SPAN = 1e-3

TARGETS = ("progressive", "consistency")
TEACHER_SAMPLERS = ("ode", "sde")
TARGET_NETWORKS = ("ema", "student")


@dataclass(frozen=True)
class DistillRule:
    """What a student regresses onto, and how the teacher crosses the span (defaults:
    the official recipe)."""

    target: str = "progressive"
    teacher_sampler: str = "ode"
    teacher_gamma: float = 1.5  # the churn of the "sde" teacher
    target_network: str = "ema"  # what gives the consistency target (see DistillConfig)

    @classmethod
    def of(cls, d: DistillConfig) -> DistillRule:
        return cls(d.target, d.teacher_sampler, d.teacher_gamma, d.target_network)


OFFICIAL = DistillRule()


# ---------------------------------------------------------------------------
# Curriculum bookkeeping


def substeps_for(span: float, resolution: int) -> int:
    """Teacher Euler sub-steps for a span: span x resolution (1/16 x 64 = 4), at least 1."""
    return max(1, round(span * resolution))


def parse_rounds(text: str, num_rounds: int) -> list[int]:
    """'3' -> [3]; '2-4' -> [2, 3, 4]; every round must lie in 1..num_rounds."""
    try:
        first, dash, last = text.strip().partition("-")
        lo = int(first)
        hi = int(last) if dash else lo
    except ValueError:
        raise UserError(f"--rounds expects K or A-B (like 1-{num_rounds}), got '{text}'.") from None
    if not 1 <= lo <= hi <= num_rounds:
        raise UserError(
            f"Rounds {text} are outside the curriculum's rounds 1-{num_rounds} "
            "(distill.spans has one span per round)."
        )
    return list(range(lo, hi + 1))


def check_distill_config(cfg: Config) -> None:
    d = cfg.distill
    if not d.teacher:
        raise UserError("No teacher: pass --teacher SRC or set distill.teacher in the config.")
    if not d.spans:
        raise UserError("distill.spans is empty: give one span per round.")
    for i, span in enumerate(d.spans):
        if not 0.0 < span <= 1.0:
            raise UserError(f"distill.spans[{i}] is {span}; every span must lie in (0, 1].")
    if d.teacher_resolution < 1:
        raise UserError(
            f"distill.teacher_resolution must be at least 1, got {d.teacher_resolution}."
        )
    if d.steps_per_round is not None and d.steps_per_round < 1:
        raise UserError(f"distill.steps_per_round must be at least 1, got {d.steps_per_round}.")
    if cfg.model.vocab_size == "auto":
        raise UserError("Distillation keeps the teacher's model.vocab_size; give the number.")
    if d.epochs_per_round <= 0:
        raise UserError(f"distill.epochs_per_round must be positive, got {d.epochs_per_round}.")
    if d.target not in TARGETS:
        raise UserError(f"distill.target must be one of {', '.join(TARGETS)}, got '{d.target}'.")
    if d.teacher_sampler not in TEACHER_SAMPLERS:
        raise UserError(
            f"distill.teacher_sampler must be one of {', '.join(TEACHER_SAMPLERS)}, "
            f"got '{d.teacher_sampler}'."
        )
    if d.target_network not in TARGET_NETWORKS:
        raise UserError(
            f"distill.target_network must be one of {', '.join(TARGET_NETWORKS)}, "
            f"got '{d.target_network}'."
        )
    if d.teacher_gamma < 0:
        raise UserError(f"distill.teacher_gamma must be at least 0, got {d.teacher_gamma}.")


def round_config(cfg: Config, k: int) -> Config:
    """The config of round k: the curriculum's config with distill.round = k and the round's
    length (distill.steps_per_round or distill.epochs_per_round; train.max_steps and
    train.epochs of the base config do not apply to rounds)."""
    check_distill_config(cfg)
    if not 1 <= k <= len(cfg.distill.spans):
        raise UserError(f"Round {k} is outside the curriculum's rounds 1-{len(cfg.distill.spans)}.")
    out = copy.deepcopy(cfg)
    out.distill.round = k
    out.train.epochs = cfg.distill.epochs_per_round
    out.train.max_steps = cfg.distill.steps_per_round
    return out


def round_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"round_{k}"


def total_steps(cfg: Config, n_rows: int) -> int:
    """The Trainer's rule for a run's length: max_steps, else epochs x steps per epoch."""
    return cfg.train.max_steps or math.ceil(cfg.train.epochs * (n_rows // cfg.train.global_batch))


# ---------------------------------------------------------------------------
# Randomness of one step


@dataclass
class PDDraws:
    """Every random quantity of one distillation step, for a batch of B rows."""

    u: torch.Tensor  # (B,) logit-normal position of the span: t_s = u (1 - span)
    eps: torch.Tensor  # (B, S, C) noise of z_s
    inner: torch.Tensor  # (B, substeps - 1) sorted logit-normal draws in (0, 1)
    is_decoder: torch.Tensor  # (B,) bool: decoder CE branch
    lam: torch.Tensor  # (B, S, 1) per-token clean share of the decoder input
    dec_noise: torch.Tensor  # (B, S, C)
    use_self_cond: torch.Tensor  # (B,) bool: self-condition = teacher's x_hat (else zeros)
    sc_scale: torch.Tensor  # (B,) SC-CFG scale w, fed to teacher and student
    drop_condition: torch.Tensor  # (B,) bool: label drop
    churn: torch.Tensor | None = None  # (B, substeps, S, C): the "sde" teacher's churn noise

    def rows(self, index: torch.Tensor) -> PDDraws:
        """The draws of the rows `index` (a 1-D index tensor), in that order."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return PDDraws(**{k: v if v is None else v[index] for k, v in picked.items()})


def draw_pd(
    B: int,
    S: int,
    C: int,
    substeps: int,
    cfg: ObjectiveConfig,
    device,
    generator=None,
    churn: bool = False,
) -> PDDraws:
    """The step's draws in a fixed order; `churn` (the "sde" teacher) draws its sub-steps'
    noise last, so the official draws are the same with or without it."""

    def logit_normal(*shape):
        return flow.logit_normal(shape, cfg.p_mean, cfg.p_std, generator, device)

    draws = PDDraws(
        u=logit_normal(B),
        eps=torch.randn((B, S, C), generator=generator, device=device),
        inner=logit_normal(B, substeps - 1).sort(dim=-1).values,
        **draw_branches(B, S, C, cfg, device, generator),
    )
    if churn:
        draws.churn = torch.randn((B, substeps, S, C), generator=generator, device=device)
    return draws


# ---------------------------------------------------------------------------
# The PD maths


def span_times(u: torch.Tensor, span: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_s, t_t) = (u (1 - span), u (1 - span) + span): the span always fits in [0, 1]."""
    t_s = u * (1 - span)
    return t_s, t_s + span


def teacher_times(t_s: torch.Tensor, t_t: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """(B,), (B,), (B, n-1) sorted draws in (0, 1) -> (B, n+1) sub-step times:
    t_s, the draws rescaled into [t_s, t_t], then t_t."""
    span = (t_t - t_s)[:, None]
    return torch.cat([t_s[:, None], t_s[:, None] + inner * span, t_t[:, None]], dim=1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t[:, None, None]


@torch.no_grad()
def teacher_trajectory(
    teacher,
    z_s: torch.Tensor,
    self_cond: torch.Tensor,
    times: torch.Tensor,
    sc_scale: torch.Tensor,
    x: torch.Tensor,
    cond_mask: torch.Tensor,
    t_eps: float,
    churn: torch.Tensor | None = None,
    gamma: float = 0.0,
    noise_scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler through the teacher from z_s at times[:, 0] to times[:, -1].

    z_s, self_cond, x (B, S, C); times (B, n+1); sc_scale (B,); cond_mask (B, S) bool.
    The first sub-step gets `self_cond`; each later one the previous sub-step's x_hat.
    With `churn` (B, n, S, C), each sub-step first goes back to t_back with that noise
    (`flow.sde_back`, churn `gamma`) and steps from there, as the SDE sampler does.
    Condition positions of z and x_hat always carry x.
    Returns (z at the end time, the first and the last sub-step's x_hat), all (B, S, C).
    """
    uses_self_cond = model_config(teacher).self_cond
    z, x_prev, first_x_hat = z_s, self_cond, None
    for i in range(times.shape[1] - 1):
        t, t_next = times[:, i], times[:, i + 1]
        if churn is not None:
            z, t = flow.sde_back(z, t, t_next, gamma, noise_scale, churn[:, i])
            z = keep_condition(z, x, cond_mask)
        inputs = torch.cat([z, x_prev], dim=-1) if uses_self_cond else z
        x_hat, _ = teacher(inputs, t, sc_scale=sc_scale)
        x_hat = keep_condition(x_hat.float(), x, cond_mask)
        v = flow.velocity(x_hat, z, t, t_eps)
        z = keep_condition(z + _rows(t_next - t) * v, x, cond_mask)
        x_prev = x_hat
        if first_x_hat is None:
            first_x_hat = x_hat
    return z, first_x_hat, x_prev


def pd_target(
    z_s: torch.Tensor,
    z_end: torch.Tensor,
    t_s: torch.Tensor,
    t_t: torch.Tensor,
    x_direct: torch.Tensor,
    min_span: float = MIN_SPAN,
) -> torch.Tensor:
    """The x_hat that makes one student Euler step from (z_s, t_s) land on z_end at t_t:
    x_target = z_s + (1 - t_s) / (t_t - t_s) (z_end - z_s); where the span is below
    `min_span`, the teacher's direct x-prediction `x_direct` instead.

    Exact for the student's step v = (x_hat - z_s) / max(1 - t_s, t_eps) whenever
    1 - t_s >= t_eps, which holds for every span >= t_eps (t_s <= 1 - span).
    """
    span = t_t - t_s
    scale = (1 - t_s) / span.clamp_min(min_span)
    inverted = z_s + _rows(scale) * (z_end - z_s)
    return torch.where(_rows(span < min_span), x_direct, inverted)


@torch.no_grad()
def consistency_target(
    student,
    z_end: torch.Tensor,
    x_prev: torch.Tensor,
    t_t: torch.Tensor,
    sc_scale: torch.Tensor,
    x: torch.Tensor,
    cond_mask: torch.Tensor,
) -> torch.Tensor:
    """Consistency distillation's target in x-prediction: the student's own x_hat (no
    gradient) at the teacher's end point (z_end, t_t), self-conditioned on the teacher's
    last x_hat `x_prev`. A student that predicts the same x from every point of a teacher
    path jumps to the path's end from anywhere on it. Where t_t = 1 the end point is the
    path's end itself, and the target.
    """
    inputs = torch.cat([z_end, x_prev], dim=-1) if model_config(student).self_cond else z_end
    x_hat, _ = student(inputs, t_t, sc_scale=sc_scale)
    x_hat = keep_condition(x_hat.float(), x, cond_mask)
    return torch.where(_rows(t_t >= 1.0), z_end, x_hat)


class EMANetwork:
    """A model's architecture run with other weights (its EMA shadows, by parameter name):
    consistency distillation's target network, without a second copy of the model."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.model, self.weights, self.cfg = model, weights, model_config(model)

    def __call__(self, inputs, t, sc_scale=None, decode=False):
        kwargs = {"sc_scale": sc_scale, "decode": decode}
        return functional_call(self.model, self.weights, (inputs, t), kwargs)


def student_step(
    z_s: torch.Tensor, x_hat: torch.Tensor, t_s: torch.Tensor, t_t: torch.Tensor, t_eps: float
) -> torch.Tensor:
    """One Euler step of the student from t_s to t_t with its x-prediction x_hat."""
    return z_s + _rows(t_t - t_s) * flow.velocity(x_hat, z_s, t_s, t_eps)


@dataclass
class PDInputs:
    """What the student sees and must produce on PD rows (for tests and inspection)."""

    t_s: torch.Tensor  # (B,)
    t_t: torch.Tensor  # (B,)
    z_s: torch.Tensor  # (B, S, C)
    self_cond: torch.Tensor  # (B, S, C) the self-conditioning half given to both models
    times: torch.Tensor  # (B, n+1) teacher sub-step times
    z_end: torch.Tensor  # (B, S, C) teacher's end point
    target: torch.Tensor  # (B, S, C) x_target


@torch.no_grad()
def pd_inputs(
    teacher,
    x: torch.Tensor,
    cond_mask: torch.Tensor,
    draws: PDDraws,
    span: float,
    noise_scale: float,
    t_eps: float,
    rule: DistillRule = OFFICIAL,
    target_net=None,
) -> PDInputs:
    """Steps 1-6 of section 8 for every row: z_s, the self-conditioning half, the
    teacher's sub-step integration and the inverted target. x (B, S, C) after label drop.
    `rule` may change the teacher's sampler and the target (the consistency target is
    `target_net`'s prediction)."""
    t_s, t_t = span_times(draws.u, span)
    z_s = keep_condition(flow.add_noise(x, draws.eps, t_s, noise_scale), x, cond_mask)
    w = draws.sc_scale
    zeros = keep_condition(torch.zeros_like(x), x, cond_mask)
    self_cond = zeros
    takes = draws.use_self_cond.nonzero().squeeze(1)
    if model_config(teacher).self_cond and len(takes):
        # The teacher's own x_hat at (z_s, t_s) from a zero self-condition, run only on the
        # rows that take it (the others get zeros).
        inputs = torch.cat([z_s[takes], zeros[takes]], dim=-1)
        x_first, _ = teacher(inputs, t_s[takes], sc_scale=w[takes])
        x_first = keep_condition(x_first.float(), x[takes], cond_mask[takes])
        self_cond = zeros.index_copy(0, takes, x_first)
    times = teacher_times(t_s, t_t, draws.inner)
    churn = draws.churn if rule.teacher_sampler == "sde" else None
    if rule.teacher_sampler == "sde" and churn is None:
        raise ValueError("the sde teacher needs churn noise: draw_pd(..., churn=True)")
    z_end, x_direct, x_last = teacher_trajectory(
        teacher,
        z_s,
        self_cond,
        times,
        w,
        x,
        cond_mask,
        t_eps,
        churn,
        rule.teacher_gamma,
        noise_scale,
    )
    if rule.target == "consistency":
        target = consistency_target(target_net, z_end, x_last, t_t, w, x, cond_mask)
    else:
        target = pd_target(z_s, z_end, t_s, t_t, x_direct)
    return PDInputs(t_s, t_t, z_s, self_cond, times, z_end, target)


def distill_loss(
    student,
    teacher,
    x: torch.Tensor,
    input_ids: torch.Tensor,
    cond_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    draws: PDDraws,
    cfg: ObjectiveConfig,
    span: float,
    t_eps: float,
    denominator: torch.Tensor | float | None = None,
    rule: DistillRule = OFFICIAL,
    target_net=None,
) -> LossParts:
    """The distillation loss for clean latents x (B, S, C) (before label drop).

    Per example: decoder rows -> token CE (section 4's decoder branch), the others -> the
    squared x-space error to the PD target; each averaged over the row's loss-mask tokens.
    loss = sum of per-example losses / denominator (default B: the mean over examples).
    In the returned parts, ce_sum / l2_sum are sums of per-example losses and
    ce_tokens / l2_tokens count EXAMPLES, so the trainer's log means stay means.
    The consistency target comes from `target_net` (default: the student itself).
    """
    cond_mask, loss_mask = cond_mask.bool(), loss_mask.bool()
    x = drop_labels(x, cond_mask, draws.drop_condition)
    is_dec = draws.is_decoder
    zeros = keep_condition(torch.zeros_like(x), x, cond_mask)

    # The teacher runs on the PD rows only; decoder rows keep zeros in these slots.
    z_s, self_cond, target = zeros, zeros, torch.zeros_like(x)
    t_in = torch.ones_like(draws.u)
    pd_rows = (~is_dec).nonzero().squeeze(1)
    if len(pd_rows):
        sub = (x[pd_rows], cond_mask[pd_rows], draws.rows(pd_rows))
        net = target_net if target_net is not None else student
        pd = pd_inputs(teacher, *sub, span, cfg.noise_scale, t_eps, rule, net)
        z_s = z_s.index_copy(0, pd_rows, pd.z_s)
        self_cond = self_cond.index_copy(0, pd_rows, pd.self_cond)
        target = target.index_copy(0, pd_rows, pd.target)
        t_in = t_in.index_copy(0, pd_rows, pd.t_s)

    # One gradient forward over the mixed batch, exactly as in the base objective.
    rows = _rows(is_dec)
    z_dec = decoder_input(x, draws.dec_noise, draws.lam, cfg.decoder_noise_scale)
    z_in = torch.where(rows, z_dec, z_s)
    x_prev_in = torch.where(rows, torch.zeros_like(x), self_cond)  # as in the base objective
    inputs = torch.cat([z_in, x_prev_in], dim=-1) if model_config(student).self_cond else z_in
    x_hat, logits = student(inputs, t_in, sc_scale=draws.sc_scale, decode=is_dec.float())

    squared = (x_hat.float() - target).pow(2).mean(-1)  # (B, S)
    ce = F.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")  # (B, S)
    mask = loss_mask.float()
    tokens = mask.sum(-1).clamp_min(1)  # (B,)
    ce_row = (ce * mask).sum(-1) / tokens
    mse_row = (squared * mask).sum(-1) / tokens
    dec, is_pd = is_dec.float(), (~is_dec).float()
    per_example = dec * ce_row + is_pd * mse_row  # (B,)
    if denominator is None:
        denominator = float(x.shape[0])
    return LossParts(
        loss=per_example.sum() / denominator,
        ce_sum=(dec * ce_row).sum().detach(),
        l2_sum=(is_pd * mse_row).sum().detach(),
        ce_tokens=dec.sum(),
        l2_tokens=is_pd.sum(),
    )


# ---------------------------------------------------------------------------
# The trainer


class DistillTrainer(Trainer):
    """One round of the curriculum on the ordinary training loop.

    `cfg` is a round config (see `round_config`); `run_dir` is that round's directory,
    RUN_DIR/round_<k>, and round k > 1 warm-starts from RUN_DIR/round_<k-1>.
    In the train log, "l2" is the mean PD x-space error over PD examples, "ce" the mean
    per-example CE over decoder examples and "loss" the mean over all examples.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        accelerator,
        resume: str = "auto",
        *,
        log_with: Sequence[str] = (),
    ):
        check_distill_config(cfg)
        if cfg.data.streaming:  # rounds are counted in epochs of a known number of rows
            raise UserError("distill does not stream (data.streaming): its rounds are epochs.")
        if cfg.distill.round is None:
            raise UserError("A distillation round needs distill.round (use round_config).")
        self.round = cfg.distill.round
        self.span = cfg.distill.spans[self.round - 1]
        self.substeps = substeps_for(self.span, cfg.distill.teacher_resolution)
        self.rule = DistillRule.of(cfg.distill)
        checkpoint = cfg.distill.teacher
        ckpt = load_checkpoint(checkpoint)  # EMA weights: the teacher of every round
        teacher = build_model(ckpt.state_dict, cfg.model, f"The teacher {checkpoint}")
        self.teacher_state = ckpt.state_dict
        device = local_device(accelerator.device)
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        run_dir = Path(run_dir)
        tracker_name = f"{run_dir.parent.name}-{run_dir.name}"  # one tracker run per round
        super().__init__(
            cfg, run_dir, accelerator, resume, log_with=log_with, tracker_name=tracker_name
        )
        self.teacher_state = None  # only needed to build round 1's student

    def initial_model(self):
        """Round 1: a copy of the teacher; round k > 1: round k-1's EMA weights."""

        if self.round == 1:
            state = self.teacher_state
        else:
            state = previous_round_weights(self.run_dir, self.round, len(self.data.rows))
        model = ELF(self.cfg.model)
        model.load_state_dict(state, strict=True)
        return model

    def loss_denominator(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The global number of examples over the processes whose gradients DDP averages:
        every micro-batch's per-example sum shares it, so the step's loss is the mean over
        the global batch's examples."""
        rows = torch.tensor(
            float(sum(b["input_ids"].shape[0] for b in batches)), device=self.device
        )
        return self.acc.reduce(rows, reduction="sum").clamp_min(1) / self.acc.num_processes

    def micro_loss(self, batch: dict[str, torch.Tensor], denominator: torch.Tensor) -> LossParts:
        cfg = self.cfg
        B, S = batch["input_ids"].shape
        C = cfg.model.latent_dim
        churn = self.rule.teacher_sampler == "sde"
        draws = draw_pd(B, S, C, self.substeps, cfg.objective, self.device, self.generator, churn)
        x = encode_batch(self.encoder, batch, draws.drop_condition, cfg.data.conditional)
        return distill_loss(
            self.forward_model,
            self.teacher,
            x,
            batch["input_ids"],
            batch["cond_seq_mask"],
            batch["loss_mask"],
            draws,
            cfg.objective,
            self.span,
            cfg.model.t_eps,
            denominator=denominator,
            rule=self.rule,
            target_net=self.target_network(),
        )

    def target_network(self):
        """The consistency target's network: the student's EMA weights (saved and restored
        with the training state, so resume stays exact) or, None, the student itself."""
        if self.rule.target != "consistency" or self.rule.target_network != "ema":
            return None
        return EMANetwork(self.raw_model, self.ema.shadow)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def previous_round_weights(run_dir: Path, k: int, n_rows: int) -> dict[str, torch.Tensor]:
    """The EMA weights of round k-1's final checkpoint (which must be finished)."""
    from safetensors.torch import load_file

    previous = round_dir(Path(run_dir).parent, k - 1)
    checkpoints = list_step_dirs(previous / "checkpoints")
    if not checkpoints or not (previous / "config.yaml").is_file():
        raise UserError(f"Round {k} starts from round {k - 1}, but {previous} holds no checkpoint.")
    newest = checkpoints[-1]
    fix = f"run round {k - 1} again (elfctl distill --round {k - 1} --resume never)."
    previous_cfg = read_config_state(previous / "config.yaml", fix)
    step = int(newest.name.split("_")[1])
    needed = total_steps(previous_cfg, n_rows)
    if step < needed:
        raise UserError(
            f"Round {k - 1} in {previous} is not finished (step {step} of {needed}); "
            f"run round {k - 1} first."
        )
    with records.reading_state(newest / WEIGHTS_FILE, fix):
        return load_file(str(newest / WEIGHTS_FILE))


# ---------------------------------------------------------------------------
# The curriculum


@dataclass
class RoundResult:
    round: int
    span: float
    substeps: int
    run_dir: Path
    step: int
    total_steps: int
    skipped: bool  # already finished before this call
    result: TrainResult | None


def distill(
    cfg: Config,
    run_dir: str | Path,
    rounds: list[int] | None = None,
    *,
    accelerator=None,
    resume: str = "auto",
    on_step: Callable[[StepReport], None] | None = None,
    run_round: Callable[[DistillTrainer], TrainResult] | None = None,
    log_with: list[str] | None = None,
) -> list[RoundResult]:
    """Run (or resume) rounds of the curriculum in order; the entry point behind
    `elfctl distill`. Finished rounds are skipped; a round that stops early (time budget)
    ends the call, so the next call resumes in that round. `run_round` replaces
    `trainer.fit(on_step)` (the CLI wraps it in a progress bar); `log_with` names Accelerate
    trackers, one tracker run per round (elfctl/tracking.py)."""
    check_distill_config(cfg)
    accelerator = accelerator or make_accelerator(gpu_precision=cfg.train.gpu_precision)
    rounds = rounds or list(range(1, len(cfg.distill.spans) + 1))
    results = []
    for k in rounds:
        trainer = DistillTrainer(
            round_config(cfg, k),
            round_dir(run_dir, k),
            accelerator,
            resume,
            log_with=log_with or (),
        )
        common = (k, trainer.span, trainer.substeps, trainer.run_dir)
        if trainer.finished:
            results.append(RoundResult(*common, trainer.step, trainer.total_steps, True, None))
            continue
        result = run_round(trainer) if run_round else trainer.fit(on_step)
        results.append(RoundResult(*common, result.step, trainer.total_steps, False, result))
        del trainer
        if result.step < results[-1].total_steps:
            break  # out of time: the next call resumes this round
    return results
