"""elfctl: train, sample, evaluate and convert ELF (Embedded Language Flows) models.

The public API is small and imported lazily so that `elfctl --help` stays fast:

    model = elfctl.load_model("embedded-language-flows/ELF-B-owt-torch")
    out = elfctl.generate(model, tokenizer, steps=32, method="sde", gamma=1.5, sc_cfg=3.0, ...)
"""

from __future__ import annotations

from elfctl.version import __version__

__all__ = ["__version__", "load_model", "generate", "load_tokenizer"]


def __getattr__(name: str):
    if name == "load_model":
        from elfctl.model import load_model

        return load_model
    if name == "generate":
        from elfctl.sampling import generate

        return generate
    if name == "load_tokenizer":
        from elfctl.model import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'elfctl' has no attribute {name!r}")
