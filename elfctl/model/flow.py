"""Pure tensor maths of the flow: time draws and grids, noising, x <-> v, solver steps.

Time runs from t = 0 (pure noise) to t = 1 (clean data); `s` is the noise scale.
Nothing here knows about models, configs or devices beyond the tensors it gets.
"""

from __future__ import annotations

import torch


def logit_normal(shape, p_mean: float, p_std: float, generator=None, device=None) -> torch.Tensor:
    """sigmoid(N(p_mean, p_std)) draws."""
    normal = torch.randn(shape, generator=generator, device=device)
    return torch.sigmoid(normal * p_std + p_mean)


def sample_time(
    shape, schedule: str, p_mean: float, p_std: float, generator=None, device=None
) -> torch.Tensor:
    """Training time draws: logit-normal (the official default) or uniform."""
    if schedule == "logit_normal":
        return logit_normal(shape, p_mean, p_std, generator, device)
    if schedule == "uniform":
        return torch.rand(shape, generator=generator, device=device)
    raise ValueError(f"unknown time schedule {schedule!r}")


def time_grid(
    steps: int,
    schedule: str,
    p_mean: float = -1.5,
    p_std: float = 0.8,
    generator=None,
    device=None,
) -> torch.Tensor:
    """N steps -> N+1 increasing times from 0 to 1.

    `uniform` is linspace; `logit_normal` is 0, N-1 sorted logit-normal draws, then 1
    (a fresh random grid each call).
    """
    if not is_random_schedule(schedule):
        return deterministic_grid(steps, schedule, p_mean, p_std, device)
    if schedule == "logit_normal":
        inner = logit_normal((steps - 1,), p_mean, p_std, generator, device).sort().values
        ends = torch.tensor([0.0, 1.0], device=device)
        return torch.cat([ends[:1], inner, ends[1:]])
    raise ValueError(f"unknown time schedule {schedule!r}")


# Deterministic sampling grids (docs/solvers.md), beside the official random ones. Names
# may carry parameters after colons: "quantile:MEAN:STD", "karras:RHO".
DETERMINISTIC_GRIDS = ("uniform", "quantile", "karras")
RANDOM_GRIDS = ("logit_normal",)
KARRAS_SIGMAS = (0.002, 80.0)  # EDM's sigma_min, sigma_max, in units of the noise-to-signal ratio


def parse_schedule(name: str) -> tuple[str, tuple[float, ...]]:
    """'quantile:-1:0.9' -> ('quantile', (-1.0, 0.9)); ValueError naming what is wrong."""
    kind, *params = name.split(":")
    if kind not in DETERMINISTIC_GRIDS + RANDOM_GRIDS:
        known = ", ".join(DETERMINISTIC_GRIDS + RANDOM_GRIDS)
        raise ValueError(f"unknown time schedule {name!r}; expected one of {known}")
    allowed = {"quantile": 2, "karras": 1}.get(kind, 0)
    if len(params) not in (0, allowed):
        raise ValueError(
            f"time schedule {name!r}: {kind} takes {allowed} parameters, not {len(params)}"
        )
    try:
        values = tuple(float(p) for p in params)
    except ValueError:
        raise ValueError(f"time schedule {name!r}: its parameters must be numbers") from None
    if kind == "quantile" and values and values[1] <= 0:
        raise ValueError(f"time schedule {name!r}: the quantile grid's STD must be positive")
    if kind == "karras" and values and values[0] <= 0:
        raise ValueError(f"time schedule {name!r}: the karras grid's RHO must be positive")
    return kind, values


def is_random_schedule(name: str) -> bool:
    """Whether a schedule draws its grid (and so takes normals from the random streams)."""
    return parse_schedule(name)[0] in RANDOM_GRIDS


def deterministic_grid(
    steps: int, schedule: str, p_mean: float = -1.5, p_std: float = 0.8, device=None
) -> torch.Tensor:
    """N steps -> the N+1 times of a deterministic grid, from 0 to 1.

    uniform         linspace.
    quantile        0, the i/N quantiles (i = 1..N-1) of the logit-normal(MEAN, STD) law,
                    then 1: the official random grid's law without its randomness
                    (MEAN, STD default to the training p_mean, p_std).
    karras          0, EDM's rho grid (rho 7 unless given) of sigma = (1 - t) / t (the
                    noise coefficient over the data coefficient, noise scale left out)
                    from 80 down to 0.002, mapped back by t = 1 / (1 + sigma), then 1.
    """
    kind, params = parse_schedule(schedule)
    if kind == "uniform":
        return torch.linspace(0.0, 1.0, steps + 1, device=device)
    if kind == "quantile":
        mean, std = params or (p_mean, p_std)
        q = torch.arange(1, steps, dtype=torch.float64) / steps
        normal = torch.distributions.Normal(0.0, 1.0).icdf(q)
        inner = torch.sigmoid(normal * std + mean)
    elif kind == "karras":
        rho = params[0] if params else 7.0
        lo, hi = (v ** (1 / rho) for v in KARRAS_SIGMAS)
        ramp = torch.linspace(0.0, 1.0, steps - 1, dtype=torch.float64) if steps > 2 else None
        ramp = ramp if ramp is not None else torch.full((steps - 1,), 0.5, dtype=torch.float64)
        sigma = (hi + ramp * (lo - hi)) ** rho
        inner = 1 / (1 + sigma)
    else:
        raise ValueError(f"{schedule!r} is not a deterministic time schedule")
    ends = torch.tensor([0.0], dtype=torch.float64)
    grid = torch.cat([ends, inner, ends + 1.0])
    return grid.to(device=device, dtype=torch.get_default_dtype())


def time_grids(
    steps: int,
    schedule: str,
    inner_draws: torch.Tensor | None,
    p_mean: float = -1.5,
    p_std: float = 0.8,
    device=None,
    rows: int = 1,
) -> torch.Tensor:
    """One N-step grid per row: (rows, N+1), each increasing from 0 to 1.

    `inner_draws` (rows, N-1) are standard normals: row r's logit-normal grid is 0, the
    sorted sigmoid(p_mean + p_std * draws[r]), then 1 (what `time_grid` draws, one per
    row). `uniform` ignores them: every row is linspace.
    """
    if not is_random_schedule(schedule):
        grid = deterministic_grid(steps, schedule, p_mean, p_std, device)
        return grid.expand(rows, -1).contiguous()
    inner = torch.sigmoid(inner_draws * p_std + p_mean).sort(dim=-1).values
    zeros = torch.zeros(inner.shape[0], 1, device=inner.device)
    return torch.cat([zeros, inner, zeros + 1.0], dim=-1)


def add_noise(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
    """z_t = t x + (1 - t) s eps, with t broadcast per row: (B,) against (B, S, C)."""
    t = _rows(t, x)
    return t * x + (1 - t) * s * eps


def velocity(x_hat: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """v = (x_hat - z) / max(1 - t, t_eps): the velocity implied by an x-prediction."""
    return (x_hat - z) / velocity_scale(t, z, t_eps)


def velocity_scale(t: torch.Tensor, like: torch.Tensor, t_eps: float) -> torch.Tensor:
    """max(1 - t, t_eps), shaped to broadcast against `like`: v's denominator."""
    return (1 - _rows(t, like)).clamp_min(t_eps)


def ode_step(z: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """Euler: z <- z + (t_next - t) v; t, t_next scalars or one time per row (B,)."""
    return z + _rows(t_next - t, z) * v


def sde_back(
    z: torch.Tensor, t, t_next, gamma: float, s: float, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The churn half of an SDE step: go back in time by re-noising.

    h = t_next - t, alpha = clip(1 - gamma h, 0, 1), t_back = alpha t,
    z_back = alpha z + (1 - alpha) s eps. The caller then takes an Euler step from
    (z_back, t_back) to t_next with the velocity evaluated at z_back. t, t_next are
    scalars or one time per row (B,) (per-sample time grids).
    """
    alpha = (1 - gamma * (t_next - t)).clamp(0.0, 1.0)
    a = _rows(alpha, z)
    return a * z + (1 - a) * s * eps, alpha * t


def log_uniform_shifted(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """SC-CFG scale draw: w = a (b/a)^u - 1 with a = 1 + lo, b = 1 + hi, u ~ U(0, 1)."""
    a, b = 1.0 + lo, 1.0 + hi
    return a * (b / a) ** u - 1.0


def _rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t) or t.dim() == 0:
        return t
    return t.reshape(-1, *([1] * (like.dim() - 1)))
