"""The tensor twin of the LZW codec: a batch's canonical codebooks on the model's device.

`DeviceCodebooks` follows exactly the rules of `lzw.LZWStream` (the oracle in its tests), with
tensor operations of fixed shape only, so a decoding step needs no host sync and CUDA graphs and
``torch.compile`` can capture it. `HyperState` switches a batch to it when decoding starts on an
accelerator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .codebook_blocks import EntryBatch
from .lzw import LZWCodec


__all__ = ["DeviceCodebooks", "padded", "select_rows", "static_address"]


class DeviceCodebooks:
    """The canonical codebooks of a batch as fixed-shape tensors on the model's device.

    The tensor twin of a row of `LZWStream`s for the decoding hot path: `feed` consumes one id per
    row with tensor operations only (no host sync, no Python loop over rows or ids, the same shapes
    every step, so CUDA graphs and ``torch.compile`` can capture it), and the codebook stays exactly
    the canonical one: each id is expanded to its base ids, which run through greedy LZW one by one
    (a fixed loop of M iterations, masked past each id's length). The Python streams are the oracle
    in the tests.

    Two tensors hold everything, each allocated once and only ever written in place (a decoding
    step is a launch-bound string of small kernels on a GPU, so each is read and written whole):

    * ``table``, ``(B, K + M, M + 3)``: per slot the entry's base ids (``content``, 0-padded, with
      one spare column), its ``length`` and its ``key`` (``prefix * V + last``: the code of its
      phrase without the last base id, and that id, as `Codebook` keys it), so one comparison finds
      an entry. Slots ``>= K`` are sinks that masked writes go to, so no write needs a branch. Slot
      ``num_installed`` holds the provisional id's content and length (0 where it is not legal)
      under a key nothing matches.
    * ``state``, ``(B, M + 7)``: per row the pending phrase ``w``, laid out as a table row plus its
      code (``pending_content``, ``pending_length``, its key when it is an entry, and ``pending``,
      -1 for none), then ``num_installed`` and the base ids and non-padding ids consumed
      (``num_base_ids``, ``num_real_tokens``). A snapshot is one copy of it.
    """

    def __init__(self, codec: LZWCodec, batch_size: int, device=None):
        V, K, M = codec.initial_vocab_size, codec.max_codebook_size, codec.max_subtokens
        self.codec = codec
        self.no_key = -V - 1  # below every key, even those of no pending phrase (-1 * V + id)
        self.table = torch.zeros(batch_size, K + M, M + 3, dtype=torch.long, device=device)
        self.table[..., M + 2] = self.no_key
        self.state = torch.zeros(batch_size, M + 7, dtype=torch.long, device=device)
        self.state[:, M + 3] = -1
        self.startable = torch.ones(V, dtype=torch.bool, device=device)  # may start a phrase: not disabled
        self.startable[sorted(codec.disabled_ids)] = False
        # w may grow by an id while 1 <= len(w) < M (a pending phrase that is not full).
        self.can_grow = (torch.arange(M + 1, device=device) >= 1) & (torch.arange(M + 1, device=device) < M)
        self.slot_ids = torch.arange(V, V + K, device=device)  # the id each slot is installed as
        self._row_ids = torch.arange(batch_size, device=device)

    # Views of the two tensors, by name.
    content = property(lambda self: self.table[..., : self.codec.max_subtokens])
    length = property(lambda self: self.table[..., self.codec.max_subtokens + 1])
    keys = property(lambda self: self.table[..., self.codec.max_subtokens + 2])
    pending_content = property(lambda self: self.state[:, : self.codec.max_subtokens])
    pending_length = property(lambda self: self.state[:, self.codec.max_subtokens + 1])
    pending = property(lambda self: self.state[:, self.codec.max_subtokens + 3])
    num_installed = property(lambda self: self.state[:, self.codec.max_subtokens + 4])
    num_base_ids = property(lambda self: self.state[:, self.codec.max_subtokens + 5])
    num_real_tokens = property(lambda self: self.state[:, self.codec.max_subtokens + 6])

    @property
    def batch_size(self) -> int:
        return len(self.state)

    @classmethod
    def from_streams(cls, codec: LZWCodec, streams, num_real_tokens, device=None) -> DeviceCodebooks:
        """The tensor state of Python streams (after a prefill: built once, not per step)."""
        state, M = cls(codec, len(streams)), codec.max_subtokens
        for b, stream in enumerate(streams):
            contents = stream.codebook.to_list()
            n = len(contents)
            state.keys[b, :n] = torch.tensor(list(stream.codebook._lookup), dtype=torch.long)
            state.content[b, :n] = torch.tensor([padded(c, M) for c in contents], dtype=torch.long).reshape(n, M)
            state.length[b, :n] = torch.tensor([len(c) for c in contents], dtype=torch.long)
            state.num_installed[b] = n
            if stream._w >= 0:
                phrase = stream.codebook.get_subtokens(stream._w)
                state.pending[b], state.pending_length[b] = stream._w, len(phrase)
                state.pending_content[b] = torch.tensor(padded(phrase, M))
            state.num_base_ids[b] = stream.num_base_ids
        state.num_real_tokens[:] = torch.tensor(num_real_tokens)
        state._write_provisional()
        return state.to(device)

    def to(self, device) -> DeviceCodebooks:
        for name in ("table", "state", "startable", "can_grow", "slot_ids", "_row_ids"):
            setattr(self, name, static_address(getattr(self, name).to(device)))
        return self

    # ------------------------------------------------------------------ reading

    def provisional(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """``(B, M)`` content and ``(B,)`` length of the provisional id ``V + num_installed``
        (``w + w[0]``); length 0 where it is not legal. Read from its slot, where every `feed` and
        `restore` writes it."""
        M = self.codec.max_subtokens
        slot = self.table[self._row_ids, self.num_installed]
        return slot[:, :M], slot[:, M + 1]

    def extending(
        self,
        codes: torch.LongTensor,
        rows: torch.LongTensor | None = None,
        num_installed: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """``(B, K)`` the base ids that would extend the phrase of ``codes`` (``(B,)``, -1 for none):
        the last id of each installed entry whose prefix it is, -1 elsewhere. An id starting with
        one is not what greedy LZW writes after it. Slots past the installed entries hold no key
        any prefix matches.

        ``rows`` (``(B,)``) names the codebook row each code reads (default: code b reads row b),
        and ``num_installed`` (``(B,)``) counts only the entries below it, those installed when the
        code was fed (default: all), for codes fed before the last (several per row in one step).
        """
        V, K = self.codec.initial_vocab_size, self.codec.max_codebook_size
        keys = self.keys[:, :K] if rows is None else self.keys[rows, :K]
        child = torch.div(keys, V, rounding_mode="floor") == codes[:, None]
        if num_installed is not None:
            child = child & (self.slot_ids < (num_installed + V)[:, None])
        return torch.where(child, keys.remainder(V), -1)

    @property
    def num_legal_hyper(self) -> torch.LongTensor:
        return self.num_installed + (self.provisional()[1] > 0)

    def expand(self, codes: torch.LongTensor, real: torch.BoolTensor):
        """``(B, M)`` base ids and ``(B,)`` count of one id per row, and ``(B,)`` its legality: 0
        legal next, 1 outside the id space, 2 a hyper id neither installed nor the provisional one.
        Ids that are not legal, and padding (not ``real``, only checked for the id space), expand to
        nothing."""
        V, K, M = self.codec.initial_vocab_size, self.codec.max_codebook_size, self.codec.max_subtokens
        slot = (codes - V).clamp(0, K)
        entry = self.table[self._row_ids, slot]
        is_hyper = codes >= V
        # Installed entries have a length of at least 2, the provisional slot its own (0: not legal).
        readable = (slot <= self.num_installed) & (entry[:, M + 1] > 0)
        content = torch.where(is_hyper[:, None], entry[:, :M], F.pad(codes.clamp(min=0)[:, None], (0, M - 1)))
        outside = codes.clamp(0, self.codec.total_vocab_size - 1) != codes
        unknown = real & (is_hyper > readable)
        legality = torch.where(outside, 1, torch.where(unknown, 2, 0))
        length = torch.where(real > (outside | unknown), torch.where(is_hyper, entry[:, M + 1], 1), 0)
        return content, length, legality

    def entries(self, slots: torch.LongTensor) -> EntryBatch:
        """The entries at ``slots`` (``(B, S)``, as `feed` gives them: sinks for none) as an
        `EntryBatch` of fixed size ``B * S`` with tensor ``rows`` and ``slots``."""
        M = self.codec.max_subtokens
        rows = self._row_ids[:, None].expand_as(slots)
        entries = self.table[rows, slots].reshape(-1, M + 3)
        return EntryBatch(
            rows=rows.reshape(-1), slots=slots.reshape(-1), subtokens=entries[:, :M], lengths=entries[:, M + 1]
        )

    # ------------------------------------------------------------------ feeding

    def feed(self, codes: torch.LongTensor, real: torch.BoolTensor) -> tuple[torch.LongTensor, ...]:
        """Consume one id per row (where ``real``).

        Returns ``(B,)`` the base ids each id stood for, ``(B, M)`` the slots of the entries it
        installed in creation order (a sink, ``>= K``, for none), and ``(B,)`` its legality (see
        `expand`). An id that is not legal stands for nothing.
        """
        V, K, M = self.codec.initial_vocab_size, self.codec.max_codebook_size, self.codec.max_subtokens
        content, length, legality = self.expand(codes, real)
        active = torch.arange(M, device=codes.device) < length[:, None]
        startable = self.startable[content]
        may_create = active & startable
        # The phrase after an id that extends nothing: the id alone (none for a disabled id).
        alone_code = torch.where(startable, content, -1)[..., None]
        alone = torch.cat([F.pad(content[..., None], (0, M)), startable[..., None].long(), alone_code, alone_code], -1)
        keys, rows = self.keys[:, :K], self._row_ids  # the sinks never match
        w, n = self.state[:, : M + 4], self.num_installed
        phrases, created = [w], []  # w after each base id (past an id's length, never kept)
        for i in range(M):
            c, w_length, w_code = content[:, i], w[:, M + 1], w[:, M + 3]
            key = torch.add(c, w_code, alpha=V)  # w + c; no pending phrase (-1) gives a key below every entry's
            code = ((keys == key[:, None]) * self.slot_ids).sum(dim=1)  # its id, 0 if not an entry (keys are unique)
            found = code > 0
            longer = w_length + 1
            create = (may_create[:, i] > found) & self.can_grow[w_length]
            target = torch.where(create, n, K)  # a sink when nothing is created (or the codebook is full)
            # w + c, as the table row to install and as the pending phrase when it is an entry.
            grown = w[:, : M + 1].scatter(1, w_length[:, None], c[:, None])
            grown = torch.cat([grown, longer[:, None], key[:, None], code[:, None]], dim=1)
            self.table.index_put_((rows, target), grown[:, : M + 3])
            created.append(target)
            n = n + create
            w = torch.where(found[:, None], grown, alone[:, i])
            phrases.append(w)
        w = torch.stack(phrases, dim=1)[rows, length]
        counts = self.state[:, M + 5 :] + torch.stack([length, real.long()], dim=1)
        self.state.copy_(torch.cat([w, n.clamp(max=K)[:, None], counts], dim=1))
        self._write_provisional()
        return length, torch.stack(created, dim=1), legality

    def _write_provisional(self) -> None:
        """Write the provisional id ``w + w[0]`` into slot ``num_installed``: its content, and its
        length where it is legal (w pending and not full, the codebook not full, and not already an
        entry), else 0."""
        V, K, M = self.codec.initial_vocab_size, self.codec.max_codebook_size, self.codec.max_subtokens
        w, w_length, n = self.state, self.pending_length, self.num_installed
        first = w[:, 0]
        content = w[:, : M + 1].scatter(1, w_length[:, None], first[:, None])
        installed = (self.keys[:, :K] == torch.add(first, self.pending, alpha=V)[:, None]).any(dim=1)
        legal = (self.can_grow[w_length] & (n < K)) > installed
        length = torch.where(legal, w_length + 1, 0)
        no_key = torch.full_like(length, self.no_key)
        self.table.index_put_((self._row_ids, n), torch.cat([content, length[:, None], no_key[:, None]], dim=1))

    # ------------------------------------------------------------------ rows and snapshots

    def select(self, rows: torch.LongTensor) -> None:
        self.table, self.state = select_rows(self.table, rows), select_rows(self.state, rows)
        if len(rows) != len(self._row_ids):
            self._row_ids = static_address(torch.arange(len(rows), device=rows.device))

    def snapshot(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """A record of the state (O(rows) on the device): `restore` returns to it after any feeding
        (not after a row selection). Written into ``into`` (a tensor shaped like ``state``, allocated
        once by the caller) when given, else a new tensor."""
        return self.state.clone() if into is None else into.copy_(self.state)

    def restore(self, snapshot: torch.Tensor) -> None:
        """Return to a `snapshot`. Entries installed since sit at slots at or past the restored
        ``num_installed``: their keys are cleared (so no lookup finds them), the next installs
        overwrite the rest, and the provisional slot is written again."""
        self.state.copy_(snapshot)
        slots = torch.arange(self.table.shape[1], device=self.table.device)
        self.keys.masked_fill_(slots >= self.num_installed[:, None], self.no_key)
        self._write_provisional()


def select_rows(tensor: torch.Tensor, rows: torch.LongTensor) -> torch.Tensor:
    """``tensor`` with row ``i`` taken from row ``rows[i]``: in place when the count stays (beam
    search reorders every step, and the state keeps its addresses), else a new static tensor."""
    selected = tensor.index_select(0, rows)
    if len(rows) == len(tensor):
        return tensor.copy_(selected)
    return static_address(selected)


def static_address(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a long-lived state tensor as living at a fixed address, as transformers' `StaticCache`
    does: ``torch.compile`` then treats it as state it mutates, not as an input to copy in."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


def padded(content, width: int) -> list[int]:
    return [*content, *[0] * (width - len(content))]
