"""What `elfctl sample` asks for, turned into a sample job.

`SampleRequest` holds the command's choices as given (None: not given). `check_request` refuses
what is wrong before anything loads or is written; `prepare_sample` loads the model, applies the
setting overrides, reads the conditional inputs, applies the default sample-count rule
and builds the `SampleJob`. The CLI then only parses, calls these, and prints.

The sample-count rule: --num-samples wins; else one prompt or template gets the setting's
number of samples and several get one sample each; with --input, one sample per input row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elfctl import records
from elfctl.config import SamplingSetting, sampling_setting
from elfctl.data.inputs import check_input_exists, read_condition_rows
from elfctl.errors import UserError
from elfctl.runs.sample_job import LoadedModel, SampleJob, load_for_sampling
from elfctl.sampling import count_truncated

OVERRIDES = ("steps", "method", "gamma", "sc_cfg", "cfg", "time_schedule")


@dataclass
class SampleRequest:
    """`elfctl sample`'s choices; None means "the setting's (or config's) own"."""

    checkpoint: str
    out_dir: Path
    preset: str | None = None
    setting: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # OVERRIDES of the setting
    num_samples: int | None = None
    batch_size: int | None = None
    length: int | None = None
    seed: int = 0
    tokenizer: str | None = None
    encoder: str | None = None
    precision: str = "auto"
    compile: bool = False
    grid: str = "per-sample"
    trajectory: int = 0
    force: bool = False
    resume: bool = False
    prompting: dict[str, Any] = field(default_factory=dict)  # SampleJob's prompting fields
    input: str | None = None  # conditional sources
    source_field: str | None = None
    reference_field: str | None = None
    split: str | None = None

    @property
    def resume_mode(self) -> str:
        """SampleJob's `resume`: never (--force), must (--resume) or auto."""
        return "never" if self.force else "must" if self.resume else "auto"


@dataclass
class PreparedSample:
    """A loaded model and the job to run on it, with what to tell the user first."""

    loaded: LoadedModel
    job: SampleJob
    what: str  # "8 x 16 tokens from runs/tiny"
    warnings: list[str]


def check_request(request: SampleRequest) -> None:
    """Everything that can be refused before the model loads or anything is written."""
    unknown = set(request.overrides) - set(OVERRIDES)
    if unknown:
        raise ValueError(f"unknown sampling overrides {sorted(unknown)}")
    if request.resume and request.force:
        raise UserError("--resume continues a run and --force starts it over: pass one of them.")
    if request.input is not None and request.length is not None:
        raise UserError(
            "--length does not apply with --input: conditional samples use the model's "
            "data.max_length."
        )
    out_dir = request.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory.")
    if (out_dir / records.SAMPLES_FILE).exists() and not request.force:
        raise UserError(f"{out_dir} already holds samples.jsonl; pass --force or another --out.")
    if request.input is not None:
        check_input_exists(request.input)


def apply_overrides(setting: SamplingSetting, overrides: dict[str, Any]) -> SamplingSetting:
    """The setting with every given (not None) override in place."""
    return dataclasses.replace(setting, **{k: v for k, v in overrides.items() if v is not None})


def default_num_samples(
    setting: SamplingSetting, prompting: dict[str, Any], num_samples: int | None
) -> int:
    """--num-samples, else one sample per prompt or template when there are several, else
    the setting's own number."""
    if num_samples is not None:
        return num_samples
    given = prompting.get("prompts") or prompting.get("templates") or []
    return len(given) if len(given) > 1 else setting.num_samples


def prepare_sample(request: SampleRequest, device: Any) -> PreparedSample:
    """Load the model and build the job `request` describes (after `check_request`)."""
    loaded = load_for_sampling(
        request.checkpoint,
        request.preset,
        request.tokenizer,
        device,
        with_encoder=request.input is not None,
        for_prompting=bool(request.prompting),
        encoder=request.encoder,
    )
    chosen = apply_overrides(sampling_setting(loaded.config, request.setting), request.overrides)
    if request.input is not None:
        return _conditional(request, loaded, chosen)
    n = default_num_samples(chosen, request.prompting, request.num_samples)
    job = SampleJob(
        setting=chosen,
        num_samples=n,
        length=request.length or chosen.length or loaded.config.data.max_length,
        batch_size=min(request.batch_size or chosen.batch_size, n),
        **_common(request),
    )
    return PreparedSample(loaded, job, f"{n} x {job.length} tokens from {request.checkpoint}", [])


def _common(request: SampleRequest) -> dict[str, Any]:
    return dict(
        seed=request.seed,
        precision=request.precision,
        compile=request.compile,
        grid=request.grid,
        trajectory=request.trajectory,
        **request.prompting,
    )


def _conditional(
    request: SampleRequest, loaded: LoadedModel, chosen: SamplingSetting
) -> PreparedSample:
    """One sample per row of --input, conditioned on its source, with its reference."""
    data = loaded.config.data
    split = request.split
    if split is None and request.input == data.validation:
        split = data.validation_split  # the preset's own evaluation set
    source_field = request.source_field or data.source_field
    reference_field = request.reference_field or data.target_field
    rows = read_condition_rows(
        request.input, source_field, reference_field, split, request.num_samples
    )
    n = len(rows.texts)
    job = SampleJob(
        setting=chosen,
        num_samples=n,
        length=data.max_length,
        batch_size=min(request.batch_size or chosen.batch_size, n),
        conditions=rows.texts,
        references=rows.references if any(r is not None for r in rows.references) else None,
        condition_ids=rows.token_ids,
        meta={
            "input": request.input,
            "source_field": source_field,
            "reference_field": reference_field,
        },
        **_common(request),
    )
    warnings = []
    cut = count_truncated(loaded.tokenizer, rows.texts, data.max_input_length, rows.token_ids)
    if cut:
        warnings.append(
            f"{cut} of {n} sources are longer than max_input_length ({data.max_input_length} "
            "tokens) and are truncated to it"
        )
    what = (
        f"{n} outputs of up to {data.max_length - data.max_input_length} tokens "
        f"conditioned on {request.input} from {request.checkpoint}"
    )
    return PreparedSample(loaded, job, what, warnings)


def run_sample(
    prepared: PreparedSample, request: SampleRequest, plan, procs, on_batch=None
) -> dict:
    """Sample what `plan` leaves into --out; returns run.json. Starting over (--force) also
    drops the old run's metrics.jsonl, which describes samples that are being replaced."""
    if request.force and procs.is_main:
        (request.out_dir / records.METRICS_FILE).unlink(missing_ok=True)
    return prepared.job.run(
        prepared.loaded,
        request.out_dir,
        on_batch=on_batch,
        procs=procs,
        plan=plan,
        resume=request.resume_mode,
    )
