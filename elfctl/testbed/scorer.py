"""A GPT-2 scorer that knows the test bed's language: Gen PPL and MAUVE features offline.

GPT-2 Large cannot be downloaded here, and a randomly initialised GPT-2 gives every text
about the same perplexity. This builds a small GPT-2 (`GPT2LMHeadModel`, byte-level BPE
tokenizer, Hugging Face format) and trains it for a minute or two on the grammar's training
texts, so its Gen PPL is low for grammatical text and high for word salad, as GPT-2 Large's
is for English. It is loaded like any scorer (`--scorer FOLDER`), through the same
`from_pretrained(path)` calls as a hub id.

The training loss is the scorer's own Gen PPL objective: next-token NLL of each text's
tokens, the first token context only, padding neither attended to nor scored.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from elfctl.testbed.assets import cache_root, ensure_assets

SCORER_VERSION = 1
EOS = "<|endoftext|>"


def scorer_folder() -> Path:
    return cache_root() / "testbed" / f"grammar-scorer-v{SCORER_VERSION}"


def build_tokenizer(
    texts: list[str], folder: Path, vocab_size: int = 400, model_max_length: int = 1024
):
    """A byte-level BPE tokenizer like GPT-2's (every text tokenizes), trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(folder)
    return tokenizer


def train_scorer(
    folder: str | Path,
    texts: list[str],
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train a 2-layer GPT-2 (width 64) on `texts` and save it with its tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, folder)
    ids = [list(row) for row in tokenizer(texts, truncation=True, max_length=64)["input_ids"]]
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,  # score-ppl truncates at 1024 tokens and checks the scorer has them
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = torch.randint(0, len(ids), (batch_size,), generator=generator).tolist()
        batch = [ids[i] for i in rows]
        longest = max(len(b) for b in batch)
        input_ids = torch.full((batch_size, longest), tokenizer.eos_token_id)
        mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for r, b in enumerate(batch):
            input_ids[r, : len(b)] = torch.tensor(b)
            mask[r, : len(b)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)  # padding is not scored
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    model.eval()
    model.save_pretrained(folder)
    return folder


def ensure_grammar_scorer(on_step: Callable[[int, float], None] | None = None) -> str:
    """The trained grammar scorer's folder, training it (about a minute) on first use."""
    import datasets

    folder = scorer_folder()
    if folder.is_dir():
        return str(folder)
    texts = list(datasets.load_from_disk(ensure_assets("grammar")["train"])["text"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(building, 0o755)
    try:
        train_scorer(building, texts, on_step=on_step)
        try:
            os.rename(building, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return str(folder)
