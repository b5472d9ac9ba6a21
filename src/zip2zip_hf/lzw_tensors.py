"""The tensor twin of the LZW codec: a batch's canonical codebooks on the model's device.

`DeviceCodebooks` follows exactly the rules of `lzw.LZWStream` (the oracle in its tests), with
tensor operations of fixed shape only, so a decoding step needs no host sync and CUDA graphs and
``torch.compile`` can capture it. `HyperState` switches a batch to it when decoding starts on an
accelerator.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .codebook_blocks import EntryBatch
from .lzw import LZWCodec


__all__ = ["DeviceCodebooks", "padded", "raise_first_illegal", "select_rows", "static_address"]


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
            state.content[b, :n] = torch.tensor([padded(c, M) for c in contents], dtype=torch.long).reshape(n, M)
            state.length[b, :n] = torch.tensor([len(c) for c in contents], dtype=torch.long)
            state.num_installed[b] = n
            if stream._w >= 0:
                phrase = stream.codebook.get_subtokens(stream._w)
                state.pending[b], state.pending_length[b] = stream._w, len(phrase)
                state.pending_content[b] = torch.tensor(padded(phrase, M))
            state.num_base_ids[b] = stream.num_base_ids
        state.num_real_tokens[:] = torch.tensor(num_real_tokens)
        state.provisional_content, state.provisional_length = state._provisional()
        return state.to(device)

    def to(self, device) -> DeviceCodebooks:
        for name in (*self._FIELDS, "disabled"):
            setattr(self, name, static_address(getattr(self, name).to(device)))
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
    return static_address(selected)


def static_address(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a long-lived state tensor as living at a fixed address, as transformers' `StaticCache`
    does: ``torch.compile`` then treats it as state it mutates, not as an input to copy in."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)
    return tensor


@torch.compiler.disable  # a host sync by design: never part of a compiled step
def raise_first_illegal(legality: torch.LongTensor, input_ids: torch.LongTensor, total: int) -> None:
    """Raise for the first nonzero `DeviceCodebooks.legality` in ``(B, T)`` (one host sync)."""
    if not legality.any():
        return
    b, t = (int(i) for i in torch.nonzero(legality)[0])
    code = int(input_ids[b, t])
    if int(legality[b, t]) == 1:
        raise ValueError(f"input_ids[{b}, {t}] = {code} is outside the id space [0, {total})")
    raise ValueError(f"input_ids[{b}, {t}]: hyper id {code} is not installed (nor the provisional id) there")


def padded(content, width: int) -> list[int]:
    return [*content, *[0] * (width - len(content))]
