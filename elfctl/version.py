"""The package version: one place, read by run records, checkpoints and model cards."""

__version__ = "0.1.0"
