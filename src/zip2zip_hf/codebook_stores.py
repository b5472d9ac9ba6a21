"""Where a batch's codebooks live: in Python streams on the host, or in tensors on the device.

`HyperState` keeps its codebooks in one of two stores that answer the same questions, declared once
by `CodebookStore` (consume a block, say which entries lack vectors, select rows, snapshot and
restore, feed recorded ids again, rebuild from ids), so that none of its methods asks which phase it
is in:

* `StreamStore`: one `LZWStream` per row. A prompt (a block of many ids) is one Python pass over
  its ids; on a CPU decoding stays here too, where a host sync costs nothing and an operation
  costs more than a Python step.
* `TensorStore`: `DeviceCodebooks`, fixed-shape tensors on the model's device, for decoding on an
  accelerator: every step is tensor work of one shape at fixed addresses, and nothing waits for
  the host: the legality of the ids is recorded on the device and read when the caller asks
  (after a user's forward; once per `generate`).

`StreamStore.for_step` hands a batch over to `TensorStore` at its first decoding step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .codebook_blocks import ConsumedBlock, EntryBatch, positions_of
from .device_codebooks import DeviceCodebooks, padded, select_rows, static_address
from .lzw import LZWCodec, LZWStream


__all__ = ["CodebookStore", "StreamStore", "TensorStore", "check_id_range", "check_positions", "consume_rows"]

# `TensorStore.first_illegal`'s verdict past `DeviceCodebooks.expand`'s (1: outside the id space, 2: not installed).
PAST_THE_POSITIONS = 3


class CodebookStore(Protocol):
    """What `HyperState` asks of the store its codebooks live in (`StreamStore`, `TensorStore`)."""

    max_positions: int | None  # the base model's positions: an id that needs one past them is illegal

    @property
    def batch_size(self) -> int: ...

    def for_step(self, input_ids: torch.LongTensor, on_device: bool) -> CodebookStore:
        """The store for this block: itself, or the codebooks moved to the device for a decoding step."""

    def consume(
        self, input_ids: torch.LongTensor, real: torch.Tensor, keep: list[int], position_mode: str, positions=None
    ) -> ConsumedBlock:
        """Feed each row's real ids to its codebook (see `HyperState.consume`)."""

    def raise_if_illegal(self, block_start: int | None = None) -> None:
        """Raise naming the first id fed that was not legal (a store that raised when fed: nothing)."""

    def positions_held(self, position_mode: str) -> torch.LongTensor:
        """``(B,)`` the positions each row's ids take so far (the next id's first position)."""

    def unencoded_entries(self) -> EntryBatch:
        """The installed entries that have no vectors yet."""

    def table_capacity(self, entries: EntryBatch, current: int) -> int:
        """Count ``entries`` as encoded; return the slots the tables need (0: nothing to store)."""

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and repeat or reorder) rows: row ``i`` becomes old row ``rows[i]``."""

    def snapshot(self) -> object:
        """A record `restore` returns to (valid for this store only)."""

    def restore(self, snapshot: object) -> None:
        """Return to a `snapshot`: entries installed since are uninstalled, counters reset."""

    def feed_again(self, ids: torch.LongTensor, real: torch.BoolTensor) -> None:
        """Feed ids recorded when they were first fed (legal then), past a restored snapshot."""

    def rebuild(self, streams: list[LZWStream], num_real_tokens: list[int]) -> None:
        """Take the codebooks of ``streams`` (fed anew from recorded ids)."""

    def keeping_vectors(self) -> contextlib.AbstractContextManager[None]:
        """Around a rewind: the entries still installed afterwards keep the vectors they had."""


@dataclass(frozen=True)
class StreamMarks:
    """A `StreamStore` snapshot: each stream's mark and the per-row counters."""

    marks: list
    num_encoded: list[int]
    num_real_tokens: list[int]


class StreamStore:
    """The codebooks of a batch as Python `LZWStream`s, one per row.

    Attributes:
        streams: the canonical LZW state of each row.
        num_encoded: per row, how many entries already have vectors in the tables.
        num_real_tokens: per row, how many non-padding ids were consumed.
    """

    def __init__(
        self,
        codec: LZWCodec,
        streams: list[LZWStream],
        num_real_tokens: list[int] | None = None,
        max_positions: int | None = None,
    ):
        self.codec = codec
        self.max_positions = max_positions
        self.streams = streams
        self.num_encoded = [0] * len(streams)
        self.num_real_tokens = num_real_tokens if num_real_tokens is not None else [0] * len(streams)

    @property
    def batch_size(self) -> int:
        return len(self.streams)

    def for_step(self, input_ids: torch.LongTensor, on_device: bool) -> StreamStore | TensorStore:
        """The store for a block: `TensorStore` from a decoding step (one id per row) on, if ``on_device``."""
        if input_ids.shape[1] == 1 and on_device:
            codebooks = DeviceCodebooks.from_streams(self.codec, self.streams, self.num_real_tokens, input_ids.device)
            return TensorStore(codebooks, self.max_positions)
        return self

    # Python over every id: eager even inside a compiled step, so that a compiled prompt costs graph
    # breaks, not a recompilation per codebook size.
    @torch.compiler.disable
    def consume(self, input_ids, real, keep: list[int], position_mode: str, positions=None) -> ConsumedBlock:
        ids, real = input_ids.tolist(), real.bool().tolist()
        check_id_range(ids, self.codec.total_vocab_size)
        base_offsets = torch.tensor([stream.num_base_ids for stream in self.streams])
        real_offsets = torch.tensor(self.num_real_tokens)
        lengths, legal, provisional, provisional_lengths, extending, entry_first_ids = consume_rows(
            self.streams, ids, real, keep, self.codec.max_subtokens
        )
        self.num_real_tokens = [n + sum(row) for n, row in zip(self.num_real_tokens, real)]
        positions = positions_of(lengths, position_mode, base_offsets, real_offsets)
        check_positions(positions, self.max_positions)
        return ConsumedBlock(
            lengths=lengths,
            positions=positions,
            legal=legal,
            provisional=provisional,
            provisional_lengths=provisional_lengths,
            extending=extending,
            entry_first_ids=entry_first_ids,
        )

    def raise_if_illegal(self, block_start: int | None = None) -> None:
        """Nothing: `consume` raised for an illegal id already."""

    def positions_held(self, position_mode: str) -> torch.LongTensor:
        """``(B,)`` the positions each row's ids take so far (the next id's first position)."""
        if position_mode == "base":
            return torch.tensor([stream.num_base_ids for stream in self.streams])
        return torch.tensor(self.num_real_tokens)

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
    def keeping_vectors(self) -> Iterator[None]:
        """Rewinding keeps the tables: entry k is the same phrase before and after, so the entries
        still installed afterwards keep the vectors they had."""
        encoded = self.num_encoded
        yield
        self.num_encoded = [min(e, s.num_installed) for e, s in zip(encoded, self.streams, strict=True)]


class TensorStore:
    """The codebooks of a batch as `DeviceCodebooks` on the model's device.

    Everything it keeps lives at fixed addresses, allocated once and written in place, so that a
    step captured in a CUDA graph never leaves the state holding the graph's own output: the
    codebooks, the snapshot buffer and ``first_illegal``, a sticky record of the first id that was
    not legal (per row: its verdict, 0 for none; its position in the sequence; the id). That record
    is read (a host sync) only when asked, `raise_if_illegal`: after every call of a user's
    forward, and once at the end of `generate`, whose ids come from masked logits.

    Attributes:
        codebooks: the tensors.
    """

    def __init__(self, codebooks: DeviceCodebooks, max_positions: int | None = None):
        self.codebooks = codebooks
        self.max_positions = max_positions
        device = codebooks.state.device
        self.first_illegal = static_address(torch.zeros(codebooks.batch_size, 3, dtype=torch.long, device=device))
        self._saved = (static_address(codebooks.snapshot()), static_address(self.first_illegal.clone()))
        self._created: torch.LongTensor | None = None  # (B, new slots) installed by the last block, until read

    @property
    def batch_size(self) -> int:
        return self.codebooks.batch_size

    def for_step(self, input_ids: torch.LongTensor, on_device: bool) -> TensorStore:
        return self

    def consume(self, input_ids, real, keep: list[int], position_mode: str, positions=None) -> ConsumedBlock:
        """Tensor operations only. The legality of the ids is recorded in ``first_illegal`` at their
        ``positions`` (``(T,)``, the cache positions of the block), not read."""
        codebooks, real = self.codebooks, real.bool()
        offsets = codebooks.state[:, -2:].clone()  # base ids and real ids before the block (`feed` updates in place)
        kept_at = set(keep)
        lengths, created, legality, legal, provisional, provisional_lengths = [], [], [], [], [], []
        extending = []
        for t in range(input_ids.shape[1]):
            fed, new, verdict = codebooks.feed(input_ids[:, t], real[:, t])
            lengths.append(fed)
            created.append(new)
            legality.append(verdict)
            if t in kept_at:
                content, content_length = codebooks.provisional()
                legal.append(codebooks.num_installed + (content_length > 0))
                provisional.append(content)
                provisional_lengths.append(content_length)
                extending.append(codebooks.extending(torch.where(real[:, t], input_ids[:, t], -1)))
        lengths, legality = _stacked(lengths), _stacked(legality)
        model_positions = positions_of(lengths, position_mode, offsets[:, 0], offsets[:, 1])
        if self.max_positions is not None:  # recorded as illegal, and never an index past the base's table
            legality = torch.where(model_positions >= self.max_positions, PAST_THE_POSITIONS, legality)
            model_positions = model_positions.clamp(max=self.max_positions - 1)
        self._record_illegal(legality, input_ids, positions)
        self._created = torch.cat(created, dim=1) if len(created) > 1 else created[0]
        return ConsumedBlock(
            lengths=lengths,
            positions=model_positions,
            legal=_stacked(legal),
            provisional=_stacked(provisional),
            provisional_lengths=_stacked(provisional_lengths),
            extending=_stacked(extending),
            entry_first_ids=codebooks.content[:, : codebooks.codec.max_codebook_size, 0],
        )

    def _record_illegal(self, legality: torch.LongTensor, input_ids: torch.LongTensor, positions) -> None:
        """Keep, per row, the first illegal id ever fed (a row that has one keeps it)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.to(input_ids.device).expand_as(input_ids)
        if legality.shape[1] > 1:  # the block's first illegal id per row (one id: that one)
            first = (legality != 0).int().argmax(dim=1, keepdim=True)
            legality, positions, input_ids = (x.gather(1, first) for x in (legality, positions, input_ids))
        found = torch.cat([legality, positions, input_ids], dim=1)
        self.first_illegal.copy_(torch.where(self.first_illegal[:, :1] == 0, found, self.first_illegal))

    @torch.compiler.disable  # a host sync by design: never part of a compiled step
    def raise_if_illegal(self, block_start: int | None = None) -> None:
        """Raise naming the first id fed that was not legal, if any (one host sync). With
        ``block_start``, the error names it by its index in the block that began there."""
        for b, (verdict, position, code) in enumerate(self.first_illegal.tolist()):
            if verdict == 0:
                continue
            name = (
                f"input_ids[{b}, {position - block_start}]"
                if block_start is not None
                else f"row {b}, position {position}"
            )
            if verdict == 1:
                raise ValueError(
                    f"{name} = {code} is outside the id space [0, {self.codebooks.codec.total_vocab_size})"
                )
            if verdict == PAST_THE_POSITIONS:
                raise ValueError(f"{name}: {past_the_positions(self.max_positions)}")
            raise ValueError(f"{name}: hyper id {code} is not installed (nor the provisional id) there")

    def positions_held(self, position_mode: str) -> torch.LongTensor:
        codebooks = self.codebooks
        return (codebooks.num_base_ids if position_mode == "base" else codebooks.num_real_tokens).clone()

    def unencoded_entries(self) -> EntryBatch:
        created, self._created = self._created, None  # a compiled step's output: never kept past it
        return self.codebooks.entries(created)

    def table_capacity(self, entries: EntryBatch, current: int) -> int:
        return self.codebooks.table.shape[1]  # every slot and the sinks: shapes never change

    def select(self, rows: torch.Tensor | list[int]) -> None:
        rows = torch.as_tensor(rows, device=self.codebooks.state.device)
        self.codebooks.select(rows)
        self.first_illegal = select_rows(self.first_illegal, rows)
        if len(self._saved[0]) != len(rows):  # what the buffer held is void now, whatever its size
            self._saved = (static_address(self.codebooks.snapshot()), static_address(self.first_illegal.clone()))

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Into the one snapshot buffer (a block's snapshot replaces the one before)."""
        self.codebooks.snapshot(into=self._saved[0])
        self._saved[1].copy_(self.first_illegal)
        return self._saved

    def restore(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.codebooks.restore(snapshot[0])
        self.first_illegal.copy_(snapshot[1])

    def feed_again(self, ids: torch.LongTensor, real: torch.BoolTensor) -> None:
        for t in range(ids.shape[1]):
            self.codebooks.feed(ids[:, t], real[:, t])

    def rebuild(self, streams: list[LZWStream], num_real_tokens: list[int]) -> None:
        """Copied into the tensors already there, whose addresses a captured CUDA graph holds."""
        codebooks = self.codebooks
        rebuilt = DeviceCodebooks.from_streams(codebooks.codec, streams, num_real_tokens, codebooks.state.device)
        codebooks.table.copy_(rebuilt.table)
        codebooks.state.copy_(rebuilt.state)

    def keeping_vectors(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the tables hold every slot


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor per position, stacked at dim 1 (a view when there is one)."""
    return tensors[0].unsqueeze(1) if len(tensors) == 1 else torch.stack(tensors, dim=1)


def check_positions(positions: torch.LongTensor, max_positions: int | None) -> None:
    """Every position lies within the base model's ``max_positions`` (its ``max_position_embeddings``)."""
    if max_positions is None or not positions.numel() or int(positions.max()) < max_positions:
        return
    b, t = (int(i) for i in torch.nonzero(positions >= max_positions)[0])
    raise ValueError(f"input_ids[{b}, {t}]: {past_the_positions(max_positions)}")


def past_the_positions(max_positions: int) -> str:
    return (
        f"it needs a position past the base model's last (it has {max_positions} positions, "
        "max_position_embeddings): in position_mode='base' a hypertoken takes one per base id"
    )


def check_id_range(ids: list[list[int]], total: int) -> None:
    """Every id, padding included, lies in ``[0, V + K)``: the embedding reads even the masked ones."""
    if min(map(min, ids)) >= 0 and max(map(max, ids)) < total:
        return
    b, t = next((b, t) for b, row in enumerate(ids) for t, i in enumerate(row) if not 0 <= i < total)
    raise ValueError(f"input_ids[{b}, {t}] = {ids[b][t]} is outside the id space [0, {total})")


def consume_rows(streams, ids: list[list[int]], real: list[list[bool]], keep, max_subtokens: int):
    """Feed each row's real ids to its stream; return `ConsumedBlock`'s ``lengths``, ``legal``,
    ``provisional`` and ``provisional_lengths`` (at the ``keep`` positions), ``extending`` (there)
    and ``entry_first_ids``.

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
    last_ids = [[(-1, 0)] * len(kept_at) for _ in ids]  # (the id there, entries installed) at each kept position
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
            last_ids[b][j] = (row[end] if row_real[end] else -1, stream.num_installed)
            if content is not None:
                provisional[b][j][: len(content)] = content
                provisional_lengths[b][j] = len(content)
    as_tensor = functools.partial(torch.tensor, dtype=torch.long)
    provisional = as_tensor(provisional).reshape(len(ids), len(kept_at), max_subtokens)
    extending, entry_first_ids = _extending(streams, last_ids)
    return (
        as_tensor(lengths),
        as_tensor(legal),
        provisional,
        as_tensor(provisional_lengths),
        extending,
        entry_first_ids,
    )


def _extending(streams, last_ids: list[list[tuple[int, int]]]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`ConsumedBlock`'s ``extending`` (``(B, kept, C)``, -1 padded, C >= 1) at the kept positions,
    each given as its id (-1 on padding) and the entries installed there, and ``entry_first_ids``.

    One pass over each row's codebook keys (``prefix * V + last``, in creation order) finds the
    children of every phrase and the first base id of every entry; a kept position extends by the
    last ids of its id's children installed by then (entry k was installed by then iff k is below
    that count). A phrase has one id, so its children are keyed by that id."""
    rows, firsts = [], []
    for stream, row_last_ids in zip(streams, last_ids):
        V = stream.codec.initial_vocab_size
        children: dict[int, list[tuple[int, int]]] = {}
        first: list[int] = []
        for k, key in enumerate(stream.codebook._lookup):
            prefix, last = divmod(key, V)
            children.setdefault(prefix, []).append((k, last))
            first.append(prefix if prefix < V else first[prefix - V])
        rows.append([[last for k, last in children.get(code, ()) if k < n] for code, n in row_last_ids])
        firsts.append(first)
    width = max((len(ids) for row in rows for ids in row), default=0) or 1
    kept = len(rows[0]) if rows else 0
    extending = torch.tensor(
        [[ids + [-1] * (width - len(ids)) for ids in row] for row in rows], dtype=torch.long
    ).reshape(len(rows), kept, width)
    num_entries = max(map(len, firsts), default=0)
    entry_first_ids = torch.tensor([f + [0] * (num_entries - len(f)) for f in firsts], dtype=torch.long)
    return extending, entry_first_ids.reshape(len(firsts), num_entries)
