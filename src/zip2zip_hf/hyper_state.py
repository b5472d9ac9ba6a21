"""Per-sequence codebook state: what a forward needs to know about the codebooks of a batch.

A `HyperState` owns the rules that keep a batch's codebooks canonical: it consumes each block of ids
(validating every id and recording, per position, the legal hyper ids and the position id), knows
which installed entries still lack vectors, keeps those vectors, and selects, reorders, snapshots,
restores and crops rows. The model asks it one question per block (`HyperState.block`). What it
answers is a `ConsumedBlock` of tensors; a whole-sequence forward can take the same answers
precomputed (`precomputed_codebooks`), so that a training step has no Python pass over its ids.

It travels in a zip2zip cache (`cache_zip2zip`), so incremental calls continue it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .codebook_blocks import ConsumedBlock, EntryBatch
from .codebook_stores import CodebookStore, StreamStore
from .device_codebooks import select_rows, static_address
from .lzw import LZWCodec


__all__ = ["DeferredLegalityChecks", "HyperState", "StateSnapshot"]


@dataclass(frozen=True)
class StateSnapshot:
    """What `HyperState.restore` returns to: the positions held, the codebook store's own record
    (valid for the store that made it), and the tables."""

    num_positions: int
    store: object
    input_table: torch.Tensor | None
    output_table: torch.Tensor | None


class DeferredLegalityChecks:
    """Legality checks a caller reads once, after many forwards, instead of after each (what
    `generate` passes to its forwards: its ids come from masked logits, and a decoding step should
    never wait for the host). The forward adds its state; `raise_if_illegal` reads them all."""

    def __init__(self):
        self._states: list[HyperState] = []

    def add(self, state: HyperState) -> None:
        if all(seen is not state for seen in self._states):
            self._states.append(state)

    def raise_if_illegal(self) -> None:
        for state in self._states:
            state.raise_if_illegal()

    @property
    def states(self) -> list[HyperState]:
        return list(self._states)


class HyperState:
    """Codebooks and hypertoken vectors of a batch, one row per sequence.

    The codebooks live in ``store``, a `CodebookStore`: Python streams for a prompt, and, on an
    accelerator (or as `place_codebooks` says), tensors on the device from the first decoding step
    on (`codebook_stores`); either answers every question the same way.

    Attributes:
        codec: the codec whose rules the codebooks follow.
        store: the codebooks (`StreamStore` or `TensorStore`).
        input_table / output_table: ``(B, capacity, D)`` vectors of installed entries for the input
            embedding and the unembedding, entry k at index k; rows are filled lazily (all K + M,
            the last M sinks for masked writes, once on the device). A model without a head has no
            output table.
        num_positions: how many positions (padding included) the rows hold: the cache's length,
            kept here as an int so that no step reads it back from the device.

    Every block that succeeded is recorded (its ids, and the snapshot before it), so that `crop`
    can return the state to any earlier length exactly: within the last block by restoring that
    snapshot and feeding the kept part of the block again (what speculative decoding needs after
    every verification), further back by rebuilding the codebooks from the recorded ids.
    """

    def __init__(
        self,
        codec: LZWCodec,
        batch_size: int,
        on_device: bool | None = None,
        has_head: bool = True,
        max_positions: int | None = None,
    ):
        self.codec = codec
        self._on_device: bool | None = None
        self.place_codebooks(on_device)
        self.has_head = has_head
        streams = [codec.stream() for _ in range(batch_size)]
        self.store: CodebookStore = StreamStore(codec, streams, max_positions=max_positions)
        self.input_table: torch.Tensor | None = None
        self.output_table: torch.Tensor | None = None
        self.num_positions = 0
        # What `crop` rewinds with: every id consumed so far, (B, capacity), -1 on padding, and the
        # snapshot taken before the last block.
        self._fed: torch.LongTensor | None = None
        self._before_last_block: StateSnapshot | None = None

    @property
    def batch_size(self) -> int:
        return self.store.batch_size

    # ------------------------------------------------------------------ a block of ids

    def place_codebooks(self, on_device: bool | None) -> None:
        """Where the codebooks go for the decoding steps to come (`prepare` moves them): True to the
        device of the ids (`TensorStore`), False nowhere (Python streams), None to an accelerator
        only. The one place this policy is set: the model's ``codebooks_on_device`` when the state
        is made, and whoever drives the steps afterwards (speculative decoding keeps streams)."""
        if on_device not in (None, True, False):
            raise ValueError(f"on_device must be None, True or False, got {on_device!r}")
        self._on_device = on_device

    @torch.compiler.disable  # Python over the streams, once: never part of a compiled step
    def prepare(
        self, input_ids: torch.LongTensor, vector_like: torch.Tensor, max_positions: int | None = None
    ) -> None:
        """Move the codebooks to the device when this block is a decoding step and the device
        applies (see `codebook_stores`), with tables of every slot shaped like rows of
        ``vector_like``, and, for a static cache of ``max_positions``, the record of fed ids at its
        full length. Called eagerly before the block, so a failed block rolls back within the store
        it ran in, and a compiled step only ever sees the final shapes and addresses."""
        if max_positions is not None and (self._fed is None or self._fed.shape[1] < max_positions):
            self._fed = static_address(_grown_fed(self._fed, self.batch_size, max_positions, input_ids))
        on_device = self._on_device if self._on_device is not None else input_ids.device.type != "cpu"
        store = self.store.for_step(input_ids, on_device)
        if store is self.store:
            return
        self.store, self._before_last_block = store, None  # that snapshot belongs to the other store
        capacity = self.codec.max_codebook_size + self.codec.max_subtokens  # every slot and the sinks
        self.input_table = static_address(_grown(self.input_table, self.batch_size, capacity, vector_like))
        if self.has_head:
            self.output_table = static_address(_grown(self.output_table, self.batch_size, capacity, vector_like))

    @contextlib.contextmanager
    def block(
        self, input_ids: torch.LongTensor, mask: torch.Tensor, deferred: DeferredLegalityChecks | None = None
    ) -> Iterator[None]:
        """One block of ids, all or nothing. Inside it the model calls `consume`,
        `unencoded_entries`, `write_input_vectors` and (with a head) `write_output_vectors`; when it
        ends, the block's positions are counted and the legality of its ids is read (on the device,
        a host sync), unless ``deferred`` takes this state to read it later. If anything raised, the
        state is as it was before; else the block is recorded (what `crop` rewinds with). The
        bookkeeping around the block stays eager."""
        snapshot = self.snapshot()
        try:
            yield
            self._commit(snapshot, input_ids, mask, deferred)
        except BaseException:
            self.restore(snapshot)
            raise

    @torch.compiler.disable
    def _commit(self, snapshot: StateSnapshot, input_ids, mask, deferred: DeferredLegalityChecks | None) -> None:
        if deferred is None:
            self.store.raise_if_illegal(block_start=snapshot.num_positions)
        else:
            deferred.add(self)
        self.num_positions += input_ids.shape[1]
        self._record(snapshot, input_ids, mask)

    @torch.compiler.disable
    def positions_held(self, position_mode: str) -> torch.LongTensor:
        """``(B,)`` the positions each row's ids take so far, where the codebooks are (``position_mode``
        as the model's: base ids, or ids)."""
        return self.store.positions_held(position_mode)

    @torch.compiler.disable
    def raise_if_illegal(self) -> None:
        """Raise naming the first id fed since the codebooks moved to the device that was not legal
        (a host sync); the Python streams raise for one as they read it."""
        self.store.raise_if_illegal()

    def consume(
        self,
        input_ids: torch.LongTensor,
        mask: torch.Tensor,
        keep: list[int],
        position_mode: str,
        positions: torch.LongTensor | None = None,
    ) -> ConsumedBlock:
        """Feed each row's real (unmasked) ids to its codebook; record legal sets and positions.

        Args:
            input_ids: ``(B, T)`` the new ids of each row.
            mask: ``(B, T)`` 0 on padding (skipped by the codebook).
            keep: the positions whose legal sets are wanted (those that get logits).
            position_mode: ``"base"`` (a position per base id) or ``"compressed"`` (one per id).
            positions: ``(T,)`` the block's positions in the cache (what an illegal id is named by).

        An id outside the id space (padding included) or not legal at its position is a ValueError,
        raised here or, on the device, when the block ends (or when the caller reads it).
        """
        return self.store.consume(input_ids, mask, keep, position_mode, positions)

    def unencoded_entries(self) -> EntryBatch:
        """The installed entries that have no vectors yet."""
        return self.store.unencoded_entries()

    def write_input_vectors(self, entries: EntryBatch, vectors: torch.Tensor) -> torch.Tensor | None:
        """Write the input vectors of `unencoded_entries` (``vectors[i]`` for entry i), count those
        entries as encoded and size the tables; return the input table. The output side of the same
        entries, when the model has a head, follows (`write_output_vectors`)."""
        current = 0 if self.input_table is None else self.input_table.shape[1]
        capacity = self.store.table_capacity(entries, current)
        if capacity and len(vectors):
            self.input_table = _write(self.input_table, entries, vectors, self.batch_size, capacity)
        return self.input_table

    def write_output_vectors(self, entries: EntryBatch, vectors: torch.Tensor) -> torch.Tensor | None:
        """Write the output vectors of the entries `write_input_vectors` has just written (the output
        table is as large as the input table); return the output table."""
        if len(vectors):
            if self.input_table is None:
                raise RuntimeError("write_output_vectors follows write_input_vectors of the same entries")
            self.output_table = _write(self.output_table, entries, vectors, self.batch_size, self.input_table.shape[1])
        return self.output_table

    # ------------------------------------------------------------------ rows and snapshots

    @torch.compiler.disable
    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep (and repeat or reorder) rows: row ``i`` becomes old row ``rows[i]``."""
        self._before_last_block = None  # a snapshot holds no rows to select
        self.store.select(rows)
        if self._fed is not None:
            self._fed = select_rows(self._fed, torch.as_tensor(rows, device=self._fed.device))
        for name in ("input_table", "output_table"):
            table = getattr(self, name)
            if table is not None:
                setattr(self, name, select_rows(table, torch.as_tensor(rows, device=table.device)))

    @torch.compiler.disable
    def snapshot(self) -> StateSnapshot:
        """A cheap record of the state (O(rows)): `restore` returns to it after any consuming and
        storing (not after a row selection)."""
        return StateSnapshot(self.num_positions, self.store.snapshot(), self.input_table, self.output_table)

    @torch.compiler.disable
    def restore(self, snapshot: StateSnapshot) -> None:
        """Return to a `snapshot`: entries installed since are uninstalled, counters and tables reset.

        Vectors stored since then sit in table slots at or past the restored counts, which count as
        free again, so the tables need no copy.
        """
        self.store.restore(snapshot.store)
        self.num_positions, self.input_table, self.output_table = (
            snapshot.num_positions,
            snapshot.input_table,
            snapshot.output_table,
        )

    # ------------------------------------------------------------------ rewinding

    def _record(self, snapshot: StateSnapshot, input_ids: torch.LongTensor, mask: torch.Tensor) -> None:
        """Remember a block that succeeded: its ids (``-1`` on padding) and the `snapshot` taken
        before it. One write per block, on the ids' device, no host sync; the record grows
        geometrically with a dynamic cache, and is as long as a static cache from the start."""
        start, end = snapshot.num_positions, self.num_positions
        if self._fed is None or self._fed.shape[1] < end:
            width = 0 if self._fed is None else self._fed.shape[1]
            self._fed = static_address(_grown_fed(self._fed, self.batch_size, max(end, 2 * width, 16), input_ids))
        self._fed[:, start:end] = input_ids.masked_fill(~mask.bool(), -1)
        self._before_last_block = snapshot

    @torch.compiler.disable
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
        snapshot = self._before_last_block
        with self.store.keeping_vectors():
            if snapshot is not None and snapshot.num_positions <= length:
                self.store.restore(snapshot.store)
                if length > snapshot.num_positions:
                    fed = self._fed[:, snapshot.num_positions : length]
                    self.store.feed_again(fed.clamp(min=0), fed >= 0)  # legal when first fed
            else:
                self._rebuild(self._fed[:, :length])
                self._before_last_block = None
        self.num_positions = length

    def _rebuild(self, fed: torch.LongTensor) -> None:
        """The codebooks after the recorded ids ``fed`` (``-1`` on padding), fed anew to streams."""
        rows = [[i for i in row if i >= 0] for row in fed.tolist()]
        streams = [self.codec.stream() for _ in rows]
        for stream, row in zip(streams, rows):
            stream.feed(row)
        self.store.rebuild(streams, [len(row) for row in rows])


def _write(table, entries: EntryBatch, vectors: torch.Tensor, batch_size: int, capacity: int) -> torch.Tensor:
    """Scatter ``vectors`` into ``table[entries.rows, entries.slots]``, first growing the table to
    ``capacity`` slots if it has fewer."""
    table = _grown(table, batch_size, capacity, vectors)
    index = (entries.rows.to(vectors.device), entries.slots.to(vectors.device))
    if torch.is_grad_enabled() and (vectors.requires_grad or table.requires_grad):
        return table.index_put(index, vectors)  # out of place: autograd needs the old version
    table[index] = vectors.to(table.dtype)
    return table


def _grown_fed(fed: torch.Tensor | None, batch_size: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A record of fed ids ``width`` long (``-1``: nothing fed there) holding ``fed``."""
    grown = like.new_full((batch_size, width), -1)
    if fed is not None:
        grown[:, : fed.shape[1]] = fed
    return grown


def _grown(table: torch.Tensor | None, batch_size: int, capacity: int, like: torch.Tensor) -> torch.Tensor:
    """``table`` if it has ``capacity`` slots, else a zero table that large (vectors shaped, typed and
    placed like rows of ``like``) holding its rows."""
    if table is not None and table.shape[1] >= capacity:
        return table
    grown = like.new_zeros(batch_size, capacity, like.shape[-1])
    if table is not None:
        grown[:, : table.shape[1]] = table
    return grown
