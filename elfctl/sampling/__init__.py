"""Sampling: the solver loop, guidance, prompting, conditions, random streams, trajectories."""

from __future__ import annotations

from elfctl.sampling.conditions import (
    Condition,
    condition_batch,
    count_truncated,
    encode_conditions,
)
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
from elfctl.sampling.trajectory import TrajectoryRecorder, frame_changes, recorded_steps

__all__ = [
    "Condition",
    "ENCODINGS",
    "GRIDS",
    "Generation",
    "HOLDS",
    "KnownTokens",
    "Layout",
    "SampleStreams",
    "SamplerSettings",
    "TrajectoryRecorder",
    "autocast_context",
    "check_fits",
    "condition_batch",
    "count_truncated",
    "decode",
    "detokenize",
    "encode_conditions",
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
]
