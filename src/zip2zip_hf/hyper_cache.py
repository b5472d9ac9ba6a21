"""Per-sequence codebook state that travels with the KV cache.

A `HyperState` owns everything a forward needs to know about the codebooks of a batch and the rules
that keep them canonical: it consumes each block of ids (validating every id and recording, per
position, the legal hyper ids and the position id), knows which installed entries still lack
vectors, keeps those vectors, and selects, reorders, snapshots and restores rows. The model only asks
it questions.

A `Zip2ZipCache` is a `DynamicCache` that also carries a `HyperState`. Keeping the two in one object
means every place transformers reorders, repeats or selects cache rows (beam search,
``num_return_sequences``) moves the codebooks with the keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .lzw import LZWCodec


__all__ = ["ConsumedBlock", "HyperState", "Zip2ZipCache"]


@dataclass
class ConsumedBlock:
    """What consuming one block of ids told us, per row and position.

    Attributes:
        legal: ``(B, kept)``: how many hyper ids are legal next, after each kept position (ids
            ``V .. V + legal - 1``; the last may be the provisional one).
        positions: ``(B, T)`` position ids (0 on padding).
        real: ``(B, T)``: not padding.
        provisional_contents: the base ids of each legal provisional slot at a kept position.
        provisional_index: ``(row, kept index, slot)`` of each of those.
    """

    legal: torch.LongTensor
    positions: torch.LongTensor
    real: torch.BoolTensor
    provisional_contents: list[tuple[int, ...]]
    provisional_index: list[tuple[int, int, int]]


class HyperState:
    """Codebooks and hypertoken vectors of a batch, one row per sequence.

    Attributes:
        codec: the codec whose rules the codebooks follow.
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

    # ------------------------------------------------------------------ reading ids

    def consume(
        self, input_ids: torch.LongTensor, mask: torch.Tensor, keep: list[int], position_mode: str
    ) -> ConsumedBlock:
        """Feed each row's real (unmasked) ids to its stream; record legal sets and positions.

        Args:
            input_ids: ``(B, T)`` the new ids of each row.
            mask: ``(B, T)`` 0 on padding (skipped by the codebook).
            keep: the positions whose legal sets are wanted (those that get logits).
            position_mode: ``"base"`` (a position per base id) or ``"compressed"`` (one per id).

        A ValueError names the first id outside the id space (padding included) or not legal at its
        position; the streams are then part-way fed, which `restore` undoes.
        """
        ids, real = input_ids.tolist(), mask.bool().tolist()
        self._check_id_range(ids)
        kept_at = {t: j for j, t in enumerate(keep)}
        legal = [[0] * len(keep) for _ in ids]
        positions = [[0] * len(ids[0]) for _ in ids]
        provisional_contents, provisional_index = [], []
        for b, (row, row_real) in enumerate(zip(ids, real)):
            stream = self.streams[b]
            for t, (code, is_real) in enumerate(zip(row, row_real)):
                if is_real:
                    try:
                        stream.feed(code)
                    except ValueError as error:
                        raise ValueError(f"input_ids[{b}, {t}]: {error}") from None
                    self.num_real_tokens[b] += 1
                    positions[b][t] = (
                        stream.num_base_ids - 1 if position_mode == "base" else self.num_real_tokens[b] - 1
                    )
                j = kept_at.get(t)
                if j is None:
                    continue
                provisional = stream.provisional_subtokens()
                legal[b][j] = stream.num_installed + (provisional is not None)
                if provisional is not None:
                    provisional_contents.append(provisional)
                    provisional_index.append((b, j, stream.num_installed))
        return ConsumedBlock(
            legal=torch.tensor(legal, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            real=torch.tensor(real, dtype=torch.bool),
            provisional_contents=provisional_contents,
            provisional_index=provisional_index,
        )

    def _check_id_range(self, ids: list[list[int]]) -> None:
        """Every id, padding included, lies in ``[0, V + K)``: the embedding reads even the masked ones."""
        total = self.codec.total_vocab_size
        if min(map(min, ids)) >= 0 and max(map(max, ids)) < total:
            return
        b, t = next((b, t) for b, row in enumerate(ids) for t, i in enumerate(row) if not 0 <= i < total)
        raise ValueError(f"input_ids[{b}, {t}] = {ids[b][t]} is outside the id space [0, {total})")

    # ------------------------------------------------------------------ hypertoken vectors

    def unencoded_entries(self) -> tuple[list[int], list[int], list[tuple[int, ...]]]:
        """``(rows, slots, contents)`` of the installed entries that have no vectors yet."""
        V = self.codec.initial_vocab_size
        rows, slots, contents = [], [], []
        for b, stream in enumerate(self.streams):
            for k in range(self.num_encoded[b], stream.num_installed):
                rows.append(b)
                slots.append(k)
                contents.append(stream.codebook.get_subtokens(V + k))
        return rows, slots, contents

    def store(self, rows: list[int], slots: list[int], input_vectors: torch.Tensor, output_vectors: torch.Tensor):
        """Write the vectors of newly installed entries (row ``rows[i]``, entry ``slots[i]``)."""
        if not rows:
            return
        for r, k in zip(rows, slots):
            self.num_encoded[r] = max(self.num_encoded[r], k + 1)
        self.input_table = _write(self.input_table, rows, slots, input_vectors, self.batch_size)
        self.output_table = _write(self.output_table, rows, slots, output_vectors, self.batch_size)

    def input_vectors(self, rows: torch.LongTensor, slots: torch.LongTensor) -> torch.Tensor:
        """Input-side vectors of entries ``slots[i]`` of rows ``rows[i]`` (all encoded)."""
        return self.input_table[rows, slots]

    def output_vectors(self, width: int, like: torch.Tensor) -> torch.Tensor:
        """``(B, width, D)`` output-side vectors of entries ``0 .. width - 1``, zeros where none is
        stored (the provisional slot, uninstalled slots), in the dtype and device of ``like``."""
        table = self.output_table
        if table is None:
            table = like.new_zeros(self.batch_size, 0, like.shape[-1])
        if table.shape[1] < width:
            table = torch.nn.functional.pad(table, (0, 0, 0, width - table.shape[1]))
        return table[:, :width].to(like.dtype)

    # ------------------------------------------------------------------ rows and snapshots

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
