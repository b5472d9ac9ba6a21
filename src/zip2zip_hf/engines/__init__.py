"""Serving zip2zip models on batching engines (vLLM, SGLang): the engine-agnostic core that keeps each
request's codebook and hypertoken vectors in the engine's stable slots (`slots`). Adapters for each
engine build on it. Never part of a checkpoint."""

from .slots import SlotCodebooks, SlotStep


__all__ = ["SlotCodebooks", "SlotStep"]
