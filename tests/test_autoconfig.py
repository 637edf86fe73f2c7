"""`auto` settings: the vocabulary from the tokenizer, latent statistics measured on the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from elfctl.cli import app
from elfctl.config import resolve
from elfctl.training import Trainer, make_accelerator, stats_row_indices
from tests.test_train import SMALL, small_config

N_ROWS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 rows of 3..15 test-bed tokens (some longer than max_length 16 with eos padding)."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(5)
    rows = [
        torch.randint(3, 58, (3 + i % 13,), generator=generator).tolist() for i in range(N_ROWS)
    ]
    folder = tmp_path_factory.mktemp("corpus") / "rows"
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(folder))
    return folder, rows


def slow_hidden_values(rows: list[list[int]]) -> np.ndarray:
    """Every value of every token's raw encoder output, each row encoded alone, unpadded."""
    from transformers import T5EncoderModel

    from elfctl.testbed.assets import resolve_testbed_uri

    t5 = T5EncoderModel.from_pretrained(resolve_testbed_uri("testbed:grammar/encoder")).eval()
    values = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row[:16]])
            values.append(t5(input_ids=ids).last_hidden_state.double().flatten().numpy())
    return np.concatenate(values)


def auto_config(corpus_folder, *extra):
    return small_config(f"data.train={corpus_folder}", *extra)


def test_auto_vocab_size_is_the_tokenizers_length(tmp_path, corpus):
    cfg = auto_config(corpus[0], "model.vocab_size=auto")
    trainer = Trainer(cfg, tmp_path / "run", make_accelerator(cpu=True))
    assert trainer.cfg.model.vocab_size == len(trainer.tokenizer) == 58
    assert trainer.auto_settings == {"model.vocab_size": 58}


def test_auto_latent_stats_equal_the_mean_and_std_of_every_encoded_value(tmp_path, corpus):
    folder, rows = corpus
    cfg = auto_config(
        folder,
        "encoder.latent_mean=auto",
        "encoder.latent_std=auto",
        "encoder.latent_stats_rows=1000",  # more than the corpus: every row
    )
    trainer = Trainer(cfg, tmp_path / "run", make_accelerator(cpu=True))
    values = slow_hidden_values(rows)
    assert trainer.auto_settings["rows"] == N_ROWS
    assert trainer.cfg.encoder.latent_mean == pytest.approx(values.mean(), rel=1e-6, abs=1e-9)
    assert trainer.cfg.encoder.latent_std == pytest.approx(values.std(), rel=1e-6)
    # The training encoder normalises with exactly these numbers.
    assert trainer.encoder.latent_mean == trainer.cfg.encoder.latent_mean
    assert trainer.encoder.latent_std == trainer.cfg.encoder.latent_std


def test_a_fixed_number_of_seeded_rows_is_measured(tmp_path, corpus):
    folder, rows = corpus
    sets = ["encoder.latent_mean=auto", "encoder.latent_std=auto", "encoder.latent_stats_rows=10"]
    trainer = Trainer(auto_config(folder, *sets), tmp_path / "a", make_accelerator(cpu=True))
    chosen = stats_row_indices(N_ROWS, 10, seed=0)
    assert len(set(chosen)) == 10 and chosen == sorted(chosen)
    values = slow_hidden_values([rows[i] for i in chosen])
    assert trainer.auto_settings["rows"] == 10
    assert trainer.cfg.encoder.latent_mean == pytest.approx(values.mean(), rel=1e-6, abs=1e-9)
    assert trainer.cfg.encoder.latent_std == pytest.approx(values.std(), rel=1e-6)
    assert stats_row_indices(N_ROWS, 10, seed=0) == chosen
    assert stats_row_indices(N_ROWS, 10, seed=1) != chosen
    other = Trainer(
        auto_config(folder, *sets, "train.seed=1"), tmp_path / "b", make_accelerator(cpu=True)
    )
    assert other.cfg.encoder.latent_std != trainer.cfg.encoder.latent_std


def test_an_auto_std_with_a_fixed_mean_is_the_spread_about_that_mean(tmp_path, corpus):
    folder, rows = corpus
    sets = ["encoder.latent_mean=0.5", "encoder.latent_std=auto", "encoder.latent_stats_rows=1000"]
    trainer = Trainer(auto_config(folder, *sets), tmp_path / "run", make_accelerator(cpu=True))
    values = slow_hidden_values(rows)
    assert trainer.cfg.encoder.latent_mean == 0.5
    expected = np.sqrt(((values - 0.5) ** 2).mean())
    assert trainer.cfg.encoder.latent_std == pytest.approx(expected, rel=1e-6)
    assert set(trainer.auto_settings) == {"encoder.latent_std", "rows"}


def test_resolved_numbers_are_written_to_the_run_config_and_reused_on_resume(tmp_path, corpus):
    run = tmp_path / "run"
    sets = ["model.vocab_size=auto", "encoder.latent_mean=auto", "encoder.latent_std=auto"]
    cfg = auto_config(corpus[0], *sets, "train.max_steps=2")
    first = Trainer(cfg, run, make_accelerator(cpu=True))
    first.fit()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 58
    assert saved["encoder"]["latent_mean"] == first.cfg.encoder.latent_mean
    assert saved["encoder"]["latent_std"] == first.cfg.encoder.latent_std
    assert isinstance(saved["encoder"]["latent_std"], float)
    resumed = Trainer(
        auto_config(corpus[0], *sets, "train.max_steps=4"), run, make_accelerator(cpu=True)
    )
    assert resumed.resume_from is not None and resumed.auto_settings == {}
    assert resumed.encoder.latent_std == first.cfg.encoder.latent_std


def test_train_prints_what_it_measured(tmp_path, corpus):
    sets = [*SMALL, f"data.train={corpus[0]}", "encoder.latent_std=auto"]
    argv = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--cpu"]
    argv += [x for s in sets for x in ("--set", s)] + ["--max-steps", "1"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "auto: encoder.latent_std = " in result.output
    assert f"measured on {N_ROWS} training rows (seed 0)" in result.output


@pytest.mark.parametrize("preset", ["owt-b", "owt-m", "owt-l", "xsum-b", "de-en-b", "owt-b-pd"])
def test_official_presets_keep_the_fixed_latent_statistics(preset):
    cfg = resolve(preset)
    assert (cfg.encoder.latent_mean, cfg.encoder.latent_std) == (0.0, 0.2)
    assert cfg.model.vocab_size == 32100


def test_an_auto_statistic_outside_training_is_a_clear_error():
    from elfctl.errors import UserError
    from elfctl.model import load_encoder

    cfg = resolve("tiny", sets=["encoder.latent_std=auto"])
    with pytest.raises(UserError, match="only training can measure"):
        load_encoder(cfg.encoder)


def test_auto_is_the_only_word_a_number_setting_takes():
    from elfctl.errors import UserError

    with pytest.raises(UserError, match="encoder.latent_std"):
        resolve("tiny", sets=["encoder.latent_std=automatic"])
