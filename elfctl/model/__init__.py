"""The network, the flow maths, the frozen encoder, and checkpoints (finding, loading, saving)."""

from __future__ import annotations

from elfctl.model.checkpoints import (
    Checkpoint,
    build_model,
    checkpoint_config,
    file_sha256,
    list_step_dirs,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_model_checkpoint,
    save_official_checkpoint,
)
from elfctl.model.encoder import (
    FrozenEncoder,
    encoder_pair_mask,
    load_encoder,
    load_tokenizer,
    pair_masks_unsupported,
    t5_attention_mask,
)
from elfctl.model.network import (
    ELF,
    Attention,
    RMSNorm,
    SwiGLU,
    apply_rope,
    infer_model_config,
    rope_tables,
    size_name,
    timestep_features,
)

__all__ = [
    "Attention",
    "Checkpoint",
    "ELF",
    "FrozenEncoder",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "build_model",
    "checkpoint_config",
    "encoder_pair_mask",
    "file_sha256",
    "infer_model_config",
    "list_step_dirs",
    "load_checkpoint",
    "load_encoder",
    "load_model",
    "load_tokenizer",
    "pair_masks_unsupported",
    "resolve_checkpoint",
    "rope_tables",
    "save_model_checkpoint",
    "save_official_checkpoint",
    "size_name",
    "t5_attention_mask",
    "timestep_features",
]
