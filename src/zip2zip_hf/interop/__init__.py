"""Checkpoints of other zip2zip implementations, read into this one: `from_reference` loads what the
reference ``zip2zip`` package saved (``python -m zip2zip_hf convert``). Never part of a checkpoint."""

from .reference import from_reference, read_reference_config


__all__ = ["from_reference", "read_reference_config"]
