"""A tiny GPT-2 scorer (model + byte-level BPE tokenizer) in Hugging Face format, built offline.

Stands in for `gpt2-large` in tests: it is loaded through exactly the same
`AutoModelForCausalLM.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)`
code that loads hub ids. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"

TRAINING_TEXT = [
    "the cat sat on the mat .",
    "a dog ran after the red ball in the park .",
    "Die Katze sitzt auf der Matte .",
    "numbers like 12 , 345 and 6789 appear here too !",
    'She said: "hello, world" and left the room quietly.',
    "the quick brown fox jumps over the lazy dog",
]


def build_tiny_gpt2(
    directory: str | Path,
    *,
    n_positions: int = 1024,
    vocab_size: int = 300,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised 2-layer GPT-2 and its tokenizer to `directory`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from elfctl.testbed.scorer import build_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE like GPT-2's: every byte is in the alphabet, so any text tokenizes.
    tokenizer = build_tokenizer(TRAINING_TEXT, directory, vocab_size, n_positions)

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    # Larger-than-default weights give a peaked next-token distribution, so a wrong
    # shift or mask changes the perplexity visibly instead of hiding near log(vocab).
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory
