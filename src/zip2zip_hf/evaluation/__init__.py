"""Evaluating a zip2zip model against its base: bits per byte of the same text (`scoring`), the
canonical ids of a known continuation (`forced_decoding`), and the lm-evaluation-harness model
``zip2zip`` (`lm_eval_harness`, imported only by lm-eval). Never part of a checkpoint."""

from .forced_decoding import ForcedContinuationLogitsProcessor, canonical_continuation
from .scoring import (
    DEFAULT_WINDOW,
    MODES,
    TextScore,
    base_mode,
    best_device,
    kinds_table,
    load_for_evaluation,
    score_kinds,
    score_texts,
)


__all__ = [
    "DEFAULT_WINDOW",
    "MODES",
    "ForcedContinuationLogitsProcessor",
    "TextScore",
    "base_mode",
    "best_device",
    "canonical_continuation",
    "kinds_table",
    "load_for_evaluation",
    "score_kinds",
    "score_texts",
]
