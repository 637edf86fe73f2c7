"""Sampling (docs/method.md section 5): ODE/SDE loops, guidance, the final decode.

The step loop has no host synchronisation: the time grid lives on the device,
every per-step quantity is a tensor op, and nothing is read back until the
tokens are decoded after the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from elfctl.model import flow
from elfctl.sampling import solvers
from elfctl.sampling.conditions import Condition
from elfctl.sampling.live_rows import LiveRows
from elfctl.sampling.prompting import (
    DEFAULT_ENCODING,
    DEFAULT_HOLD,
    check_fits,
    known_tokens,
    layouts_for,
)
from elfctl.sampling.random_streams import BatchStream, SampleStreams
from elfctl.sampling.trajectory import TrajectoryRecorder


@dataclass
class SamplerSettings:
    steps: int = 32
    method: str = "sde"  # a name in solvers.SOLVERS ("ode", "sde": the official ones)
    gamma: float = 1.5
    sc_cfg: float = 3.0
    cfg: float = 1.0
    time_schedule: str = "logit_normal"
    noise_scale: float = 2.0
    p_mean: float = -1.5
    p_std: float = 0.8


def setting_kwargs(setting) -> dict:
    """The sampler arguments of a `config.SamplingSetting`, as keyword arguments of generate()."""
    return {
        "steps": setting.steps,
        "method": setting.method,
        "gamma": setting.gamma,
        "sc_cfg": setting.sc_cfg,
        "cfg": setting.cfg,
        "time_schedule": setting.time_schedule,
        "noise_scale": setting.noise_scale,
    }


@dataclass
class Generation:
    tokens: list[list[int]]  # per sample, eos and everything after it removed
    texts: list[str]
    # per sample, with trajectory=K: {"steps", "t", "tokens", "texts"} of each recorded step
    trajectories: list[dict] | None = None


@dataclass
class BatchSamples:
    """One batch's output ids, and its trajectories when they were recorded."""

    tokens: list[list[int]]  # per row; [] for a row that left
    trajectories: list[dict] | None = None  # per row {"steps", "t", "tokens"}
    left: list[int] = field(default_factory=list)  # rows that left before the end


def autocast_context(device: torch.device, precision: str | None):
    """bf16 autocast where supported ("auto": on CUDA with bf16, fp32 elsewhere)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision in (None, "fp32", "no"):
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def denoise(
    model,
    z: torch.Tensor,
    x_prev: torch.Tensor,
    t: torch.Tensor,
    sc_scale: torch.Tensor,
    cfg_scale: float,
    condition: Condition | None,
    t_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One model evaluation -> (x_hat, v), with CFG folded in as ONE batched forward.

    z, x_prev (B, S, C); t, sc_scale (B,). Condition positions come back as
    x_hat = condition, v = 0.
    """
    inputs = torch.cat([z, x_prev], dim=-1) if model.cfg.self_cond else z
    guided = condition is not None and cfg_scale != 1.0
    if guided:
        # The unconditional branch sees zeros at the condition positions of z and x_prev.
        keep = (~condition.mask)[..., None].to(inputs.dtype)
        inputs = torch.cat([inputs, inputs * keep])
        z_both = torch.cat([z, z * keep])
        t, sc_scale = t.repeat(2), sc_scale.repeat(2)
    else:
        z_both = z
    x_hat, _ = model(inputs, t, sc_scale=sc_scale, decode=False)
    v = flow.velocity(x_hat, z_both, t, t_eps)
    if guided:
        x_c, x_u = x_hat.chunk(2)
        v_c, v_u = v.chunk(2)
        x_hat = x_u + cfg_scale * (x_c - x_u)
        v = v_u + cfg_scale * (v_c - v_u)
    if condition is not None:
        mask = condition.mask[..., None]
        x_hat = torch.where(mask, condition.latents, x_hat)
        v = v.masked_fill(mask, 0.0)
    return x_hat, v


def restore(z: torch.Tensor, condition: Condition | None) -> torch.Tensor:
    if condition is None:
        return z
    return torch.where(condition.mask[..., None], condition.latents, z)


@torch.no_grad()
def sample_latents(
    model,
    settings: SamplerSettings,
    noise: torch.Tensor,
    generator: torch.Generator | SampleStreams | None = None,
    condition: Condition | None = None,
    known=None,
    recorder: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    forwards: list[int] | None = None,
    live: LiveRows | None = None,
) -> torch.Tensor:
    """Integrate from z = s * noise at t = 0 to t = 1; returns the final z (B, S, C).

    All steps but the last use the chosen method (`solvers.SOLVERS`); the last is always
    an ODE (Euler) step.
    `generator` is where the time grid and the churn noise come from: a
    `streams.SampleStreams` (each sample its own stream, so its own grid), or one
    torch.Generator for the whole batch (the official port's draws: one grid per batch).
    `known` (a `prompting.KnownTokens`) holds known tokens wherever z or x_hat is set;
    `recorder(step, t, x_hat)` is called after every step with the step's last prediction
    and its time (see `trajectory`); `forwards`, a list, gets the forwards the loop made.
    `live` (per-sample streams only) drops rows no longer wanted before each step; the
    result then holds the rows of `live.rows`, and the recorder sees those rows only.
    """
    device, B = noise.device, noise.shape[0]
    s, t_eps = settings.noise_scale, model.cfg.t_eps
    rule = solvers.solver(settings.method)
    draws = generator if isinstance(generator, SampleStreams) else BatchStream(generator, B, device)
    if live is not None and not isinstance(draws, SampleStreams):
        raise ValueError("rows can leave a batch only when each row has its own stream")
    grids = draws.time_grids(
        settings.steps, settings.time_schedule, settings.p_mean, settings.p_std
    )
    times = grids.T.contiguous()  # (N+1, B): times[i] is step i's time of every row
    sc_scale = torch.full((B,), float(settings.sc_cfg), device=device)

    def hold(z, t):
        z = restore(z, condition)
        return z if known is None else known.apply(z, t, noise, s)

    def evaluate(z, x_prev, t):
        x_hat, v = denoise(model, z, x_prev, t, sc_scale, settings.cfg, condition, t_eps)
        return (x_hat, v) if known is None else (known.x_hat(x_hat), v)

    def churn(z, t, t_next):
        eps = draws.normal(z.shape[1:])
        z, t_back = flow.sde_back(z, t, t_next, settings.gamma, s, eps)
        return hold(z, t_back), t_back

    stepper = solvers.Stepper(evaluate, hold, churn, t_eps, s)
    x_prev = restore(torch.zeros_like(noise), condition)
    x_prev = x_prev if known is None else known.x_hat(x_prev)
    state = solvers.State(hold(s * noise, times[0]), x_prev)
    for i in range(settings.steps):
        keep = live.update() if live is not None else None
        if keep is not None:
            # The closures above read these names when called, so from here on every
            # forward, hold and churn is made for the rows that stay.
            index = torch.tensor(keep, device=device, dtype=torch.long)
            noise, sc_scale, times = noise[index], sc_scale[index], times[:, index]
            condition = condition.select(index) if condition is not None else None
            known = known.select(index) if known is not None else None
            draws = draws.select(keep)
            t_prev = state.t_prev[index] if state.t_prev is not None else None
            state = solvers.State(state.z[index], state.x_prev[index], t_prev)
            if not keep:
                break  # every row left
        # Every step but the last uses the chosen rule; the last is always one Euler step.
        step = rule.step if i < settings.steps - 1 else solvers.euler
        state = step(stepper, state, times[i], times[i + 1])
        if recorder is not None:
            recorder(i, state.t_prev, state.x_prev)
    if forwards is not None:
        forwards.append(stepper.forwards)
    return state.z


@torch.no_grad()
def decode(model, z: torch.Tensor, sc_cfg: float) -> torch.Tensor:
    """Decode once at t = 1 from input [z, 0] with the decode gate on: (B, S) token ids."""
    B = z.shape[0]
    inputs = torch.cat([z, torch.zeros_like(z)], dim=-1) if model.cfg.self_cond else z
    ones = torch.ones(B, device=z.device)
    _, logits = model(inputs, ones, sc_scale=ones * sc_cfg, decode=True)
    return logits.argmax(dim=-1)


def mask_after_eos(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Everything from the first eos on (the eos included) becomes pad."""
    after = (tokens == eos_id).cumsum(dim=-1) > 0
    return tokens.masked_fill(after, pad_id)


def shift_condition(tokens: torch.Tensor, condition: Condition, pad_id: int) -> torch.Tensor:
    """Drop each row's condition prefix; keep max_length - max_input_length target tokens."""
    S = tokens.shape[1]
    out_len = S - condition.max_input_length
    index = condition.lengths[:, None] + torch.arange(out_len, device=tokens.device)[None, :]
    shifted = tokens.gather(1, index.clamp_max(S - 1))
    return shifted.masked_fill(index >= S, pad_id)


def strip_pad(row: list[int], pad_id: int) -> list[int]:
    while row and row[-1] == pad_id:
        row.pop()
    return row


def generate(
    model,
    tokenizer,
    *,
    steps: int = 32,
    method: str = "sde",
    gamma: float = 1.5,
    sc_cfg: float = 3.0,
    cfg: float = 1.0,
    time_schedule: str = "logit_normal",
    num_samples: int = 16,
    length: int = 128,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    condition: Condition | None = None,
    noise_scale: float = 2.0,
    batch_size: int | None = None,
    precision: str | None = "auto",
    compile: bool = False,
    on_batch: Callable[[int], None] | None = None,
    grid: str = "per-sample",
    first_id: int = 0,
    prompt: str | Sequence[str] | None = None,
    infill: str | Sequence[str] | None = None,
    encoder=None,
    hold: str | None = None,
    known_encoding: str | None = None,
    known=None,
    trajectory: int = 0,
) -> Generation:
    """Sample `num_samples` texts, ids first_id, first_id + 1, ...

    Sample i's randomness is its own stream keyed by (seed, i) (`streams.py`), so the
    samples do not depend on `batch_size`; `grid="per-batch"` shares one time grid per
    batch as the official port does (keyed by the batch's first id). An explicit `noise`
    (B, S, C) fixes the start exactly. With a condition, `num_samples` and `length` come
    from it and outputs are the target part only.

    `prompt` (a text, or one per sample, cycled) fixes each sample's first tokens;
    `infill` (templates with `[gap:N]`) fixes tokens around gaps. Both need the frozen
    `encoder` for the known tokens' clean latents; `hold` and `known_encoding` choose how
    they are held and encoded (see `prompting`). `known` passes ready `KnownTokens` for
    all samples instead (e.g. built with `prompting.known_tokens(..., sources=...)` for a
    conditional model). `trajectory=K` also decodes x_hat at K evenly spaced steps.
    """
    device = next(model.parameters()).device
    settings = SamplerSettings(steps, method, gamma, sc_cfg, cfg, time_schedule, noise_scale)
    if noise is not None:
        num_samples, length = noise.shape[0], noise.shape[1]
    if condition is not None:
        num_samples, length = condition.latents.shape[0], condition.latents.shape[1]
    batch_size = batch_size or num_samples
    net = torch.compile(model) if compile else model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1

    layouts = _prompt_layouts(tokenizer, prompt, infill, condition, known, encoder, length)
    all_tokens: list[list[int]] = []
    trajectories: list[dict] | None = [] if trajectory else None
    for start in range(0, num_samples, batch_size):
        end = min(start + batch_size, num_samples)
        ids = range(first_id + start, first_id + end)
        eps = None if noise is None else noise[start:end].to(device=device, dtype=torch.float32)
        cond = _slice_condition(condition, start, end, device)
        held = known.slice(start, end, device) if known is not None else None
        if layouts:
            rows = [layouts[i % len(layouts)] for i in range(start, end)]
            held = known_tokens(
                encoder,
                tokenizer,
                rows,
                length,
                device=device,
                **_known_options(hold, known_encoding),
            )
        out = sample_batch(
            net,
            settings,
            ids,
            seed,
            length,
            cond,
            grid,
            precision,
            eps,
            pad_id,
            eos_id,
            known=held,
            trajectory=trajectory,
        )
        all_tokens.extend(out.tokens)
        if trajectories is not None:
            trajectories.extend(out.trajectories)
        if on_batch is not None:
            on_batch(end - start)
    for record in trajectories or []:
        record["texts"] = detokenize(tokenizer, record["tokens"])
    texts = detokenize(tokenizer, all_tokens)
    return Generation(tokens=all_tokens, texts=texts, trajectories=trajectories)


def _known_options(hold: str | None, encoding: str | None) -> dict:

    return {"hold": hold or DEFAULT_HOLD, "encoding": encoding or DEFAULT_ENCODING}


def _prompt_layouts(tokenizer, prompt, infill, condition, known, encoder, length) -> list:
    """The parsed prompts or templates of a generate() call (checked to fit), or []."""
    if prompt is None and infill is None:
        return []

    if known is not None:
        raise ValueError("give prompt/infill or known, not both")
    if condition is not None:
        raise ValueError(
            "prompting a conditional model needs the sources: pass "
            "known=prompting.known_tokens(..., sources=...)"
        )
    if encoder is None:
        raise ValueError("prompt and infill need the frozen encoder (encoder=...)")
    as_list = [prompt] if isinstance(prompt, str) else prompt
    templates = [infill] if isinstance(infill, str) else infill
    layouts = layouts_for(tokenizer, as_list, templates)
    check_fits(layouts, length)
    return layouts


def sample_batch(
    net,
    settings: SamplerSettings,
    ids: Sequence[int],
    seed: int | Sequence[int],
    length: int,
    condition: Condition | None = None,
    grid: str = "per-sample",
    precision: str | None = "auto",
    noise: torch.Tensor | None = None,
    pad_id: int = 0,
    eos_id: int = 1,
    known=None,
    trajectory: int = 0,
    on_frame: Callable[[list[list[int]]], None] | None = None,
    wanted: Callable[[], Sequence[bool]] | None = None,
) -> BatchSamples:
    """The token ids of samples `ids` (one batch): sample_latents -> decode -> cut.

    Each row's noise, grid and churn come from its own stream (seed, id), `seed` being
    one seed or one per row; `noise` replaces the drawn initial noise. `known`
    (`prompting.KnownTokens`) holds known tokens and writes them back into the output;
    `trajectory=K` also decodes x_hat at K evenly spaced steps (one extra decode forward
    each), and `on_frame` receives each recorded step's output ids as soon as it is decoded
    (a host read per recorded step: for live streams). `wanted()`, asked before every
    step, says which rows are still wanted (`live_rows`): the others stop being sampled,
    and come back empty.
    """
    device = next(net.parameters()).device
    streams = SampleStreams(seed, ids, device, grid)
    eps = streams.normal((length, net.cfg.latent_dim))  # drawn even if replaced: same streams
    if noise is not None:
        eps = noise

    def cut(tokens: torch.Tensor) -> list[list[int]]:
        """Decoded ids (B, S) -> each sample's output ids (known tokens kept)."""
        if known is not None:
            tokens = known.finish(tokens, eos_id, pad_id)
        if condition is not None:
            tokens = shift_condition(tokens, condition, pad_id)
        tokens = mask_after_eos(tokens, eos_id, pad_id)
        return [strip_pad(row, pad_id) for row in tokens.tolist()]

    live = LiveRows(wanted, len(ids)) if wanted is not None else None

    def decode_rows(z: torch.Tensor) -> torch.Tensor:
        """(B, S) ids of every row from the live rows' z: pad where a row left."""
        if live is None:
            return decode(net, z, settings.sc_cfg)
        if not live.rows:
            return torch.full((live.batch, length), pad_id, device=device, dtype=torch.long)
        return live.expand(decode(net, z, settings.sc_cfg), pad_id)

    def decode_frame(x_hat: torch.Tensor) -> torch.Tensor:
        tokens = decode_rows(x_hat)
        if on_frame is not None:
            on_frame(cut(tokens))
        return tokens

    recorder = (
        TrajectoryRecorder(settings.steps, trajectory, decode_frame, live) if trajectory else None
    )
    with autocast_context(device, precision):
        z = sample_latents(net, settings, eps, streams, condition, known, recorder, live=live)
        tokens = decode_rows(z)

    left = live.left if live is not None else []
    outputs = cut(tokens)
    for row in left:
        outputs[row] = []
    if recorder is None:
        return BatchSamples(outputs, left=left)
    times, frames = recorder.frames()  # (K', B) times, (K', B, S) ids; K' < K if all left
    per_step = [cut(frame) for frame in frames]
    steps = [i + 1 for i in recorder.steps[: len(per_step)]]
    trajectories = [
        {
            "steps": steps,
            "t": [row_times[b] for row_times in times],
            "tokens": [step_rows[b] for step_rows in per_step],
        }
        for b in range(len(ids))
    ]
    return BatchSamples(outputs, trajectories, left)


def detokenize(tokenizer, tokens: list[list[int]]) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def _slice_condition(condition: Condition | None, start: int, end: int, device):
    if condition is None:
        return None
    return Condition(
        latents=condition.latents[start:end].to(device),
        mask=condition.mask[start:end].to(device),
        lengths=condition.lengths[start:end].to(device),
        max_input_length=condition.max_input_length,
    )
