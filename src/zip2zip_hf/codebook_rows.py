"""Where a batch's codebooks live: in Python streams on the host, or in tensors on the device.

`HyperState` keeps its codebooks in one of two stores that answer the same questions (consume a
block, say which entries lack vectors, select rows, snapshot and restore, feed recorded ids again,
rebuild from ids), so that none of its methods asks which phase it is in:

* `StreamRows`: one `LZWStream` per row. A prompt (a block of many ids) is one Python pass over
  its ids; on a CPU decoding stays here too, where a host sync costs nothing and an operation
  costs more than a Python step.
* `TensorRows`: `DeviceCodebooks`, fixed-shape tensors on the model's device, for decoding on an
  accelerator: every step is tensor work of one shape, and nothing waits for the host but the one
  legality check, read after the step is queued.

`StreamRows.for_step` hands a batch over to `TensorRows` at its first decoding step.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .codebook_blocks import ConsumedBlock, EntryBatch, positions_of
from .lzw import LZWCodec, LZWStream
from .lzw_tensors import DeviceCodebooks, padded, raise_first_illegal


__all__ = ["StreamRows", "TensorRows", "check_id_range", "consume_rows"]


@dataclass(frozen=True)
class StreamMarks:
    """A `StreamRows` snapshot: each stream's mark and the per-row counters."""

    marks: list
    num_encoded: list[int]
    num_real_tokens: list[int]


class StreamRows:
    """The codebooks of a batch as Python `LZWStream`s, one per row.

    Attributes:
        streams: the canonical LZW state of each row.
        num_encoded: per row, how many entries already have vectors in the tables.
        num_real_tokens: per row, how many non-padding ids were consumed.
    """

    def __init__(self, codec: LZWCodec, streams: list[LZWStream], num_real_tokens: list[int] | None = None):
        self.codec = codec
        self.streams = streams
        self.num_encoded = [0] * len(streams)
        self.num_real_tokens = num_real_tokens if num_real_tokens is not None else [0] * len(streams)

    @property
    def batch_size(self) -> int:
        return len(self.streams)

    def for_step(self, input_ids: torch.LongTensor, on_device: bool) -> StreamRows | TensorRows:
        """The store for a block: `TensorRows` from a decoding step (one id per row) on, if ``on_device``."""
        if input_ids.shape[1] == 1 and on_device:
            return TensorRows(
                DeviceCodebooks.from_streams(self.codec, self.streams, self.num_real_tokens, input_ids.device)
            )
        return self

    # Python over every id: eager even inside a compiled step, so that a compiled prompt costs graph
    # breaks, not a recompilation per codebook size.
    @torch.compiler.disable
    def consume(self, input_ids, real, keep: list[int], position_mode: str) -> ConsumedBlock:
        ids, real = input_ids.tolist(), real.bool().tolist()
        check_id_range(ids, self.codec.total_vocab_size)
        base_offsets = torch.tensor([stream.num_base_ids for stream in self.streams])
        real_offsets = torch.tensor(self.num_real_tokens)
        lengths, legal, provisional, provisional_lengths = consume_rows(
            self.streams, ids, real, keep, self.codec.max_subtokens
        )
        self.num_real_tokens = [n + sum(row) for n, row in zip(self.num_real_tokens, real)]
        return ConsumedBlock(
            lengths=lengths,
            positions=positions_of(lengths, position_mode, base_offsets, real_offsets),
            legal=legal,
            provisional=provisional,
            provisional_lengths=provisional_lengths,
        )

    def raise_if_illegal(self) -> None:
        """Nothing: `consume` raised for an illegal id already."""

    @torch.compiler.disable
    def unencoded_entries(self) -> EntryBatch:
        V, M = self.codec.initial_vocab_size, self.codec.max_subtokens
        rows, slots, contents = [], [], []
        for b, stream in enumerate(self.streams):
            for k in range(self.num_encoded[b], stream.num_installed):
                rows.append(b)
                slots.append(k)
                contents.append(stream.codebook.get_subtokens(V + k))
        subtokens = torch.tensor([padded(c, M) for c in contents], dtype=torch.long).reshape(len(contents), M)
        as_tensor = functools.partial(torch.tensor, dtype=torch.long)
        return EntryBatch(as_tensor(rows), as_tensor(slots), subtokens, as_tensor([len(c) for c in contents]))

    @torch.compiler.disable
    def table_capacity(self, entries: EntryBatch, current: int) -> int:
        """Count ``entries`` as encoded; return the slots the tables need (0: nothing to store)."""
        if not len(entries.slots):
            return 0
        rows, slots = entries.rows.tolist(), entries.slots.tolist()
        for r, k in zip(rows, slots):
            self.num_encoded[r] = max(self.num_encoded[r], k + 1)
        needed = max(slots) + 1
        return current if needed <= current else max(needed, 2 * current, 16)  # grow geometrically

    def select(self, rows: torch.Tensor | list[int]) -> None:
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

    def snapshot(self) -> StreamMarks:
        return StreamMarks(
            [stream.mark() for stream in self.streams], list(self.num_encoded), list(self.num_real_tokens)
        )

    def restore(self, snapshot: StreamMarks) -> None:
        for stream, mark in zip(self.streams, snapshot.marks, strict=True):
            stream.rollback(mark)
        self.num_encoded, self.num_real_tokens = list(snapshot.num_encoded), list(snapshot.num_real_tokens)

    def feed_again(self, ids: torch.LongTensor, real: torch.BoolTensor) -> None:
        self.consume(ids, real, [], "base")

    def rebuild(self, streams: list[LZWStream], num_real_tokens: list[int]) -> None:
        self.streams, self.num_real_tokens = streams, num_real_tokens

    @contextlib.contextmanager
    def keeping_vectors(self):
        """Rewinding keeps the tables: entry k is the same phrase before and after, so the entries
        still installed afterwards keep the vectors they had."""
        encoded = self.num_encoded
        yield
        self.num_encoded = [min(e, s.num_installed) for e, s in zip(encoded, self.streams, strict=True)]


class TensorRows:
    """The codebooks of a batch as `DeviceCodebooks` on the model's device.

    Attributes:
        codebooks: the tensors.
    """

    def __init__(self, codebooks: DeviceCodebooks):
        self.codebooks = codebooks
        self._created: torch.LongTensor | None = None  # (B, new slots) installed by the last block
        self._unchecked: tuple[torch.Tensor, torch.Tensor] | None = None  # the last block's legality

    @property
    def batch_size(self) -> int:
        return len(self.codebooks.pending)

    def for_step(self, input_ids: torch.LongTensor, on_device: bool) -> TensorRows:
        return self

    def consume(self, input_ids, real, keep: list[int], position_mode: str) -> ConsumedBlock:
        """Tensor operations only. The legality of the ids is computed, not yet read:
        `raise_if_illegal` reads it once the step is queued."""
        codebooks, real = self.codebooks, real.bool()
        # Copies: `feed` updates the state in place.
        base_offsets, real_offsets = codebooks.num_base_ids.clone(), codebooks.num_real_tokens.clone()
        kept_at = set(keep)
        lengths, created, legality, legal, provisional, provisional_lengths = [], [], [], [], [], []
        for t in range(input_ids.shape[1]):
            fed, new, verdict = codebooks.feed(input_ids[:, t], real[:, t])
            lengths.append(fed)
            created.append(new)
            legality.append(verdict)
            if t in kept_at:
                content, content_length = codebooks.provisional()
                legal.append(codebooks.num_installed + (content_length > 0))
                provisional.append(content.clone())
                provisional_lengths.append(content_length.clone())
        self._unchecked = (torch.stack(legality, dim=1), input_ids)
        self._created = torch.cat(created, dim=1)
        lengths = torch.stack(lengths, dim=1)
        return ConsumedBlock(
            lengths=lengths,
            positions=positions_of(lengths, position_mode, base_offsets, real_offsets),
            legal=torch.stack(legal, dim=1),
            provisional=torch.stack(provisional, dim=1),
            provisional_lengths=torch.stack(provisional_lengths, dim=1),
        )

    def raise_if_illegal(self) -> None:
        """Raise naming the first id of the last block that was not legal: the step's one host sync."""
        if self._unchecked is not None:
            legality, input_ids = self._unchecked
            self._unchecked = None
            raise_first_illegal(legality, input_ids, self.codebooks.codec.total_vocab_size)

    def unencoded_entries(self) -> EntryBatch:
        return self.codebooks.entries(self._created)

    def table_capacity(self, entries: EntryBatch, current: int) -> int:
        return self.codebooks.codec.max_codebook_size + 1  # every slot and the sink: shapes never change

    def select(self, rows: torch.Tensor | list[int]) -> None:
        self.codebooks.select(torch.as_tensor(rows, device=self.codebooks.pending.device))

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        return self.codebooks.snapshot()

    def restore(self, snapshot: tuple[torch.Tensor, ...]) -> None:
        self.codebooks.restore(snapshot)
        self._unchecked = None

    def feed_again(self, ids: torch.LongTensor, real: torch.BoolTensor) -> None:
        for t in range(ids.shape[1]):
            self.codebooks.feed(ids[:, t], real[:, t])

    def rebuild(self, streams: list[LZWStream], num_real_tokens: list[int]) -> None:
        """Copied into the tensors already there, whose addresses a captured CUDA graph holds."""
        codebooks = self.codebooks
        rebuilt = DeviceCodebooks.from_streams(codebooks.codec, streams, num_real_tokens, codebooks.pending.device)
        for name in DeviceCodebooks._FIELDS:
            getattr(codebooks, name).copy_(getattr(rebuilt, name))

    def keeping_vectors(self):
        return contextlib.nullcontext()  # the tables hold every slot


def check_id_range(ids: list[list[int]], total: int) -> None:
    """Every id, padding included, lies in ``[0, V + K)``: the embedding reads even the masked ones."""
    if min(map(min, ids)) >= 0 and max(map(max, ids)) < total:
        return
    b, t = next((b, t) for b, row in enumerate(ids) for t, i in enumerate(row) if not 0 <= i < total)
    raise ValueError(f"input_ids[{b}, {t}] = {ids[b][t]} is outside the id space [0, {total})")


def consume_rows(streams, ids: list[list[int]], real: list[list[bool]], keep, max_subtokens: int):
    """Feed each row's real ids to its stream; return `ConsumedBlock`'s ``lengths``, ``legal``,
    ``provisional`` and ``provisional_lengths`` (at the ``keep`` positions).

    The ids between two kept positions go to the stream in one call (a prompt whose last logits
    alone are kept: one call per row), as a call costs more than an id.
    A ValueError names the first id not legal at its position; the streams are then part-way fed.
    """
    kept_at = {t: j for j, t in enumerate(keep)}
    ends = sorted({*kept_at, len(ids[0]) - 1})
    lengths = [[0] * len(row) for row in ids]
    legal = [[0] * len(kept_at) for _ in ids]
    provisional = [[[0] * max_subtokens for _ in kept_at] for _ in ids]
    provisional_lengths = [[0] * len(kept_at) for _ in ids]
    for b, (row, row_real, stream) in enumerate(zip(ids, real, streams)):
        start = 0
        for end in ends:
            positions = [t for t in range(start, end + 1) if row_real[t]]
            fed, consumed = [], stream.num_codes
            try:
                stream.feed([row[t] for t in positions], lengths=fed)
            except ValueError as error:
                raise ValueError(f"input_ids[{b}, {positions[stream.num_codes - consumed]}]: {error}") from None
            for t, n in zip(positions, fed):
                lengths[b][t] = n
            start = end + 1
            j = kept_at.get(end)
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
