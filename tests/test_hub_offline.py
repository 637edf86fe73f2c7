"""No network, no mystery: every hub access fails fast, naming the repository.

The hub libraries are not mocked. Each check runs in a fresh interpreter whose
HF_ENDPOINT is a closed local port (http://127.0.0.1:9), so the real huggingface_hub,
transformers and datasets code meets a hub that cannot be reached, deterministically and
whether or not this machine has a network. The hub cache is an empty temporary folder
(or one we fill in the hub's own layout, to show cached files still load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elfctl.cli import app
from tests.conftest import build_word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once
# The probe's timeout (hub.PROBE_TIMEOUT_S) plus room for a busy machine; before, the
# libraries retried for 25-48 s.
FAST_S = 10.0

runner = CliRunner()


def hub_env(tmp_path: Path, endpoint: str = UNREACHABLE) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    return env


# Each case: a name and the statement that accesses the hub (names imported in PRELUDE).
PRELUDE = """
import json, sys, time
from pathlib import Path
from elfctl.errors import UserError
from elfctl.config import DataConfig, EncoderConfig
from elfctl.model import load_checkpoint, load_encoder, load_tokenizer
from elfctl.scoring import load_scorer
from elfctl.scoring.diversity import load_tokenizer as diversity_tokenizer
from elfctl.scoring.mauve import load_featurizer
from elfctl.data import load_corpus
from elfctl.data.streamed_rows import open_stream
from elfctl.convert import convert_checkpoint, push_to_hub
# Imported up front, so each case's time is the hub access, not a library's import.
import datasets, huggingface_hub
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, T5EncoderModel
"""

CASES = {
    "checkpoint repo": "load_checkpoint('someorg/elf-model')",
    "checkpoint sub-path": "load_checkpoint('someorg/elf-model/checkpoint_7000')",
    "tokenizer": "load_tokenizer('someorg/elf-tokenizer')",
    "encoder": "load_encoder(EncoderConfig(encoder='someorg/elf-encoder'))",
    "scorer": "load_scorer('someorg/elf-scorer')",
    "diversity tokenizer": "diversity_tokenizer('someorg/elf-tokenizer')",
    "mauve features": "load_featurizer('someorg/elf-scorer')",
    "dataset": "load_corpus('someorg/elf-data', DataConfig())",
    "streamed dataset": "open_stream('someorg/elf-data', DataConfig(), 'train')",
    "jax checkpoint": "convert_checkpoint('someorg/elf-jax', Path(sys.argv[1]) / 'out')",
    "upload": "push_to_hub(Path(sys.argv[1]), 'someorg/elf-upload')",
}

RUNNER = (
    PRELUDE
    + """
results = {}
for name, statement in json.loads(sys.argv[2]).items():
    start = time.perf_counter()
    try:
        eval(statement)
        outcome = "no error"
    except UserError as e:
        outcome = "UserError: " + str(e)
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    results[name] = {"seconds": time.perf_counter() - start, "outcome": outcome}
print(json.dumps(results))
"""
)


def run_cases(tmp_path: Path, cases: dict[str, str], endpoint: str = UNREACHABLE) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path), json.dumps(cases)],
        env=hub_env(tmp_path, endpoint),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unreachable_results(tmp_path_factory):
    return run_cases(tmp_path_factory.mktemp("unreachable"), CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_unreachable_hub_is_one_sentence_naming_the_repository(unreachable_results, case):
    result = unreachable_results[case]
    outcome = result["outcome"]
    repo = CASES[case].split("'")[1]
    assert outcome.startswith("UserError: "), outcome
    assert f"'{repo.split('/checkpoint')[0]}'" in outcome, outcome
    assert "could not be reached" in outcome, outcome
    assert UNREACHABLE in outcome, outcome  # which hub it tried
    if case != "upload":  # an upload has no offline form; the others say how to work offline
        assert "local path" in outcome and "HF_HUB_OFFLINE=1" in outcome, outcome
    assert result["seconds"] < FAST_S, result


def test_a_cached_tokenizer_still_loads_when_the_hub_cannot_be_reached(tmp_path):
    """Unreachable is not fatal: what is in the hub cache loads, as under HF_HUB_OFFLINE=1."""
    from transformers import T5Config

    snapshot = tmp_path / "hf" / "hub" / "models--someorg--cached-tok" / "snapshots" / ("a" * 40)
    build_word_tokenizer(snapshot)
    T5Config(vocab_size=18, d_model=8, num_layers=1, num_heads=1).save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    results = run_cases(
        tmp_path,
        {
            "cached": "print(len(load_tokenizer('someorg/cached-tok')), file=sys.stderr)",
            "not cached": "load_tokenizer('someorg/other-tok')",
        },
    )
    assert results["cached"]["outcome"] == "no error", results
    assert results["cached"]["seconds"] < FAST_S
    assert "'someorg/other-tok'" in results["not cached"]["outcome"]
    assert "not in the local cache" in results["not cached"]["outcome"]


def test_sample_with_a_hub_id_exits_2_fast_without_a_traceback(tmp_path):
    """The whole command, timed from the shell: startup, the probe, the message."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "elfctl", "sample", "--repo", "someorg/elf-model", "--cpu"],
        env=hub_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert "'someorg/elf-model'" in done.stderr and "could not be reached" in done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Startup (imports) dominates on a busy machine; the libraries' retries took 25 s more.
    assert seconds < 60, seconds


def test_hub_offline_by_choice_names_the_repository_and_the_setting(tmp_path):
    env = hub_env(tmp_path) | {"HF_HUB_OFFLINE": "1"}
    code = PRELUDE + "load_tokenizer('someorg/elf-tokenizer')"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert "UserError" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "'someorg/elf-tokenizer'" in last and "HF_HUB_OFFLINE is set" in last


# ----------------------------------------------------------------------------- local paths


def test_a_missing_local_tokenizer_is_not_a_hub_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.jsonl").write_text('{"id": 0, "text": "a b"}\n')
    result = runner.invoke(app, ["score-diversity", "s.jsonl", "--tokenizer", "./missing"])
    assert result.exit_code == 2
    assert "the folder ./missing does not exist" in result.stderr
    assert "Repo id" not in result.stderr and "hub" not in result.stderr


def test_a_missing_compare_folder_is_not_a_hub_error_and_nothing_is_written(tmp_path):
    result = runner.invoke(
        app,
        [
            "convert-jax",
            str(tmp_path / "t5.pkl"),
            str(tmp_path / "out"),
            "--encoder",
            "--compare",
            "./missing",
        ],
    )
    assert result.exit_code == 2 and "./missing" in result.stderr
    assert "does not exist" in result.stderr or "no such folder" in result.stderr
    assert "could not be reached" not in result.stderr and "Repo id" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_local_repo_is_not_a_hub_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sample", "--repo", "./missing", "--cpu"])
    assert result.exit_code == 2
    assert "./missing" in result.stderr and "no such file or directory" in result.stderr
    assert "hub" not in result.stderr


def test_a_missing_local_encoder_folder_is_not_a_hub_error():
    from elfctl.errors import UserError
    from elfctl.model import load_tokenizer

    with pytest.raises(UserError, match="the folder ./missing/tok does not exist") as caught:
        load_tokenizer("./missing/tok")
    assert "hub" not in str(caught.value)
