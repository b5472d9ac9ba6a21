"""Per-sequence codebook state: what a forward needs to know about the codebooks of a batch.

A `HyperState` owns the rules that keep a batch's codebooks canonical: it consumes each block of ids
(validating every id and recording, per position, the legal hyper ids and the position id), knows
which installed entries still lack vectors, keeps those vectors, and selects, reorders, snapshots,
restores and crops rows. The model only asks it questions. What it answers for a block is a
`ConsumedBlock` of tensors; a whole-sequence forward can take the same answers precomputed
(`precomputed_codebooks`), so that a training step has no Python pass over its ids.

It travels in a zip2zip cache (`cache_zip2zip`), so incremental calls continue it.
"""

from __future__ import annotations

import functools

import torch

from .codebook_blocks import ConsumedBlock, EntryBatch, positions_of
from .lzw import LZWCodec
from .lzw_tensors import DeviceCodebooks, padded, raise_first_illegal, select_rows, static_address


__all__ = ["HyperState", "check_id_range", "consume_rows"]


class HyperState:
    """Codebooks and hypertoken vectors of a batch, one row per sequence.

    Two phases. A prompt (a block of many ids) is read by Python `LZWStream`s, one pass over its
    ids, with the tables growing as entries arrive. On an accelerator (or when ``on_device`` says
    so) the first one-id step (decoding) moves the codebooks to the device as `DeviceCodebooks`
    once, and from then on every step is tensor work of fixed shape: the tables hold all K slots,
    each step encodes the (at most M per id) entries its ids install, and nothing waits for the
    host but the one legality check. On a CPU a host sync costs nothing and an operation costs more
    than a Python step, so the streams keep the codebooks there (about a third of the operations).

    Attributes:
        codec: the codec whose rules the codebooks follow.
        streams: the canonical LZW state of each row (None once on the device).
        device_codebooks: the same on the device, once decoding began (None before).
        input_table / output_table: ``(B, capacity, D)`` vectors of installed entries for the input
            embedding and the unembedding, entry k at index k; rows are filled lazily (all K + 1,
            the last a sink for masked writes, once on the device).
        num_encoded: per row, how many entries already have vectors in the tables (prompt phase).
        num_real_tokens: per row, how many non-padding ids were consumed (prompt phase).
        num_positions: how many positions (padding included) the rows hold: the cache's length,
            kept here as an int so that no step reads it back from the device (the model counts
            each block it ran).

    Every block that succeeded is recorded (`record`: its ids, and the snapshot before it), so that
    `crop` can return the state to any earlier length exactly: within the last block by restoring
    that snapshot and feeding the kept part of the block again (what speculative decoding needs
    after every verification), further back by rebuilding the codebooks from the recorded ids.
    """

    def __init__(self, codec: LZWCodec, batch_size: int, on_device: bool | None = None):
        self.codec = codec
        self.on_device = on_device  # None: on accelerators only
        self.streams = [codec.stream() for _ in range(batch_size)]
        self.device_codebooks: DeviceCodebooks | None = None
        self.input_table: torch.Tensor | None = None
        self.output_table: torch.Tensor | None = None
        self.num_encoded = [0] * batch_size
        self.num_real_tokens = [0] * batch_size
        self.num_positions = 0
        self._created: torch.LongTensor | None = None  # (B, new slots) installed by the last block
        self._unchecked: tuple[torch.Tensor, torch.Tensor] | None = None  # the last block's legality
        # What `crop` rewinds with: every id consumed so far, (B, capacity), -1 on padding, and the
        # snapshot taken before the last block.
        self._fed: torch.LongTensor | None = None
        self._before_last_block: tuple | None = None

    @property
    def batch_size(self) -> int:
        return len(self.streams) if self.device_codebooks is None else len(self.device_codebooks.pending)

    # ------------------------------------------------------------------ reading ids

    @torch.compiler.disable  # Python over the streams, once: never part of a compiled step
    def prepare(self, input_ids: torch.LongTensor, vector_like: torch.Tensor) -> None:
        """Move the codebooks to the device when this block is a decoding step (one id per row) and
        the device phase applies (see the class docstring), with tables of all K + 1 slots shaped
        like rows of ``vector_like``. Called eagerly before the step's `snapshot`, so a failed step
        rolls back within the phase it ran in, and a compiled step only ever sees the final shapes."""
        on_device = self.on_device if self.on_device is not None else input_ids.device.type != "cpu"
        if self.device_codebooks is None and input_ids.shape[1] == 1 and on_device:
            self.device_codebooks = DeviceCodebooks.from_streams(
                self.codec, self.streams, self.num_real_tokens, input_ids.device
            )
            self.streams = None
            self._before_last_block = None  # a snapshot of the other phase
            capacity = self.codec.max_codebook_size + 1
            self.input_table = static_address(_grown(self.input_table, self.batch_size, capacity, vector_like))
            self.output_table = static_address(_grown(self.output_table, self.batch_size, capacity, vector_like))

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
        if self.device_codebooks is not None:
            return self._consume_on_device(input_ids, mask.bool(), keep, position_mode)
        return self._consume_in_streams(input_ids, mask, keep, position_mode)

    # Python over every id, in either of these: eager even inside a compiled step, so that a compiled
    # prompt costs graph breaks, not a recompilation per codebook size.
    @torch.compiler.disable
    def _consume_in_streams(self, input_ids, mask, keep, position_mode) -> ConsumedBlock:
        ids, real = input_ids.tolist(), mask.bool().tolist()
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

    def _consume_on_device(self, input_ids, real, keep, position_mode) -> ConsumedBlock:
        """`consume` by `DeviceCodebooks`: tensor operations only. The legality of the ids is
        computed, not yet read: `raise_if_illegal` reads it once the step is queued."""
        codebooks = self.device_codebooks
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
        """Raise a ValueError naming the first id of the last block that was not legal.

        The prompt phase raised in `consume` already. In the device phase this is the step's one
        host sync, so the model calls it after queuing the base model: the host then waits only
        for work it would have waited for anyway (generate reads each step's tokens), and a failure
        is undone like any other (`snapshot` / `restore`).
        """
        if self._unchecked is not None:
            legality, input_ids = self._unchecked
            self._unchecked = None
            raise_first_illegal(legality, input_ids, self.codec.total_vocab_size)

    # ------------------------------------------------------------------ hypertoken vectors

    def unencoded_entries(self) -> EntryBatch:
        """The installed entries that have no vectors yet."""
        if self.device_codebooks is not None:
            return self.device_codebooks.entries(self._created)
        return self._unencoded_in_streams()

    @torch.compiler.disable
    def _unencoded_in_streams(self) -> EntryBatch:
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

    def store(
        self, entries: EntryBatch, input_vectors: torch.Tensor, output_vectors: torch.Tensor | None = None
    ) -> None:
        """Write the vectors of `unencoded_entries` (``input_vectors[i]`` for entry i); a model without
        a head (`Zip2ZipModel`) has no output vectors."""
        if self.device_codebooks is not None:  # every slot (K + 1 with the sink), so shapes never change
            capacity = self.codec.max_codebook_size + 1
        elif len(entries.slots):
            capacity = self._reserve(entries.rows, entries.slots)
        else:
            return
        self.input_table = _write(self.input_table, entries, input_vectors, self.batch_size, capacity)
        if output_vectors is not None:
            self.output_table = _write(self.output_table, entries, output_vectors, self.batch_size, capacity)

    @torch.compiler.disable
    def _reserve(self, rows: torch.LongTensor, slots: torch.LongTensor) -> int:
        """Count the prompt phase's entries ``slots`` of ``rows`` as encoded; return the tables' new capacity."""
        rows, slots = rows.tolist(), slots.tolist()
        for r, k in zip(rows, slots):
            self.num_encoded[r] = max(self.num_encoded[r], k + 1)
        current = 0 if self.input_table is None else self.input_table.shape[1]
        needed = max(slots) + 1
        return current if needed <= current else max(needed, 2 * current, 16)  # grow geometrically

    # ------------------------------------------------------------------ rows and snapshots

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and repeat or reorder) rows: row ``i`` becomes old row ``rows[i]``."""
        self._before_last_block = None  # a snapshot holds no rows to select
        if self._fed is not None:
            self._fed = self._fed.index_select(0, torch.as_tensor(rows, device=self._fed.device))
        if self.device_codebooks is not None:
            index = torch.as_tensor(rows, device=self.device_codebooks.pending.device)
            self.device_codebooks.select(index)
            self.input_table = select_rows(self.input_table, index)
            self.output_table = select_rows(self.output_table, index)
            return
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
        if self.device_codebooks is not None:
            return self.num_positions, self.device_codebooks.snapshot(), self.input_table, self.output_table
        marks = [stream.mark() for stream in self.streams]
        return (
            self.num_positions,
            marks,
            list(self.num_encoded),
            list(self.num_real_tokens),
            self.input_table,
            self.output_table,
        )

    def restore(self, snapshot: tuple) -> None:
        """Return to a `snapshot`: entries installed since are uninstalled, counters and tables reset.

        Vectors stored since then sit in table slots at or past the restored ``num_encoded``, which
        count as free again, so the tables need no copy.
        """
        if self.device_codebooks is not None:
            self.num_positions, device_snapshot, self.input_table, self.output_table = snapshot
            self.device_codebooks.restore(device_snapshot)
            self._unchecked = None
            return
        self.num_positions, marks, self.num_encoded, self.num_real_tokens, *tables = snapshot
        self.input_table, self.output_table = tables
        for stream, mark in zip(self.streams, marks, strict=True):
            stream.rollback(mark)

    # ------------------------------------------------------------------ rewinding

    def record(self, snapshot: tuple, input_ids: torch.LongTensor, mask: torch.Tensor) -> None:
        """Remember a block that succeeded: its ids (``-1`` on padding) and the `snapshot` taken
        before it. One write per block, on the ids' device, no host sync."""
        start, end = snapshot[0], self.num_positions
        if self._fed is None or self._fed.shape[1] < end:
            width = 0 if self._fed is None else self._fed.shape[1]
            grown = input_ids.new_full((self.batch_size, max(end, 2 * width, 16)), -1)
            if self._fed is not None:
                grown[:, :start] = self._fed[:, :start]
            self._fed = grown
        self._fed[:, start:end] = input_ids.masked_fill(~mask.bool(), -1)
        self._before_last_block = snapshot

    def crop(self, length: int) -> None:
        """Return to the state after the first ``length`` positions: the entries installed since are
        uninstalled and the counters restored, exactly as if only those positions had been fed.

        Within the last block this costs one snapshot restore and feeding the block's kept ids
        again; further back, the codebooks are rebuilt from the recorded ids (one host sync). The
        hypertoken vectors need no work: entry k is the same phrase before and after, and its
        vectors stay where they are.
        """
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.num_positions:
            raise ValueError(f"crop takes a length in [0, {self.num_positions}] (the positions held), got {length!r}")
        if length == self.num_positions:
            return
        snapshot, encoded = self._before_last_block, self.num_encoded
        if snapshot is not None and snapshot[0] <= length:
            tables = self.input_table, self.output_table
            self.restore(snapshot)
            self.input_table, self.output_table = tables
            if length > snapshot[0]:
                self._feed_again(self._fed[:, snapshot[0] : length])
        else:
            self._rebuild(self._fed[:, :length])
            self._before_last_block = None
        if self.streams is not None:  # vectors exist for the entries the tables held before
            self.num_encoded = [min(e, s.num_installed) for e, s in zip(encoded, self.streams, strict=True)]
        self.num_positions = length

    def _feed_again(self, fed: torch.LongTensor) -> None:
        """Feed recorded ids (``-1`` on padding) once more: they were legal when first fed."""
        ids, real = fed.clamp(min=0), fed >= 0
        if self.device_codebooks is None:
            self._consume_in_streams(ids, real, [], "base")
            return
        for t in range(ids.shape[1]):
            self.device_codebooks.feed(ids[:, t], real[:, t])

    @torch.compiler.disable
    def _rebuild(self, fed: torch.LongTensor) -> None:
        """The codebooks after the recorded ids ``fed`` (``-1`` on padding), fed anew to Python streams;
        on the device they are copied into the tensors already there, whose addresses a captured CUDA
        graph holds."""
        rows = [[i for i in row if i >= 0] for row in fed.tolist()]
        streams = [self.codec.stream() for _ in rows]
        for stream, row in zip(streams, rows):
            stream.feed(row)
        num_real_tokens = [len(row) for row in rows]
        if self.device_codebooks is None:
            self.streams, self.num_real_tokens = streams, num_real_tokens
            return
        codebooks = self.device_codebooks
        rebuilt = DeviceCodebooks.from_streams(self.codec, streams, num_real_tokens, codebooks.pending.device)
        for name in DeviceCodebooks._FIELDS:
            getattr(codebooks, name).copy_(getattr(rebuilt, name))


def _write(table, entries: EntryBatch, vectors: torch.Tensor, batch_size: int, capacity: int) -> torch.Tensor:
    """Scatter ``vectors`` into ``table[entries.rows, entries.slots]``, first growing the table to
    ``capacity`` slots if it has fewer."""
    table = _grown(table, batch_size, capacity, vectors)
    index = (entries.rows.to(vectors.device), entries.slots.to(vectors.device))
    if torch.is_grad_enabled() and (vectors.requires_grad or table.requires_grad):
        return table.index_put(index, vectors)  # out of place: autograd needs the old version
    table[index] = vectors.to(table.dtype)
    return table


def _grown(table: torch.Tensor | None, batch_size: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    """``table`` if it has ``capacity`` slots, else a zero table that large (vectors shaped, typed and
    placed like rows of ``like``) holding its rows."""
    if table is not None and table.shape[1] >= capacity:
        return table
    grown = like.new_zeros(batch_size, capacity, like.shape[-1])
    if table is not None:
        grown[:, : table.shape[1]] = table
    return grown


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
