"""Forced decoding: make a model write the canonical compressed ids of a known text (tests, benchmarks).

`canonical_continuation` gives the compressed ids a model should write to produce a known text after
its prompt, and `ForcedContinuationLogitsProcessor` makes ``generate`` write exactly those: the
speed-up a well-trained zip2zip model delivers, measured without training one.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..lzw import LZWCodec


__all__ = ["ForcedContinuationLogitsProcessor", "canonical_continuation"]


def canonical_continuation(codec: LZWCodec, prompt: list[int], base_ids: list[int]) -> list[int]:
    """The compressed ids that continue ``prompt`` (compressed ids) with the text ``base_ids`` (base ids).

    Greedy longest match against the row's codebook as it grows, the provisional ("KwKwK") id
    included: exactly what `LZWCodec.encode` writes for the whole text when ``prompt`` is a prefix of
    its codes (e.g. ``encode(prompt_base_ids)[0]`` need not be: its last phrase may grow).
    """
    stream = codec.stream()
    stream.feed(prompt)
    return stream.continuation(base_ids)


class ForcedContinuationLogitsProcessor(LogitsProcessor):
    """Makes every row write the canonical compressed ids of a known text after its prompt (forced decoding).

    The prompt of each row is what the first call sees (leading ``pad_token_id`` ids dropped); after
    the text, ``eos_token_id`` is forced (or, without one, the last id again). A forced id the model
    scores ``-inf`` (not legal for its row, or not canonical there) after the row has written the
    forced ids so far raises: the model's legal set must hold the canonical ids.

    Attributes:
        codes: per row, the forced compressed ids (set at the first call).
        widths: the width of ``scores`` at each call (``V + K`` for a zip2zip model).
    """

    def __init__(
        self, codec: LZWCodec, base_ids: list[int], eos_token_id: int | None = None, pad_token_id: int | None = None
    ):
        self.codec = codec
        self.base_ids = [int(i) for i in base_ids]
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.prompt_length: int | None = None
        self.codes: list[list[int]] = []
        self.widths: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
            for row in input_ids.tolist():
                start = 0
                while self.pad_token_id is not None and start < len(row) and row[start] == self.pad_token_id:
                    start += 1
                self.codes.append(canonical_continuation(self.codec, row[start:], self.base_ids))
        self.widths.append(scores.shape[-1])
        step = input_ids.shape[1] - self.prompt_length
        rows, ids = [], []
        for row, codes in enumerate(self.codes):
            if step < len(codes):
                ids.append(codes[step])
            else:
                ids.append(self.eos_token_id if self.eos_token_id is not None else codes[-1] if codes else 0)
            rows.append(row)
        rows_t = torch.tensor(rows, device=scores.device)
        ids_t = torch.tensor(ids, device=scores.device)
        picked = scores[rows_t, ids_t]
        # Only a row that has written the forced ids so far must allow the next one: speculative
        # decoding also scores positions after a draft it is about to reject.
        written = input_ids[:, self.prompt_length :].tolist()
        for row in (~torch.isfinite(picked)).nonzero().flatten().tolist():
            if written[row] == self.codes[row][:step]:
                raise ValueError(f"row {row}, step {step}: the forced id {ids[row]} is not legal for the model there")
        forced = torch.full_like(scores, float("-inf"))
        forced[rows_t, ids_t] = 0.0
        return forced
