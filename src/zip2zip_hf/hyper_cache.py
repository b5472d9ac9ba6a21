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
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from ._compat import crop_length, truncate_cache
from .lzw import LZWCodec


__all__ = [
    "ConsumedBlock",
    "DeviceCodebooks",
    "EntryBatch",
    "HyperState",
    "Zip2ZipCache",
    "Zip2ZipStaticCache",
]


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
    """Installed entries to encode: entry ``slots[i]`` of row ``rows[i]`` holds ``subtokens[i, :lengths[i]]``.

    ``rows`` and ``slots`` are None for precomputed codebooks (every row's whole codebook in order,
    ``B * E`` entries).
    """

    rows: torch.LongTensor | None  # (N,)
    slots: torch.LongTensor | None  # (N,)
    subtokens: torch.LongTensor  # (N, M), 0-padded
    lengths: torch.LongTensor  # (N,)


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
            self.input_table = _static(_grown(self.input_table, self.batch_size, capacity, vector_like))
            self.output_table = _static(_grown(self.output_table, self.batch_size, capacity, vector_like))

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
            positions=_positions(lengths, position_mode, base_offsets, real_offsets),
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
            _raise_if_illegal(legality, input_ids, self.codec.total_vocab_size)

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
        subtokens = torch.tensor([_padded(c, M) for c in contents], dtype=torch.long).reshape(len(contents), M)
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


class DeviceCodebooks:
    """The canonical codebooks of a batch as fixed-shape tensors on the model's device.

    The tensor twin of a row of `LZWStream`s for the decoding hot path: `feed` consumes one id per
    row with tensor operations only (no host sync, no Python loop over rows or ids, the same shapes
    every step, so CUDA graphs and ``torch.compile`` can capture it), and the codebook stays exactly
    the canonical one: each id is expanded to its base ids, which run through greedy LZW one by one
    (a fixed loop of M iterations, masked past each id's length). The Python streams are the oracle
    in the tests.

    Entry k of row b is ``content[b, k, :length[b, k]]``; ``keys[b, k]`` is ``prefix * V + last``
    (the code of its phrase without the last base id, and that id: the key `Codebook` uses), -1
    where no entry is installed, so one comparison finds an entry. Column K of every table is a
    sink that masked writes go to, so no write needs a branch.

    Attributes:
        num_installed: ``(B,)`` entries per row.
        pending / pending_length / pending_content: ``(B,)``, ``(B,)``, ``(B, M)``: code, length
            and base ids of the pending phrase ``w`` (-1 / 0 / zeros: none).
        num_base_ids / num_real_tokens: ``(B,)`` base ids and non-padding ids consumed.
    """

    # Per-row counters (what a snapshot holds) and all per-row tensors (what a row selection moves).
    _COUNTERS = (
        "num_installed",
        "pending",
        "pending_length",
        "pending_content",
        "provisional_content",
        "provisional_length",
        "num_base_ids",
        "num_real_tokens",
    )
    _FIELDS = ("keys", "content", "length", *_COUNTERS)

    def __init__(self, codec: LZWCodec, batch_size: int, device=None):
        V, K, M = codec.initial_vocab_size, codec.max_codebook_size, codec.max_subtokens
        self.codec = codec
        long = functools.partial(torch.zeros, dtype=torch.long, device=device)
        self.keys = long(batch_size, K + 1) - 1
        self.content = long(batch_size, K + 1, M)
        self.length = long(batch_size, K + 1)
        self.num_installed = long(batch_size)
        self.pending = long(batch_size) - 1
        self.pending_length = long(batch_size)
        self.pending_content = long(batch_size, M)
        self.provisional_content = long(batch_size, M)  # what `provisional` returns, kept up to date
        self.provisional_length = long(batch_size)
        self.num_base_ids = long(batch_size)
        self.num_real_tokens = long(batch_size)
        self.disabled = torch.zeros(V, dtype=torch.bool, device=device)
        self.disabled[sorted(codec.disabled_ids)] = True

    @classmethod
    def from_streams(cls, codec: LZWCodec, streams, num_real_tokens, device=None) -> DeviceCodebooks:
        """The tensor state of Python streams (after a prefill: built once, not per step)."""
        state, M = cls(codec, len(streams)), codec.max_subtokens
        for b, stream in enumerate(streams):
            contents = stream.codebook.to_list()
            n = len(contents)
            state.keys[b, :n] = torch.tensor(list(stream.codebook._lookup), dtype=torch.long)
            state.content[b, :n] = torch.tensor([_padded(c, M) for c in contents], dtype=torch.long).reshape(n, M)
            state.length[b, :n] = torch.tensor([len(c) for c in contents], dtype=torch.long)
            state.num_installed[b] = n
            if stream._w >= 0:
                phrase = stream.codebook.get_subtokens(stream._w)
                state.pending[b], state.pending_length[b] = stream._w, len(phrase)
                state.pending_content[b] = torch.tensor(_padded(phrase, M))
            state.num_base_ids[b] = stream.num_base_ids
        state.num_real_tokens[:] = torch.tensor(num_real_tokens)
        state.provisional_content, state.provisional_length = state._provisional()
        return state.to(device)

    def to(self, device) -> DeviceCodebooks:
        for name in (*self._FIELDS, "disabled"):
            setattr(self, name, _static(getattr(self, name).to(device)))
        return self

    # ------------------------------------------------------------------ reading

    def _key(self, base_ids: torch.LongTensor) -> torch.LongTensor:
        """The key of entry ``w + base_id`` per row; -2 (matching nothing) where no phrase is pending."""
        return torch.where(self.pending >= 0, self.pending * self.codec.initial_vocab_size + base_ids, -2)

    def provisional(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """``(B, M)`` content and ``(B,)`` length of the provisional id ``V + num_installed``
        (``w + w[0]``); length 0 where it is not legal. Computed once per fed id, not per read: these
        are the state's own tensors, which the next `feed` overwrites in place."""
        return self.provisional_content, self.provisional_length

    def _provisional(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        M, K = self.codec.max_subtokens, self.codec.max_codebook_size
        first = self.pending_content[:, :1]
        installed = (self.keys == self._key(first[:, 0])[:, None]).any(dim=1)
        legal = (self.pending >= 0) & (self.pending_length < M) & (self.num_installed < K) & ~installed
        content = self.pending_content.scatter(1, self.pending_length.clamp(max=M - 1)[:, None], first)
        return content, torch.where(legal, self.pending_length + 1, 0)

    @property
    def num_legal_hyper(self) -> torch.LongTensor:
        return self.num_installed + (self.provisional()[1] > 0)

    def expand(self, codes: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
        """``(B, M)`` base ids and ``(B,)`` count of one id per row, and ``(B,)`` its legality: 0
        legal next, 1 outside the id space, 2 a hyper id neither installed nor the provisional one
        (such ids expand to nothing)."""
        V, total = self.codec.initial_vocab_size, self.codec.total_vocab_size
        provisional, provisional_length = self.provisional()
        slots = (codes - V).clamp(0, self.codec.max_codebook_size)
        rows = torch.arange(len(codes), device=codes.device)
        is_provisional = (codes == V + self.num_installed) & (provisional_length > 0)
        is_hyper = codes >= V
        content = torch.where(
            is_hyper[:, None],
            self.content[rows, slots],
            F.pad(codes[:, None].clamp(min=0), (0, provisional.shape[1] - 1)),
        )
        content = torch.where(is_provisional[:, None], provisional, content)
        installed = is_hyper & (slots < self.num_installed)
        length = torch.where(is_provisional, provisional_length, torch.where(installed, self.length[rows, slots], 1))
        outside = (codes < 0) | (codes >= total)
        legality = torch.where(outside, 1, torch.where(is_hyper & ~installed & ~is_provisional, 2, 0))
        return content, torch.where(legality == 0, length, 0), legality

    def entries(self, slots: torch.LongTensor) -> EntryBatch:
        """The entries at ``slots`` (``(B, S)``, -1 for none, read as the sink) as an `EntryBatch`
        of fixed size ``B * S`` with tensor ``rows`` and ``slots``."""
        K = self.codec.max_codebook_size
        slots = torch.where(slots >= 0, slots, K)
        rows = torch.arange(len(slots), device=slots.device)[:, None].expand_as(slots)
        return EntryBatch(
            rows=rows.reshape(-1),
            slots=slots.reshape(-1),
            subtokens=self.content[rows, slots].reshape(-1, self.content.shape[-1]),
            lengths=self.length[rows, slots].reshape(-1),
        )

    # ------------------------------------------------------------------ feeding

    def feed(self, codes: torch.LongTensor, real: torch.BoolTensor) -> tuple[torch.LongTensor, ...]:
        """Consume one id per row (where ``real``).

        Returns ``(B,)`` the base ids each id stood for, ``(B, M)`` the slots of the entries it
        installed (-1 for none) in creation order, and ``(B,)`` its legality (see `expand`; padding
        is only checked for the id space). An id that is not legal stands for nothing.
        """
        V, K, M = self.codec.initial_vocab_size, self.codec.max_codebook_size, self.codec.max_subtokens
        buffers = {name: getattr(self, name) for name in self._COUNTERS}
        content, length, legality = self.expand(codes)
        legality = torch.where(real | (legality == 1), legality, 0)
        length = torch.where(real, length, 0)
        rows = torch.arange(len(codes), device=codes.device)
        created = []
        for i in range(M):
            active = i < length
            c = content[:, i]
            key = self._key(c)
            # Keys are unique: at most one match. (Not a max over bools: inductor's CPU code lacks it.)
            matches = self.keys == key[:, None]
            found, slot = matches.any(dim=1), matches.int().argmax(dim=1)
            extend = active & found
            create = active & ~found & (self.pending >= 0) & ~self.disabled[c]
            create &= (self.num_installed < K) & (self.pending_length < M)
            target = torch.where(create, self.num_installed, K)  # column K: the sink
            extended = self.pending_content.scatter(1, self.pending_length.clamp(max=M - 1)[:, None], c[:, None])
            self.keys[rows, target] = torch.where(create, key, -1)  # the sink never matches
            self.content[rows, target] = extended
            self.length[rows, target] = self.pending_length + 1
            created.append(torch.where(create, self.num_installed, -1))
            self.num_installed = self.num_installed + create
            # The next phrase: w + c when that is an entry, else c alone (none for a disabled c).
            fresh = active & ~extend
            starts = ~self.disabled[c]
            self.pending = torch.where(extend, V + slot, torch.where(fresh, torch.where(starts, c, -1), self.pending))
            self.pending_length = torch.where(
                extend, self.pending_length + 1, torch.where(fresh, starts.long(), self.pending_length)
            )
            alone = F.pad(c[:, None], (0, M - 1))
            self.pending_content = torch.where(
                extend[:, None], extended, torch.where(fresh[:, None], alone, self.pending_content)
            )
        self.num_base_ids = self.num_base_ids + length
        self.num_real_tokens = self.num_real_tokens + real.long()
        self.provisional_content, self.provisional_length = self._provisional()
        self._write_back(buffers)
        return length, torch.stack(created, dim=1), legality

    def _write_back(self, buffers: dict[str, torch.Tensor]) -> None:
        """Copy the counters into the tensors that held them before and keep those: the whole state
        lives at fixed addresses, mutated in place, as CUDA graphs (``mode="reduce-overhead"``) need."""
        for name, buffer in buffers.items():
            setattr(self, name, buffer.copy_(getattr(self, name)))

    # ------------------------------------------------------------------ rows and snapshots

    def select(self, rows: torch.LongTensor) -> None:
        for name in self._FIELDS:
            setattr(self, name, select_rows(getattr(self, name), rows))

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """A cheap record of the state (O(rows) on the device): `restore` returns to it after any
        feeding (not after a row selection)."""
        return tuple(getattr(self, name).clone() for name in self._COUNTERS)

    def restore(self, snapshot: tuple[torch.Tensor, ...]) -> None:
        """Return to a `snapshot`. Entries installed since sit at slots at or past the restored
        ``num_installed``: their keys are cleared (so no lookup finds them) and the next installs
        overwrite the rest."""
        for name, value in zip(self._COUNTERS, snapshot, strict=True):
            getattr(self, name).copy_(value)
        slots = torch.arange(self.keys.shape[1], device=self.keys.device)
        self.keys.masked_fill_(slots >= self.num_installed[:, None], -1)


def select_rows(tensor: torch.Tensor, rows: torch.LongTensor) -> torch.Tensor:
    """``tensor`` with row ``i`` taken from row ``rows[i]``: in place when the count stays (beam
    search reorders every step, and the state keeps its addresses), else a new static tensor."""
    selected = tensor.index_select(0, rows)
    if len(rows) == len(tensor):
        return tensor.copy_(selected)
    return _static(selected)


def _static(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a long-lived state tensor as living at a fixed address, as transformers' `StaticCache`
    does: ``torch.compile`` then treats it as state it mutates, not as an input to copy in."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


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


@torch.compiler.disable  # a host sync by design: never part of a compiled step
def _raise_if_illegal(legality: torch.LongTensor, input_ids: torch.LongTensor, total: int) -> None:
    """Raise for the first nonzero `DeviceCodebooks.legality` in ``(B, T)`` (one host sync)."""
    if not legality.any():
        return
    b, t = (int(i) for i in torch.nonzero(legality)[0])
    code = int(input_ids[b, t])
    if int(legality[b, t]) == 1:
        raise ValueError(f"input_ids[{b}, {t}] = {code} is outside the id space [0, {total})")
    raise ValueError(f"input_ids[{b}, {t}]: hyper id {code} is not installed (nor the provisional id) there")


def _check_id_range(ids: list[list[int]], total: int) -> None:
    """Every id, padding included, lies in ``[0, V + K)``: the embedding reads even the masked ones."""
    if min(map(min, ids)) >= 0 and max(map(max, ids)) < total:
        return
    b, t = next((b, t) for b, row in enumerate(ids) for t, i in enumerate(row) if not 0 <= i < total)
    raise ValueError(f"input_ids[{b}, {t}] = {ids[b][t]} is outside the id space [0, {total})")


def _consume_rows(streams, ids: list[list[int]], real: list[list[bool]], keep, max_subtokens: int):
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


class _CodebookRows:
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


class Zip2ZipCache(_CodebookRows, DynamicCache):
    """A `DynamicCache` carrying the batch's `HyperState` (``hyper_state``, None until first use)."""


class Zip2ZipStaticCache(_CodebookRows, StaticCache):
    """A `StaticCache` (keys and values preallocated for ``max_cache_len`` positions, the cache
    ``torch.compile`` wants) carrying the batch's `HyperState`. ``generate(cache_implementation="static")``
    makes one; build one yourself as ``Zip2ZipStaticCache(config=model.config.get_text_config(),
    max_cache_len=n)``."""

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.max_positions = max_cache_len  # how many positions it holds (the releases name it differently)
