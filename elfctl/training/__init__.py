"""Training: objective, optimisers, the trainer, fine-tuning, distillation, tracking.

trainer         the training loop on Accelerate (`train`, `Trainer`)
data_order      which rows each step trains on, per process, and where training stands
run_dir         a run directory: saved config, same-run checks, log, checkpoint retention
training_state  a checkpoint's training_state/: what exact resume needs, per process
previews        periodic samples from the EMA weights during training
objective       the ELF loss and the randomness of one step
optim           Muon/AdamW, schedules, EMA
autoconfig      `auto` settings resolved from the tokenizer and the data
finetune        initial weights from another checkpoint
distillation    progressive distillation rounds on the same loop
tracking        Accelerate trackers (TensorBoard, W&B)
"""

from __future__ import annotations

from elfctl.training.autoconfig import stats_row_indices
from elfctl.training.distillation import (
    TARGETS,
    TEACHER_SAMPLERS,
    DistillRule,
    DistillTrainer,
    EMANetwork,
    PDDraws,
    check_distill_config,
    consistency_target,
    distill,
    distill_loss,
    draw_pd,
    parse_rounds,
    pd_inputs,
    pd_target,
    round_config,
    round_dir,
    student_step,
    substeps_for,
    teacher_times,
    teacher_trajectory,
)
from elfctl.training.finetune import init_model, load_init_weights
from elfctl.training.objective import (
    Draws,
    decoder_input,
    draw,
    drop_labels,
    elf_loss,
    guided_target,
    keep_condition,
)
from elfctl.training.optim import (
    EMA,
    MuonAdam,
    build_optimizer,
    build_scheduler,
    learning_rate,
    lr_lambda,
    muon_update_scale,
    newton_schulz,
    parameter_kind,
    resolve_warmup_steps,
)
from elfctl.training.tracking import SCALARS, Tracking, hyperparameters, parse_log_with
from elfctl.training.trainer import (
    StepReport,
    Trainer,
    TrainResult,
    make_accelerator,
    plan_batches,
    train,
)
from elfctl.training.training_state import TrainingState, read_training_state

__all__ = [
    "DistillRule",
    "DistillTrainer",
    "EMANetwork",
    "TARGETS",
    "TEACHER_SAMPLERS",
    "consistency_target",
    "Draws",
    "EMA",
    "MuonAdam",
    "PDDraws",
    "SCALARS",
    "StepReport",
    "Tracking",
    "TrainResult",
    "Trainer",
    "TrainingState",
    "build_optimizer",
    "build_scheduler",
    "check_distill_config",
    "decoder_input",
    "distill",
    "distill_loss",
    "draw",
    "draw_pd",
    "drop_labels",
    "elf_loss",
    "guided_target",
    "hyperparameters",
    "init_model",
    "keep_condition",
    "learning_rate",
    "load_init_weights",
    "lr_lambda",
    "make_accelerator",
    "muon_update_scale",
    "newton_schulz",
    "parameter_kind",
    "parse_log_with",
    "parse_rounds",
    "pd_inputs",
    "pd_target",
    "plan_batches",
    "read_training_state",
    "resolve_warmup_steps",
    "round_config",
    "round_dir",
    "stats_row_indices",
    "student_step",
    "substeps_for",
    "teacher_times",
    "teacher_trajectory",
    "train",
]
