"""Command-line interface. Importing this package registers every command on `app`."""

from __future__ import annotations

from . import (
    convert,  # noqa: F401
    distill,  # noqa: F401
    eval,  # noqa: F401
    export,  # noqa: F401
    sample,  # noqa: F401  (registers commands)
    score,  # noqa: F401
    score_distribution,  # noqa: F401
    serve,  # noqa: F401
    show,  # noqa: F401
    sweep,  # noqa: F401
    train,  # noqa: F401
)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
