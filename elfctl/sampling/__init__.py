"""Sampling: the solver loop and its step rules (solvers), guidance, prompting, conditions,
random streams, trajectories, rows that leave a batch."""

from __future__ import annotations

from elfctl.sampling.conditions import (
    Condition,
    condition_batch,
    count_truncated,
    encode_conditions,
)
from elfctl.sampling.live_rows import LiveRows
from elfctl.sampling.prompting import (
    ENCODINGS,
    HOLDS,
    KnownTokens,
    Layout,
    check_fits,
    known_tokens,
    lay_out,
    layouts_for,
    parse_prompt,
    parse_template,
    read_prompts,
)
from elfctl.sampling.random_streams import GRIDS, SampleStreams, sample_key
from elfctl.sampling.sampler import (
    Generation,
    SamplerSettings,
    autocast_context,
    decode,
    detokenize,
    generate,
    mask_after_eos,
    sample_batch,
    sample_latents,
    setting_kwargs,
    shift_condition,
)
from elfctl.sampling.solvers import (
    SAMPLER_NAMES,
    SOLVERS,
    Solver,
    check_sampler,
    check_schedule,
    check_setting,
    forwards_for,
    solver,
)
from elfctl.sampling.trajectory import TrajectoryRecorder, frame_changes, recorded_steps

__all__ = [
    "Condition",
    "ENCODINGS",
    "GRIDS",
    "Generation",
    "SAMPLER_NAMES",
    "SOLVERS",
    "Solver",
    "HOLDS",
    "KnownTokens",
    "Layout",
    "LiveRows",
    "SampleStreams",
    "SamplerSettings",
    "TrajectoryRecorder",
    "autocast_context",
    "check_fits",
    "check_sampler",
    "check_schedule",
    "check_setting",
    "condition_batch",
    "count_truncated",
    "decode",
    "detokenize",
    "encode_conditions",
    "forwards_for",
    "frame_changes",
    "generate",
    "known_tokens",
    "lay_out",
    "layouts_for",
    "mask_after_eos",
    "parse_prompt",
    "parse_template",
    "read_prompts",
    "recorded_steps",
    "sample_batch",
    "sample_key",
    "sample_latents",
    "setting_kwargs",
    "shift_condition",
    "solver",
]
