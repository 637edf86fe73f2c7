"""The served model: a batch of rows from several requests -> each request's texts.

A request's rows are the sample ids 0..rows-1 under the request's own seed, row i holding
prompt (or template) i mod their number: exactly what `elfctl sample --seed S --prompt ...
--num-samples rows` samples. Each row draws from its own random stream keyed by (its
request's seed, its id) (`sampling.random_streams`), and rows of a batch share nothing but
the forward passes, so a request's texts do not depend on what it was batched with.

Rows of different requests share a batch only when their sequence length, sampler
settings and conditioning match (`Job.key`). Rows without a prompt sit beside prompted
rows with an empty layout, which holds nothing: they sample exactly as without one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from elfctl.config import sampling_setting
from elfctl.errors import UserError
from elfctl.precision import sampling_precision
from elfctl.sampling import (
    Layout,
    SamplerSettings,
    check_fits,
    detokenize,
    encode_conditions,
    known_tokens,
    layouts_for,
    recorded_steps,
    sample_batch,
)
from elfctl.serve.protocol import (
    CompletionRequest,
    Limits,
    RequestError,
    Sampling,
    choice,
    cut_at_stop,
    parse_request,
)

NO_PROMPT = Layout((), "", "prompt")  # holds no position


@dataclass
class Job:
    """One request's rows, waiting for or in a batch.

    `deliver(kind, payload)` is called from the sampling thread: ("frame", (step, tokens)),
    ("done", tokens) or ("error", message), tokens being the rows' output ids in id order.
    """

    request: CompletionRequest
    layouts: list[Layout]
    length: int  # the sequence length the rows are sampled at
    deliver: Callable[[str, object], None]
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away: drop it, or free its rows mid-batch

    @property
    def rows(self) -> int:
        return self.request.rows

    @property
    def key(self) -> tuple:
        """Jobs batch together only when this matches."""
        return (self.length, self.request.sampling, self.request.condition is not None)

    def layout(self, row: int) -> Layout | None:
        return self.layouts[row % len(self.layouts)] if self.layouts else None


class Engine:
    """The model loaded once (`runs.load_for_sampling(..., for_prompting=True)`), its limits
    and defaults, and `sample`, which runs one batch of jobs."""

    def __init__(
        self,
        loaded,
        model_id: str,
        max_batch: int = 32,
        frames: int = 8,
        precision: str = "auto",
    ):
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.encoder, self.config = loaded.encoder, loaded.config
        self.model_id, self.frames = model_id, frames
        self.device = next(self.model.parameters()).device
        self.precision = sampling_precision(precision, self.config.train.gpu_precision, self.device)
        setting = sampling_setting(self.config)
        self.defaults = Sampling(
            setting.steps, setting.method, setting.gamma, setting.sc_cfg, setting.cfg
        )
        self.time_schedule, self.noise_scale = setting.time_schedule, setting.noise_scale
        data = self.config.data
        self.conditional = bool(data.conditional) and 0 < data.max_input_length < data.max_length
        budget = data.max_length - data.max_input_length if self.conditional else data.max_length
        self.limits = Limits(
            model_id=model_id,
            max_tokens=budget,
            default_tokens=budget if self.conditional else min(setting.length or budget, budget),
            max_rows=max_batch,
            conditional=self.conditional,
        )
        self.freed_rows = 0  # rows whose clients left while their batch was sampled
        self.pad_id = _or(self.tokenizer.pad_token_id, 0)
        self.eos_id = _or(self.tokenizer.eos_token_id, 1)

    # ------------------------------------------------------------------ requests

    def parse(self, body) -> CompletionRequest:
        return parse_request(body, self.limits, self.defaults)

    def job(self, request: CompletionRequest, deliver: Callable[[str, object], None]) -> Job:
        """The request's rows laid out; RequestError if a prompt or template is malformed
        or does not fit."""
        param = "infill" if request.templates else "prompt"
        try:
            layouts = layouts_for(self.tokenizer, request.prompts, request.templates)
            check_fits(layouts, request.max_tokens)
        except UserError as e:
            raise RequestError(str(e), param) from None
        conditional = request.condition is not None
        length = self.config.data.max_length if conditional else request.max_tokens
        return Job(request, layouts, length, deliver)

    # ------------------------------------------------------------------ sampling

    def sample(self, jobs: list[Job]) -> None:
        """Sample one batch (jobs of one key) and deliver each job its rows. A job whose
        client leaves (`Job.cancelled`) has its rows dropped before the next step; the
        batch goes on for the others."""
        rows = [(job, i) for job in jobs for i in range(job.rows)]
        first = jobs[0]
        s = first.request.sampling
        settings = SamplerSettings(
            s.steps, s.method, s.gamma, s.sc_cfg, s.cfg, self.time_schedule, self.noise_scale
        )
        condition, sources = self._condition([job.request.condition for job, _ in rows])
        layouts = [job.layout(i) for job, i in rows]
        known = None
        if any(layouts):
            data = self.config.data
            known = known_tokens(
                self.encoder,
                self.tokenizer,
                [layout or NO_PROMPT for layout in layouts],
                first.length,
                sources=sources,
                max_input_length=data.max_input_length,
                pad_token=data.pad_token,
                device=self.device,
            )
        streaming = any(job.request.stream for job in jobs)
        out = sample_batch(
            self.model,
            settings,
            [i for _, i in rows],
            [job.request.seed for job, _ in rows],
            first.length,
            condition,
            "per-sample",
            self.precision.sampling,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            known=known,
            trajectory=self.frames if streaming else 0,
            on_frame=self._frame_sink(jobs, s.steps) if streaming else None,
            wanted=lambda: [not job.cancelled for job, _ in rows],
        )
        self.freed_rows += len(out.left)
        for job, tokens in zip(jobs, _split(out.tokens, jobs), strict=True):
            job.deliver("done", tokens)

    def _condition(self, sources: list[str | None]):
        if sources[0] is None:
            return None, None
        data = self.config.data
        condition, _ = encode_conditions(
            self.encoder,
            self.tokenizer,
            sources,
            data.max_length,
            data.max_input_length,
            self.device,
            data.pad_token,
        )
        return condition, sources

    def _frame_sink(self, jobs: list[Job], steps: int) -> Callable[[list[list[int]]], None]:
        """Hands each recorded step's rows to the streaming jobs still listening."""
        numbers = iter(recorded_steps(steps, self.frames))

        def sink(tokens: list[list[int]]) -> None:
            step = next(numbers) + 1
            for job, part in zip(jobs, _split(tokens, jobs), strict=True):
                if job.request.stream and not job.cancelled:
                    job.deliver("frame", (step, part))

        return sink

    # ------------------------------------------------------------------ answers

    def choices(self, job: Job, tokens: list[list[int]], step: int | None = None) -> list[dict]:
        """OpenAI's choices (prompt p's j-th completion at index p * n + j) from the rows'
        ids; with `step`, a stream frame's (the forming text in `elf`)."""
        request = job.request
        given = max(1, len(job.layouts))
        out = []
        for index in range(given * request.n):
            p, j = divmod(index, request.n)
            row = j * given + p
            text, finish = self._text(job, row, tokens[row])
            if step is None:
                out.append(choice(index, text, finish))
            else:
                frame = {"step": step, "steps": request.sampling.steps, "text": text}
                out.append(choice(index, "", None, frame))
        return out

    def _text(self, job: Job, row: int, ids: list[int]) -> tuple[str, str]:
        """A row's completion (after its prompt; a filled template whole), its finish reason."""
        request = job.request
        ids = ids[: request.max_tokens]
        layout = job.layout(row)
        skip = layout.span if layout is not None and layout.kind == "prompt" else 0
        text, stopped = cut_at_stop(detokenize(self.tokenizer, [ids[skip:]])[0], request.stop)
        return text, "stop" if stopped or len(ids) < request.max_tokens else "length"

    def usage(self, job: Job, tokens: list[list[int]]) -> dict:
        """Known tokens count as the prompt (once per prompt, as OpenAI counts); the rest of
        every row as the completion."""
        known = [sum(t is not None for t in layout.ids) for layout in job.layouts]
        prompt = sum(known)
        completion = 0
        for row, ids in enumerate(tokens):
            held = known[row % len(known)] if known else 0
            completion += max(len(ids[: job.request.max_tokens]) - held, 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _split(tokens: list[list[int]], jobs: list[Job]) -> list[list[list[int]]]:
    out, start = [], 0
    for job in jobs:
        out.append(tokens[start : start + job.rows])
        start += job.rows
    return out


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
