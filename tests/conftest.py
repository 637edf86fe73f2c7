"""Shared fixtures: tiny models and a local word-level tokenizer, built in the test run.

Nothing here touches the network: the tokenizer is saved in Hugging Face format
to a temp folder and loaded back with the same `from_pretrained(path)` call that
loads hub ids.
"""

from __future__ import annotations

import pytest
import torch

from elfctl.config import ModelConfig

WORDS = "the a cat dog bird sees chases sleeps runs big small red . , and".split()


def build_word_tokenizer(folder, words=WORDS):
    """A word-level tokenizer: <pad> 0, </s> 1, <unk> 2, then `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_model_config(vocab_size: int = 18, **overrides) -> ModelConfig:
    base = dict(
        hidden_size=32,
        depth=2,
        num_heads=2,
        bottleneck=8,
        latent_dim=16,
        vocab_size=vocab_size,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(model, seed: int = 0, std: float = 0.2):
    """Give every parameter random values, so zero-initialised heads do not hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def word_tokenizer(tmp_path):
    return build_word_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def tiny_model():
    from elfctl.model import ELF

    torch.manual_seed(0)
    return randomize_(ELF(tiny_model_config())).eval()
