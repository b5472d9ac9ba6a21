"""What consuming a block of ids tells a forward, as tensors: the types every codebook store answers with.

`HyperState` (live codebooks), `DeviceCodebooks` (the same on the device) and `precomputed_block`
(codebooks made by the collator) all answer a block with a `ConsumedBlock` and the entries to
encode with an `EntryBatch`; the model reads both with tensor operations only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = ["ConsumedBlock", "EntryBatch", "positions_of"]


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
        provisional: ``(B, kept, M)`` the base ids of that provisional slot (what lies past
            ``provisional_lengths`` is never read).
        provisional_lengths: ``(B, kept)`` how many; 0 where no provisional slot is legal.
        extending: ``(B, kept, C)`` the base ids that would extend the phrase of the id at each kept
            position to an installed entry (-1 pads): greedy LZW never writes an id that starts with
            one of them next (it would have written the longer entry), so such ids are not canonical
            there.
        entry_first_ids: ``(B, E)`` the first base id of each installed entry, entry k at index k
            (as far as the block's legal counts reach; 0-padded).
    """

    lengths: torch.LongTensor
    positions: torch.LongTensor
    legal: torch.LongTensor
    provisional: torch.LongTensor
    provisional_lengths: torch.LongTensor
    extending: torch.LongTensor
    entry_first_ids: torch.LongTensor

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
            positions=positions_of(lengths, position_mode),
            legal=tensors["legal"][:, kept],
            provisional=tensors["provisional"][:, kept],
            provisional_lengths=tensors["provisional_lengths"][:, kept],
            extending=tensors["extending"][:, kept],
            entry_first_ids=tensors["entries"][..., 0],
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


def positions_of(lengths: torch.LongTensor, position_mode: str, base_offsets=None, real_offsets=None):
    """Position ids: in ``"base"`` mode an id takes the position of its last base id, in
    ``"compressed"`` mode each real id the next position; after ``*_offsets`` per row; 0 on padding."""
    real = lengths > 0
    steps, offsets = (lengths, base_offsets) if position_mode == "base" else (real.long(), real_offsets)
    positions = steps.cumsum(dim=1) - 1
    if offsets is not None:
        positions = positions + offsets.to(positions.device)[:, None]
    return torch.where(real, positions, 0)
