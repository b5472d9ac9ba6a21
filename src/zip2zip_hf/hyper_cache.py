"""Per-sequence codebook state that travels with the KV cache.

A `HyperState` owns everything a forward needs to know about the codebooks of a batch and the rules
that keep them canonical: it consumes each block of ids (validating every id and recording, per
position, the legal hyper ids and the position id), knows which installed entries still lack
vectors, keeps those vectors, and selects, reorders, snapshots and restores rows. The model only asks
it questions.

What it answers for a block is a `ConsumedBlock` of tensors, and a whole-sequence forward can take
the same answers precomputed (`codebook_tensors`, made by the data collator off the critical path),
so that a training step has no Python pass over its ids.

A `Zip2ZipCache` is a `DynamicCache` that also carries a `HyperState`. Keeping the two in one object
means every place transformers reorders, repeats or selects cache rows (beam search,
``num_return_sequences``) moves the codebooks with the keys and values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .lzw import LZWCodec


__all__ = ["CODEBOOK_TENSOR_KEYS", "ConsumedBlock", "EntryBatch", "HyperState", "Zip2ZipCache", "codebook_tensors"]

# What `codebook_tensors` returns (and ``forward(codebooks=...)`` reads).
CODEBOOK_TENSOR_KEYS = ("lengths", "legal", "provisional", "provisional_lengths", "entries", "entry_lengths")


@dataclass
class ConsumedBlock:
    """What consuming one block of ids told us, per row and position, as tensors.

    The forward reads it with tensor operations only. `HyperState.consume` makes one from live
    streams, `from_codebook_tensors` from what `codebook_tensors` computed beforehand.

    Attributes:
        lengths: ``(B, T)`` how many base ids each id stands for; 0 exactly on padding.
        positions: ``(B, T)`` position ids (0 on padding).
        legal: ``(B, kept)`` how many hyper ids are legal next, after each kept position (ids
            ``V .. V + legal - 1``; the last is the provisional one where ``provisional_lengths > 0``).
            On padding it repeats the count of the real position before it.
        provisional: ``(B, kept, M)`` the base ids of that provisional slot, 0-padded.
        provisional_lengths: ``(B, kept)`` how many; 0 where no provisional slot is legal.
    """

    lengths: torch.LongTensor
    positions: torch.LongTensor
    legal: torch.LongTensor
    provisional: torch.LongTensor
    provisional_lengths: torch.LongTensor

    @property
    def real(self) -> torch.BoolTensor:
        """``(B, T)``: not padding."""
        return self.lengths > 0

    def to(self, device) -> ConsumedBlock:
        return ConsumedBlock(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    @classmethod
    def from_codebook_tensors(cls, tensors: dict, position_mode: str, keep: list[int]) -> ConsumedBlock:
        """The block a forward over whole sequences consumes, from `codebook_tensors`' output."""
        lengths = tensors["lengths"]
        kept = slice(None) if len(keep) == lengths.shape[1] else keep
        return cls(
            lengths=lengths,
            positions=_positions(lengths, position_mode),
            legal=tensors["legal"][:, kept],
            provisional=tensors["provisional"][:, kept],
            provisional_lengths=tensors["provisional_lengths"][:, kept],
        )


@dataclass
class EntryBatch:
    """Installed entries to encode: entry ``slots[i]`` of row ``rows[i]`` holds ``subtokens[i, :lengths[i]]``."""

    rows: list[int]
    slots: list[int]
    subtokens: torch.LongTensor  # (N, M), 0-padded
    lengths: torch.LongTensor  # (N,)


def codebook_tensors(
    codec: LZWCodec, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.LongTensor]:
    """What a forward over whole sequences needs to know about their codebooks, as tensors.

    Made where batches are made (`Zip2ZipDataCollator`, in DataLoader workers, in parallel with the
    device) and passed as ``forward(input_ids, ..., codebooks=...)``, so the step has no Python pass
    over the ids. Keys (`CODEBOOK_TENSOR_KEYS`): ``lengths``, ``legal``, ``provisional`` and
    ``provisional_lengths`` as in `ConsumedBlock` with every position kept; ``entries`` ``(B, E, M)``
    the base ids of each row's installed entries, entry k at index k, 0-padded (E: the most any row
    installs), and ``entry_lengths`` ``(B, E)`` (0 where a row has no entry k).

    Raises:
        ValueError: naming the first id outside the id space or not legal at its position.
    """
    ids = input_ids.tolist()
    real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool().tolist()
    _check_id_range(ids, codec.total_vocab_size)
    streams = [codec.stream() for _ in ids]
    lengths, legal, provisional, provisional_lengths = _consume_rows(
        streams, ids, real, range(input_ids.shape[1]), codec.max_subtokens
    )
    contents = [stream.codebook.to_list() for stream in streams]
    width, M = max(map(len, contents), default=0), codec.max_subtokens
    entries = [[_padded(c, M) for c in row] + [[0] * M] * (width - len(row)) for row in contents]
    entry_lengths = [[len(c) for c in row] + [0] * (width - len(row)) for row in contents]
    return {
        "lengths": lengths,
        "legal": legal,
        "provisional": provisional,
        "provisional_lengths": provisional_lengths,
        "entries": torch.tensor(entries, dtype=torch.long).reshape(len(ids), width, M),
        "entry_lengths": torch.tensor(entry_lengths, dtype=torch.long).reshape(len(ids), width),
    }


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
        _check_id_range(ids, self.codec.total_vocab_size)
        base_offsets = torch.tensor([stream.num_base_ids for stream in self.streams])
        real_offsets = torch.tensor(self.num_real_tokens)
        lengths, legal, provisional, provisional_lengths = _consume_rows(
            self.streams, ids, real, keep, self.codec.max_subtokens
        )
        self.num_real_tokens = [n + sum(row) for n, row in zip(self.num_real_tokens, real)]
        return ConsumedBlock(
            lengths=lengths,
            positions=_positions(lengths, position_mode, base_offsets, real_offsets),
            legal=legal,
            provisional=provisional,
            provisional_lengths=provisional_lengths,
        )

    # ------------------------------------------------------------------ hypertoken vectors

    def unencoded_entries(self) -> EntryBatch:
        """The installed entries that have no vectors yet."""
        V, M = self.codec.initial_vocab_size, self.codec.max_subtokens
        rows, slots, contents = [], [], []
        for b, stream in enumerate(self.streams):
            for k in range(self.num_encoded[b], stream.num_installed):
                rows.append(b)
                slots.append(k)
                contents.append(stream.codebook.get_subtokens(V + k))
        subtokens = torch.tensor([_padded(c, M) for c in contents], dtype=torch.long).reshape(len(contents), M)
        return EntryBatch(rows, slots, subtokens, torch.tensor([len(c) for c in contents], dtype=torch.long))

    def store(self, entries: EntryBatch, input_vectors: torch.Tensor, output_vectors: torch.Tensor) -> None:
        """Write the vectors of `unencoded_entries` (``input_vectors[i]`` for entry i)."""
        if not entries.rows:
            return
        for r, k in zip(entries.rows, entries.slots):
            self.num_encoded[r] = max(self.num_encoded[r], k + 1)
        self.input_table = _write(self.input_table, entries, input_vectors, self.batch_size)
        self.output_table = _write(self.output_table, entries, output_vectors, self.batch_size)

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


def _write(table: torch.Tensor | None, entries: EntryBatch, vectors: torch.Tensor, batch_size: int):
    """Scatter ``vectors`` into ``table[entries.rows, entries.slots]``, growing its capacity geometrically."""
    needed = max(entries.slots) + 1
    if table is None or table.shape[1] < needed:
        capacity = max(needed, 2 * (0 if table is None else table.shape[1]), 16)
        grown = vectors.new_zeros(batch_size, capacity, vectors.shape[-1])
        if table is not None:
            grown[:, : table.shape[1]] = table
        table = grown
    index = (torch.tensor(entries.rows, device=vectors.device), torch.tensor(entries.slots, device=vectors.device))
    if torch.is_grad_enabled() and (vectors.requires_grad or table.requires_grad):
        return table.index_put(index, vectors)  # out of place: autograd needs the old version
    table[index] = vectors.to(table.dtype)
    return table


def _check_id_range(ids: list[list[int]], total: int) -> None:
    """Every id, padding included, lies in ``[0, V + K)``: the embedding reads even the masked ones."""
    if min(map(min, ids)) >= 0 and max(map(max, ids)) < total:
        return
    b, t = next((b, t) for b, row in enumerate(ids) for t, i in enumerate(row) if not 0 <= i < total)
    raise ValueError(f"input_ids[{b}, {t}] = {ids[b][t]} is outside the id space [0, {total})")


def _consume_rows(streams, ids: list[list[int]], real: list[list[bool]], keep, max_subtokens: int):
    """Feed each row's real ids to its stream; return `ConsumedBlock`'s ``lengths``, ``legal``,
    ``provisional`` and ``provisional_lengths`` (at the ``keep`` positions).

    A ValueError names the first id not legal at its position; the streams are then part-way fed.
    """
    kept_at = {t: j for j, t in enumerate(keep)}
    lengths = [[0] * len(row) for row in ids]
    legal = [[0] * len(kept_at) for _ in ids]
    provisional = [[[0] * max_subtokens for _ in kept_at] for _ in ids]
    provisional_lengths = [[0] * len(kept_at) for _ in ids]
    for b, (row, row_real, stream) in enumerate(zip(ids, real, streams)):
        for t, (code, is_real) in enumerate(zip(row, row_real)):
            if is_real:
                before = stream.num_base_ids
                try:
                    stream.feed(code)
                except ValueError as error:
                    raise ValueError(f"input_ids[{b}, {t}]: {error}") from None
                lengths[b][t] = stream.num_base_ids - before
            j = kept_at.get(t)
            if j is None:
                continue
            content = stream.provisional_subtokens()
            legal[b][j] = stream.num_installed + (content is not None)
            if content is not None:
                provisional[b][j][: len(content)] = content
                provisional_lengths[b][j] = len(content)
    as_tensor = functools.partial(torch.tensor, dtype=torch.long)
    provisional = as_tensor(provisional).reshape(len(ids), len(kept_at), max_subtokens)
    return as_tensor(lengths), as_tensor(legal), provisional, as_tensor(provisional_lengths)


def _positions(lengths: torch.LongTensor, position_mode: str, base_offsets=None, real_offsets=None):
    """Position ids: in ``"base"`` mode an id takes the position of its last base id, in
    ``"compressed"`` mode each real id the next position; after ``*_offsets`` per row; 0 on padding."""
    real = lengths > 0
    steps, offsets = (lengths, base_offsets) if position_mode == "base" else (real.long(), real_offsets)
    positions = steps.cumsum(dim=1) - 1
    if offsets is not None:
        positions = positions + offsets.to(positions.device)[:, None]
    return positions.masked_fill(~real, 0)


def _padded(content, width: int) -> list[int]:
    return [*content, *[0] * (width - len(content))]


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
