"""Step rules of the sampler: the official Euler / Euler-Maruyama steps and faster solvers.

The flow (docs/method.md section 5): z_t = t x + (1 - t) s eps runs from noise at t = 0 to
data at t = 1; the network predicts x_hat(z, t), and v = (x_hat - z) / max(1 - t, t_eps).
Every rule below moves one state (z, the self-condition x_prev = the last x_hat, and the
time that x_hat was predicted at) from t to t_next. The sampler uses the chosen rule for
every step but the last, which is always one Euler (ODE) step, then decodes once.

    ode        Euler. 1 forward a step.
    sde        churn gamma (back to t_back = alpha t with fresh noise), then Euler from
               t_back. 1 forward a step. The official unconditional sampler.
    heun       Heun's second-order rule: Euler to t_next, a second forward there, then the
               step with the mean of both velocities. 2 forwards a step.
    heun-sde   churn as `sde`, then Heun from t_back (EDM's stochastic sampler). 2 forwards.
    dpm2m      DPM-Solver++(2M) for x-prediction: the Euler step taken with the prediction
               extrapolated linearly in lambda = log(t / ((1 - t) s)) from the previous
               step's x_hat. 1 forward a step (it reuses the last one).
    dpm2m-sde  churn as `sde`, then the dpm2m step from t_back. 1 forward a step.

Why dpm2m is an Euler step with a corrected prediction: with data coefficient t and noise
coefficient (1 - t) s, DPM-Solver++'s first-order step from t to t' is
z' = ((1 - t') / (1 - t)) (z - t x_hat) + t' x_hat, which is exactly Euler's
z + (t' - t) (x_hat - z) / (1 - t). Its second-order (2M) step replaces x_hat by
D = x_hat + (h / (2 h_prev)) (x_hat - x_hat_prev), h = lambda(t') - lambda(t),
h_prev = lambda(t) - lambda(t_prev). (Above 1 - t_eps the velocity's clamp makes Euler
differ from DPM-Solver++; the rule keeps the clamp, as the official Euler step does.)

Each rule counts its forwards through `Stepper.evaluate`, so a step reports what it cost:
a CFG pair batched into one forward of twice the rows is one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from elfctl.errors import UserError
from elfctl.model import flow

Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Stepper:
    """What a step rule may do: evaluate the network, hold known positions, churn.

    evaluate(z, x_prev, t) -> (x_hat, v): one forward (CFG folded in), conditions and known
    tokens held in x_hat and v. hold(z, t): z with conditions and known tokens put back.
    churn(z, t, t_next) -> (z_back, t_back): the official SDE's re-noising, noise drawn
    from the samples' streams, held.
    """

    evaluate_fn: Evaluate
    hold: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    churn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    t_eps: float
    noise_scale: float
    forwards: int = 0

    def evaluate(self, z, x_prev, t):
        self.forwards += 1
        return self.evaluate_fn(z, x_prev, t)


@dataclass
class State:
    """Between steps: z, the last prediction (the self-condition) and the time it was made
    at (None before the first forward)."""

    z: torch.Tensor
    x_prev: torch.Tensor
    t_prev: torch.Tensor | None = None


StepRule = Callable[[Stepper, State, torch.Tensor, torch.Tensor], State]


def euler(s: Stepper, state: State, t, t_next) -> State:
    x_hat, v = s.evaluate(state.z, state.x_prev, t)
    z = s.hold(flow.ode_step(state.z, v, t, t_next), t_next)
    return State(z, x_hat, t)


def heun(s: Stepper, state: State, t, t_next) -> State:
    x1, v1 = s.evaluate(state.z, state.x_prev, t)
    z1 = s.hold(flow.ode_step(state.z, v1, t, t_next), t_next)
    x2, v2 = s.evaluate(z1, x1, t_next)
    z = s.hold(flow.ode_step(state.z, (v1 + v2) / 2, t, t_next), t_next)
    return State(z, x2, t_next)


def lam(t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log(t / (1 - t)), the log signal-to-noise ratio up to log s (which
    cancels in every difference the solver takes)."""
    return torch.log(t) - torch.log1p(-t)


def dpm2m(s: Stepper, state: State, t, t_next) -> State:
    x_hat, v = s.evaluate(state.z, state.x_prev, t)
    if state.t_prev is not None:
        h = lam(t_next) - lam(t)
        h_prev = lam(t) - lam(state.t_prev)
        # First order where there is no usable previous point: a previous time of 0
        # (lambda = -inf), one not before t (possible after a churn), or t_next = 1.
        usable = (state.t_prev > 0) & (h_prev > 0) & (t_next < 1)
        ratio = torch.where(usable, h / torch.where(usable, 2 * h_prev, 1.0), 0.0)
        ratio = ratio.reshape(-1, *([1] * (x_hat.dim() - 1)))
        # D - x_hat = ratio (x_hat - x_prev); condition and known positions have x_hat =
        # x_prev, so their v stays as evaluate() held it.
        v = v + ratio * (x_hat - state.x_prev) / flow.velocity_scale(t, x_hat, s.t_eps)
    z = s.hold(flow.ode_step(state.z, v, t, t_next), t_next)
    return State(z, x_hat, t)


def churned(rule: StepRule) -> StepRule:
    """The rule taken after the official SDE's churn (back to t_back with fresh noise)."""

    def step(s: Stepper, state: State, t, t_next) -> State:
        z, t_back = s.churn(state.z, t, t_next)
        return rule(s, replace(state, z=z), t_back, t_next)

    return step


@dataclass(frozen=True)
class Solver:
    name: str
    step: StepRule
    forwards_per_step: int  # forwards of one step (every step but the last)
    churn: bool  # uses gamma and draws one churn noise per step but the last
    summary: str

    def forwards(self, steps: int) -> int:
        """Sampling forwards of `steps` steps: the last is one Euler forward (no decode)."""
        return (steps - 1) * self.forwards_per_step + 1

    def steps_for(self, budget: int) -> int:
        """The most steps whose forwards fit in `budget` (at least 1)."""
        return max(1, (budget - 1) // self.forwards_per_step + 1)


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver("ode", euler, 1, False, "Euler (official, conditional tasks)"),
        Solver("sde", churned(euler), 1, True, "churn + Euler (official, unconditional)"),
        Solver("heun", heun, 2, False, "Heun, second order"),
        Solver("heun-sde", churned(heun), 2, True, "churn + Heun (EDM stochastic sampler)"),
        Solver("dpm2m", dpm2m, 1, False, "DPM-Solver++(2M), second order multistep"),
        Solver("dpm2m-sde", churned(dpm2m), 1, True, "churn + DPM-Solver++(2M)"),
    )
}
SAMPLER_NAMES = tuple(SOLVERS)


def solver(name: str) -> Solver:
    """The registered solver; a UserError naming the choices for an unknown name."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise UserError(
            f"Unknown sampler '{name}'; choose one of {', '.join(SAMPLER_NAMES)}."
        ) from None


def check_sampler(name: str | None, option: str = "--sampler") -> None:
    """For the CLI: a UserError unless `name` is None or a registered sampler."""
    if name is not None and name not in SOLVERS:
        raise UserError(f"{option} must be one of {', '.join(SAMPLER_NAMES)}, got '{name}'.")


def check_schedule(name: str | None, option: str = "--time-schedule") -> None:
    """For the CLI: a UserError unless `name` is None or a time schedule flow can build."""
    if name is None:
        return
    try:
        flow.parse_schedule(name)
    except ValueError as e:
        raise UserError(f"{option}: {e}.") from None


def check_setting(method: str, time_schedule: str) -> None:
    """A UserError if a sampling setting (e.g. from a config file) names an unknown sampler
    or time schedule."""
    solver(method)
    check_schedule(time_schedule, "time_schedule")


def forwards_for(method: str, steps: int) -> int:
    """Sampling forwards per sample of `steps` steps of `method` (the decode not counted)."""
    return solver(method).forwards(steps)
