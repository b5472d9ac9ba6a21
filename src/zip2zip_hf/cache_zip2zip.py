"""The zip2zip caches: transformers' caches that also carry the batch's `HyperState`.

Keeping the codebooks in the cache object means every place transformers reorders, repeats or
selects cache rows (beam search, ``num_return_sequences``) moves the codebooks with the keys and
values, and every crop or reset takes them back with them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

from ._compat import crop_length, truncate_cache
from .hyper_state import HyperState


__all__ = ["Zip2ZipCache", "Zip2ZipStaticCache"]


class _CarriesHyperState:
    """What a zip2zip cache adds to a transformers cache: the batch's `HyperState` (``hyper_state``,
    None until first use), moved with the keys and values wherever transformers reorders, repeats
    or selects rows (beam search, ``num_return_sequences``)."""

    hyper_state: HyperState | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.hyper_state is not None:
            self.hyper_state.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.hyper_state is not None:
            self.hyper_state.select([r for r in range(self.hyper_state.batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.hyper_state is not None:
            self.hyper_state.select(indices)

    def crop(self, max_length: int) -> None:
        """Drop the last positions: ``max_length < 0`` removes that many, ``> 0`` keeps that many, and
        0 means what the installed transformers means by it (`_compat.crop_length`). The codebooks go
        back with the keys and values: entries installed by the dropped positions are uninstalled."""
        state = self.hyper_state
        current = state.num_positions if state is not None else int(self.get_seq_length())
        length = crop_length(current, max_length)
        if state is not None:
            state.crop(length)
        truncate_cache(self, length)

    def reset(self) -> None:
        """Empty the cache for new sequences (as transformers' caches do): the keys and values, and the
        codebooks with them, so the next forward starts from empty codebooks."""
        super().reset()
        truncate_cache(self, 0)  # up to 4.57 a dynamic cache's reset zeroes its keys but keeps their length
        self.hyper_state = None

    @property
    def is_croppable(self) -> bool:
        # transformers 5.24 asks before deferring its stop check by one (cropped) step.
        return True


class Zip2ZipCache(_CarriesHyperState, DynamicCache):
    """A `DynamicCache` carrying the batch's `HyperState` (``hyper_state``, None until first use)."""


class Zip2ZipStaticCache(_CarriesHyperState, StaticCache):
    """A `StaticCache` (keys and values preallocated for ``max_cache_len`` positions, the cache
    ``torch.compile`` wants) carrying the batch's `HyperState`. ``generate(cache_implementation="static")``
    makes one; build one yourself as ``Zip2ZipStaticCache(config=model.config.get_text_config(),
    max_cache_len=n)``."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.max_positions = max_cache_len  # how many positions it holds (the releases name it differently)
