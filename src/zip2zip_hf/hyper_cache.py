"""Per-sequence codebook state that travels with the KV cache.

A `Zip2ZipCache` is a `DynamicCache` that also carries a `HyperState`: one canonical LZW stream
per row plus the hypertoken vectors computed so far. Keeping the two in one object means every
place transformers reorders, repeats or selects cache rows (beam search, ``num_return_sequences``,
contrastive batching) moves the codebooks with the keys and values.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .lzw import LZWCodec


__all__ = ["HyperState", "Zip2ZipCache"]


class HyperState:
    """Codebooks and hypertoken vectors of a batch, one row per sequence.

    Attributes:
        streams: the canonical LZW state of each row.
        input_table / output_table: ``(B, capacity, D)`` vectors of installed entries for the input
            embedding and the unembedding, entry k at index k; rows are filled lazily, never all K.
        num_encoded: per row, how many entries already have vectors in the tables.
        num_real_tokens: per row, how many non-padding ids were consumed (compressed positions).
    """

    def __init__(self, codec: LZWCodec, batch_size: int):
        self.codec = codec
        self.streams = [codec.stream() for _ in range(batch_size)]
        self.input_table: torch.Tensor | None = None
        self.output_table: torch.Tensor | None = None
        self.num_encoded = [0] * batch_size
        self.num_real_tokens = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.streams)

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and repeat or reorder) rows: row ``i`` becomes old row ``rows[i]``."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        # Beam search calls this every step: a row kept once keeps its stream object, and only a
        # duplicated row pays for copying its codebook.
        taken: set[int] = set()
        streams = []
        for r in rows:
            streams.append(self.streams[r].copy() if r in taken else self.streams[r])
            taken.add(r)
        self.streams = streams
        self.num_encoded = [self.num_encoded[r] for r in rows]
        self.num_real_tokens = [self.num_real_tokens[r] for r in rows]
        if self.input_table is not None:
            index = torch.tensor(rows, device=self.input_table.device)
            self.input_table = self.input_table.index_select(0, index)
            self.output_table = self.output_table.index_select(0, index)

    def snapshot(self) -> tuple:
        """A cheap record of the state (O(rows)): `restore` returns to it after any consuming and
        storing (not after a row selection)."""
        marks = [stream.mark() for stream in self.streams]
        return marks, list(self.num_encoded), list(self.num_real_tokens), self.input_table, self.output_table

    def restore(self, snapshot: tuple) -> None:
        """Return to a `snapshot`: entries installed since are uninstalled, counters and tables reset.

        Vectors stored since then sit in table slots at or past the restored ``num_encoded``, which
        count as free again, so the tables need no copy.
        """
        marks, self.num_encoded, self.num_real_tokens, self.input_table, self.output_table = snapshot
        for stream, mark in zip(self.streams, marks, strict=True):
            stream.rollback(mark)

    def store(self, rows: list[int], slots: list[int], input_vectors: torch.Tensor, output_vectors: torch.Tensor):
        """Write the vectors of newly installed entries (row ``rows[i]``, entry ``slots[i]``)."""
        if not rows:
            return
        for r, k in zip(rows, slots):
            self.num_encoded[r] = max(self.num_encoded[r], k + 1)
        self.input_table = _write(self.input_table, rows, slots, input_vectors, self.batch_size)
        self.output_table = _write(self.output_table, rows, slots, output_vectors, self.batch_size)


def _write(table: torch.Tensor | None, rows: list[int], slots: list[int], vectors: torch.Tensor, batch_size: int):
    """Scatter ``vectors`` into ``table[rows, slots]``, growing its capacity geometrically."""
    needed = max(slots) + 1
    if table is None or table.shape[1] < needed:
        capacity = max(needed, 2 * (0 if table is None else table.shape[1]), 16)
        grown = vectors.new_zeros(batch_size, capacity, vectors.shape[-1])
        if table is not None:
            grown[:, : table.shape[1]] = table
        table = grown
    index = (torch.tensor(rows, device=vectors.device), torch.tensor(slots, device=vectors.device))
    if torch.is_grad_enabled() and (vectors.requires_grad or table.requires_grad):
        return table.index_put(index, vectors)  # out of place: autograd needs the old version
    table[index] = vectors.to(table.dtype)
    return table


class Zip2ZipCache(DynamicCache):
    """A `DynamicCache` carrying the batch's `HyperState` (``hyper_state``, None until first use)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hyper_state: HyperState | None = None

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

    def crop(self, *args, **kwargs):
        raise NotImplementedError(
            "DynamicCache.crop is not supported for a zip2zip cache yet: rewinding would have to uninstall "
            "codebook entries (assisted and prompt-lookup decoding need it)"
        )

    @property
    def is_croppable(self) -> bool:
        # transformers 5.24 asks before deferring its stop check by one (cropped) step.
        return False
