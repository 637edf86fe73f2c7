"""Deterministic local building of the tiny test-bed assets, in Hugging Face format.

`ensure_assets("grammar")` (or "translate") returns the folders of a word-level tokenizer, a
small randomly initialised T5 encoder, train/validation datasets in `save_to_disk` layout,
and a stats.json with the encoder's latent mean/std measured on the data. They are built on
first use under `$ELFCTL_CACHE` (default ~/.cache/elfctl) in `testbed/<name>-v1`, and
loaded by the ordinary `AutoTokenizer.from_pretrained(path)`,
`T5EncoderModel.from_pretrained(path)` and `datasets.load_from_disk(path)`: the same code
paths that load hub ids, so the test bed exercises them for real.

Every build gives the same files (same token ids, same weights). A build happens in a
temporary folder that is renamed into place when complete, so an aborted build leaves
nothing that looks finished and concurrent builds cannot mix their files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elfctl.errors import UserError
from elfctl.testbed.grammar import END, VOCABULARY, generate_corpus
from elfctl.testbed.translate import TARGET_VOCABULARY, make_pairs

ASSET_VERSION = 1
URI_PREFIX = "testbed:"
PARTS = ("tokenizer", "encoder", "train", "validation", "stats")

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
ENCODER_SEED = 0


@dataclass(frozen=True)
class AssetSpec:
    train_rows: int
    validation_rows: int
    train_seed: int
    validation_seed: int
    stats_max_length: int  # the tiny presets' max_length
    stats_max_input_length: int | None  # their condition budget (conditional data only)


SPECS = {
    "grammar": AssetSpec(50_000, 2_000, 1, 2, stats_max_length=16, stats_max_input_length=None),
    "translate": AssetSpec(50_000, 1_000, 3, 4, stats_max_length=32, stats_max_input_length=16),
}


def cache_root() -> Path:
    return Path(os.environ.get("ELFCTL_CACHE") or Path.home() / ".cache" / "elfctl")


def asset_folder(name: str) -> Path:
    return cache_root() / "testbed" / f"{name}-v{ASSET_VERSION}"


def vocabulary() -> list[str]:
    """The shared word-level vocabulary: specials (pad 0, eos 1, unk 2), both languages, '.'."""
    source = [w for w in VOCABULARY if w != END]
    target = [w for w in TARGET_VOCABULARY if w != END]
    return [PAD, EOS, UNK, *source, *target, END]


# --- the pieces ---------------------------------------------------------------------------


def build_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer that splits on whitespace and adds no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512
    )
    tokenizer.save_pretrained(str(folder))
    # transformers 5 writes its own class name; the 4.x name loads in both major versions.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_encoder(folder: Path, vocab_size: int) -> None:
    """A small T5 encoder with weights drawn from a fixed seed (the caller's RNG untouched)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ENCODER_SEED)
        model = T5EncoderModel(config)
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def _encode(texts: list[str]) -> list[list[int]]:
    """Token ids of whitespace-separated words (no special tokens; every word is known)."""
    index = {w: i for i, w in enumerate(vocabulary())}
    return [[index[w] for w in text.split()] for text in texts]


def build_grammar_split(folder: Path, rows: int, seed: int) -> None:
    from datasets import Dataset

    texts = generate_corpus(rows, seed)
    Dataset.from_dict({"input_ids": _encode(texts), "text": texts}).save_to_disk(str(folder))


def build_translate_split(folder: Path, rows: int, seed: int) -> None:
    from datasets import Dataset

    pairs = make_pairs(rows, seed)
    sources = [s for s, _ in pairs]
    targets = [t for _, t in pairs]
    columns = {
        "condition_input_ids": _encode(sources),
        "input_ids": _encode(targets),
        "input": sources,
        "target": targets,
    }
    Dataset.from_dict(columns).save_to_disk(str(folder))


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Library progress bars off while building (only the CLI prints), restored afterwards."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_on = not datasets.are_progress_bars_disabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()


def measure_latent_stats(
    encoder_folder: str | Path,
    dataset_folder: str | Path,
    max_length: int,
    n: int = 512,
    *,
    max_input_length: int | None = None,
    batch_size: int = 128,
) -> tuple[float, float]:
    """Mean and std of the encoder's last hidden state over the valid positions of the data.

    Uses the first n rows. Each row is laid out as the collator does: the condition (if any,
    truncated to max_input_length) followed by input_ids, truncated to max_length, padded.
    Padding positions are left out; mean and std are over every value of every valid position.
    """
    import torch
    from datasets import load_from_disk
    from transformers import T5EncoderModel

    with _quiet_progress_bars():
        encoder = T5EncoderModel.from_pretrained(str(encoder_folder)).eval()
        dataset = load_from_disk(str(dataset_folder))
    columns = dataset[: min(n, len(dataset))]
    targets = columns["input_ids"]
    conditions = columns.get("condition_input_ids") or [[] for _ in targets]
    sequences = []
    for condition, target in zip(conditions, targets, strict=True):
        if max_input_length is not None:
            condition = condition[:max_input_length]
        sequences.append((list(condition) + list(target))[:max_length])

    total = total_sq = count = 0.0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids = torch.zeros(len(batch), max_length, dtype=torch.long)  # pad id 0
        mask = torch.zeros(len(batch), max_length, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        with torch.no_grad():
            hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, C)
        valid = hidden[mask.bool()].double()  # (positions, C)
        total += valid.sum().item()
        total_sq += valid.pow(2).sum().item()
        count += valid.numel()
    if count == 0:
        raise ValueError(f"no valid positions in {dataset_folder}")
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)
    return mean, variance**0.5


# --- the whole set, built once --------------------------------------------------------------


def _paths(folder: Path) -> dict[str, str]:
    return {
        "root": str(folder),
        "tokenizer": str(folder / "tokenizer"),
        "encoder": str(folder / "encoder"),
        "train": str(folder / "train"),
        "validation": str(folder / "validation"),
        "stats": str(folder / "stats.json"),
    }


def _build(name: str, folder: Path) -> None:
    spec = SPECS[name]
    build_tokenizer(folder / "tokenizer")
    build_encoder(folder / "encoder", vocab_size=len(vocabulary()))
    build_split = build_grammar_split if name == "grammar" else build_translate_split
    build_split(folder / "train", spec.train_rows, spec.train_seed)
    build_split(folder / "validation", spec.validation_rows, spec.validation_seed)
    mean, std = measure_latent_stats(
        folder / "encoder",
        folder / "train",
        spec.stats_max_length,
        max_input_length=spec.stats_max_input_length,
    )
    stats = {
        "latent_mean": mean,
        "latent_std": std,
        "rows": min(512, spec.train_rows),
        "max_length": spec.stats_max_length,
        "max_input_length": spec.stats_max_input_length,
        "measured_on": "train",
    }
    (folder / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def ensure_assets(name: str) -> dict[str, str]:
    """Local paths of the named test bed's assets, building them on first use.

    Keys: tokenizer, encoder, train, validation (folders), stats (stats.json), root.
    """
    if name not in SPECS:
        raise UserError(f"Unknown test bed {name!r}; choose one of {', '.join(SPECS)}.")
    folder = asset_folder(name)
    if folder.is_dir():
        return _paths(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(building, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        with _quiet_progress_bars():
            _build(name, building)
        try:
            os.rename(building, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race with another builder: a real failure
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return _paths(folder)


def latent_stats(name: str) -> tuple[float, float]:
    """The measured (latent_mean, latent_std) of the named test bed, building it if needed."""
    stats = json.loads(Path(ensure_assets(name)["stats"]).read_text())
    return stats["latent_mean"], stats["latent_std"]


def is_testbed_uri(value: str) -> bool:
    return isinstance(value, str) and value.startswith(URI_PREFIX)


def resolve_testbed_uri(uri: str) -> str:
    """`testbed:<name>/<part>` -> the local path of that part, building the assets if needed.

    Parts: tokenizer, encoder, train, validation (folders) and stats (the stats.json file).
    """
    if not is_testbed_uri(uri):
        raise UserError(f"{uri!r} is not a test-bed address of the form testbed:<name>/<part>.")
    name, _, part = uri[len(URI_PREFIX) :].partition("/")
    if name not in SPECS or part not in PARTS:
        raise UserError(
            f"Unknown test-bed address {uri!r}; use testbed:<name>/<part> with name one of "
            f"{', '.join(SPECS)} and part one of {', '.join(PARTS)}."
        )
    return ensure_assets(name)[part]
