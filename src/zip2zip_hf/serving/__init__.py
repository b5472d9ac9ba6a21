"""Serving zip2zip models: the per-request codebook state an engine keeps (`request_codebook`, no
model and no server needed), and an OpenAI-compatible server on transformers' own (`server`,
``python -m zip2zip_hf serve``; needs ``zip2zip_hf[serve]`` and is imported only when used).
Never part of a checkpoint."""

from .request_codebook import RequestCodebook, RequestUsage


__all__ = ["RequestCodebook", "RequestUsage"]
