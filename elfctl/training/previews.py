"""Preview samples during training (train.sample_every): a few samples from the EMA weights
into RUN_DIR/samples/step_N.jsonl, so a run can be read while it trains.

They use the config's first sampling setting at the training precision and the run's seed,
so two previews differ only by the weights. Conditional runs sample the first validation
inputs (their own condition ids, as evaluation does), with the setting's guidance;
unconditional runs sample without guidance, there being nothing to guide towards.
"""

from __future__ import annotations

from pathlib import Path

import torch

from elfctl import records
from elfctl.config import Config
from elfctl.data.inputs import read_condition_rows
from elfctl.model.network import ELF
from elfctl.sampling.conditions import encode_conditions
from elfctl.sampling.sampler import generate, setting_kwargs
from elfctl.training.run_dir import SAMPLES, step_name


class Previews:
    """Writes preview samples of a run; the validation inputs are read once, on first use."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, encoder, device, precision: str):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.tokenizer, self.encoder, self.device = tokenizer, encoder, device
        self.precision = precision  # "bf16" or "fp32", as training runs
        self._conditions = None

    def write(self, ema_state: dict[str, torch.Tensor], step: int) -> list[str]:
        """Sample from `ema_state` (the averaged weights), write step `step`'s file, and
        return the texts."""
        cfg = self.cfg
        with torch.device("meta"):
            model = ELF(cfg.model)
        model.load_state_dict(ema_state, assign=True)
        model.eval()
        setting = cfg.sampling[0]
        kwargs = setting_kwargs(setting)
        condition, inputs, references = self.conditions()
        if condition is None:
            kwargs["cfg"] = 1.0  # nothing to guide towards
        result = generate(
            model,
            self.tokenizer,
            **kwargs,
            num_samples=cfg.train.sample_count,
            length=setting.length or cfg.data.max_length,
            seed=cfg.train.seed,
            condition=condition,
            precision=self.precision,
        )
        rows = [
            records.sample_row(
                i,
                text,
                tokens=tokens,
                condition=inputs[i] if inputs else None,
                reference=references[i] if references else None,
                seed=cfg.train.seed,
                meta={"step": step},
            )
            for i, (text, tokens) in enumerate(zip(result.texts, result.tokens, strict=True))
        ]
        records.write_samples(self.run_dir / SAMPLES / f"{step_name(step)}.jsonl", rows)
        return result.texts

    def conditions(self):
        """(Condition, input texts, references) of the first validation rows, or Nones."""
        data = self.cfg.data
        if not data.conditional or not data.validation:
            return None, None, None
        if self._conditions is None:
            rows = read_condition_rows(
                data.validation,
                data.source_field,
                data.target_field,
                split=data.validation_split,
                limit=self.cfg.train.sample_count,
            )
            condition, _ = encode_conditions(
                self.encoder,
                self.tokenizer,
                rows.texts,
                data.max_length,
                data.max_input_length,
                self.device,
                data.pad_token,
                token_ids=rows.token_ids,  # the set's own condition ids, as in evaluation
            )
            self._conditions = condition, rows.texts, rows.references
        return self._conditions
