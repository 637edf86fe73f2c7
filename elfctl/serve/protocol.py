"""OpenAI's completion request, checked, and the shapes of its answers (docs/serving.md).

`parse_request` turns a decoded JSON body into a `CompletionRequest` or raises
`RequestError`: one sentence naming the field, sent back as OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. Every field OpenAI defines for
`/v1/completions` is known here: the ones ELF can honour are honoured, the sampling knobs
that mean nothing to a flow model are accepted and ignored (so existing clients work), and
the ones that need a token likelihood, which ELF does not have, are refused by name. A
field OpenAI does not define, other than the ELF extensions, is refused.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from elfctl.sampling import SAMPLER_NAMES

# Accepted so that existing clients work; they mean nothing to a flow model.
IGNORED = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "logit_bias",
    "stream_options",
)
HONOURED = ("model", "prompt", "n", "max_tokens", "seed", "stream", "stop")
# ELF has no tractable token likelihood: these cannot be answered.
NEEDS_LIKELIHOOD = ("logprobs", "echo", "best_of")
NOT_SUPPORTED = ("suffix",)
ELF_EXTENSIONS = ("steps", "sampler", "gamma", "sc_cfg", "cfg", "infill", "condition")
KNOWN = set(IGNORED + HONOURED + NEEDS_LIKELIHOOD + NOT_SUPPORTED + ELF_EXTENSIONS)
MAX_SEED = 2**63 - 1
MAX_STOPS = 16  # OpenAI takes 4; lm-eval may send more, and more cost nothing


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, one sentence, the field at fault."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = (
            message,
            param,
            status,
            kind,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.param, self.kind, self.code)


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code=None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What this server's model and flags allow."""

    model_id: str
    max_tokens: int  # the model's sequence length (the output budget for a conditional model)
    default_tokens: int  # max_tokens when a request leaves it out
    max_rows: int  # n x prompts per request (the server's --max-batch)
    conditional: bool
    max_steps: int = 1024


@dataclass(frozen=True)
class Sampling:
    """The sampler settings of a request; requests batch together only when these match."""

    steps: int
    method: str
    gamma: float
    sc_cfg: float
    cfg: float


@dataclass
class CompletionRequest:
    prompts: list[str]  # prefix prompts ([]: none)
    templates: list[str]  # infill templates ([]: none)
    n: int
    max_tokens: int
    seed: int
    seed_given: bool
    stream: bool
    stop: list[str]
    sampling: Sampling
    condition: str | None = None
    ignored: list[str] = field(default_factory=list)

    @property
    def given(self) -> list[str]:
        return self.prompts or self.templates

    @property
    def rows(self) -> int:
        return self.n * max(1, len(self.given))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int, low: int, high: int, limit_note: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"'{name}' must be an integer, got {value!r}.", name)
    if not low <= value <= high:
        raise RequestError(
            f"'{name}' must be between {low} and {high}{limit_note}, got {value}.", name
        )
    return value


def _number(body: dict, name: str, default: float, low: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or value != value or value in (float("inf"), float("-inf")):
        raise RequestError(f"'{name}' must be a finite number, got {value!r}.", name)
    if low is not None and value < low:
        raise RequestError(f"'{name}' must be at least {low}, got {value}.", name)
    return float(value)


def _texts(body: dict, name: str) -> list[str]:
    """A string or a non-empty list of non-empty strings; "" and absent mean none."""
    value = body.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(
            f"'{name}' must be a string or a list of strings (token ids are not accepted).", name
        )
    for i, text in enumerate(value):
        if not text.strip():
            raise RequestError(f"'{name}[{i}]' is empty.", name)
    return list(value)


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them.", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' takes at most {MAX_STOPS} sequences.", "stop")
    return stops


def _refuse_unanswerable(body: dict) -> None:
    for name in NEEDS_LIKELIHOOD:
        value = body.get(name)
        if value in (None, False) or (name == "best_of" and value == 1):
            continue
        raise RequestError(
            f"'{name}' is not supported: ELF has no tractable token likelihood.", name
        )
    if body.get("suffix") not in (None, ""):
        raise RequestError(
            "'suffix' is not supported; write the text around a gap as 'infill', e.g. "
            "'the dog [gap:4] the cat .'.",
            "suffix",
        )


def _check_ignored(body: dict) -> list[str]:
    """The ignored knobs a request set; they must still have sensible types."""
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if body.get(name) is not None:
            _number(body, name, 0.0)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string.", "user")
    for name in ("logit_bias", "stream_options"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise RequestError(f"'{name}' must be an object.", name)
    return [name for name in IGNORED if body.get(name) is not None]


def _sampling(body: dict, defaults: Sampling, limits: Limits) -> Sampling:
    method = body.get("sampler", defaults.method)
    if method not in SAMPLER_NAMES:
        raise RequestError(
            f"'sampler' must be one of {', '.join(SAMPLER_NAMES)}, got {method!r}.", "sampler"
        )
    return Sampling(
        steps=_int(body, "steps", defaults.steps, 1, limits.max_steps),
        method=method,
        gamma=_number(body, "gamma", defaults.gamma, low=0.0),
        sc_cfg=_number(body, "sc_cfg", defaults.sc_cfg),
        cfg=_number(body, "cfg", defaults.cfg),
    )


def parse_request(body, limits: Limits, defaults: Sampling) -> CompletionRequest:
    """A decoded JSON body -> CompletionRequest; RequestError names the first problem."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise RequestError(
            f"Unknown field '{unknown[0]}': /v1/completions takes OpenAI's completion fields "
            f"and the ELF extensions {', '.join(ELF_EXTENSIONS)}.",
            unknown[0],
        )
    model = body.get("model")
    if model is not None and model != limits.model_id:
        raise RequestError(
            f"The model {model!r} is not served here; this server serves {limits.model_id!r}.",
            "model",
            status=404,
            code="model_not_found",
        )
    _refuse_unanswerable(body)
    ignored = _check_ignored(body)
    prompts, templates = _texts(body, "prompt"), _texts(body, "infill")
    if prompts and templates:
        raise RequestError("Give 'prompt' or 'infill', not both.", "infill")
    n = _int(body, "n", 1, 1, limits.max_rows, " (this server's --max-batch)")
    rows = n * max(1, len(prompts or templates))
    if rows > limits.max_rows:
        raise RequestError(
            f"n x the number of prompts is {rows}, over this server's limit of "
            f"{limits.max_rows} rows per request (its --max-batch).",
            "n",
        )
    what = "output budget" if limits.conditional else "sequence length"
    max_tokens = _int(
        body,
        "max_tokens",
        limits.default_tokens,
        1,
        limits.max_tokens,
        f" (the model's {what})",
    )
    seed_given = body.get("seed") is not None
    seed = _int(body, "seed", secrets.randbits(31), 0, MAX_SEED)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}.", "stream")
    condition = body.get("condition")
    if condition is not None:
        if not limits.conditional:
            raise RequestError(
                "'condition' was given but the served model is not conditional.", "condition"
            )
        if not isinstance(condition, str) or not condition.strip():
            raise RequestError("'condition' must be a non-empty string (the source).", "condition")
    return CompletionRequest(
        prompts=prompts,
        templates=templates,
        n=n,
        max_tokens=max_tokens,
        seed=seed,
        seed_given=seed_given,
        stream=stream,
        stop=_stops(body),
        sampling=_sampling(body, defaults, limits),
        condition=condition,
        ignored=ignored,
    )


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first of the stop sequences, and whether one was found."""
    cuts = [text.find(s) for s in stops if s in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True


def completion_body(
    request_id: str, created: int, model_id: str, choices: list[dict], usage: dict, seed: int
) -> dict:
    """OpenAI's text_completion object (`seed`, the seed used, is ELF's addition)."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": choices,
        "usage": usage,
        "seed": seed,
    }


def choice(index: int, text: str, finish_reason: str | None, frame: dict | None = None) -> dict:
    """One entry of `choices`; a stream's frames carry the forming text in `elf`, not `text`,
    so a client that joins the chunks' `text` gets exactly the final text."""
    out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if frame is not None:
        out["elf"] = frame
    return out
