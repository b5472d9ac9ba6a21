"""Codebooks of whole sequences as tensors, made where batches are made and checked where read.

`codebook_tensors` runs the codec over a batch once (in a DataLoader worker, off the device's
critical path); ``forward(input_ids, ..., codebooks=...)`` then needs no Python pass over the ids.
`precomputed_block` turns those tensors back into what a forward consumes, after checking them
against the ids and the settings: every check that costs no more than one host sync always, and,
when asked (``validate_codebooks=True``), the full comparison with what the codec makes of the ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .codebook_blocks import ConsumedBlock, EntryBatch
from .codebook_stores import check_id_range, consume_rows
from .device_codebooks import padded
from .lzw import LZWCodec


__all__ = ["CODEBOOK_TENSOR_KEYS", "codebook_tensors", "precomputed_block", "whole_codebook_table"]

# What `codebook_tensors` returns (and ``forward(codebooks=...)`` reads).
CODEBOOK_TENSOR_KEYS = (
    "lengths",
    "legal",
    "provisional",
    "provisional_lengths",
    "extending",
    "entries",
    "entry_lengths",
)


def codebook_tensors(
    codec: LZWCodec, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.LongTensor]:
    """What a forward over whole sequences needs to know about their codebooks, as tensors.

    Made where batches are made (`Zip2ZipDataCollator`, in DataLoader workers, in parallel with the
    device) and passed as ``forward(input_ids, ..., codebooks=...)``, so the step has no Python pass
    over the ids. Keys (`CODEBOOK_TENSOR_KEYS`): ``lengths``, ``legal``, ``provisional`` and
    ``provisional_lengths`` and ``extending`` as in `ConsumedBlock` with every position kept; ``entries`` ``(B, E, M)``
    the base ids of each row's installed entries, entry k at index k, 0-padded (E: the most any row
    installs), and ``entry_lengths`` ``(B, E)`` (0 where a row has no entry k).

    Raises:
        ValueError: naming the first id outside the id space or not legal at its position.
    """
    ids = input_ids.tolist()
    real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool().tolist()
    check_id_range(ids, codec.total_vocab_size)
    streams = [codec.stream() for _ in ids]
    lengths, legal, provisional, provisional_lengths, extending, _ = consume_rows(
        streams, ids, real, range(input_ids.shape[1]), codec.max_subtokens
    )
    contents = [stream.codebook.to_list() for stream in streams]
    width, M = max(map(len, contents), default=0), codec.max_subtokens
    entries = [[padded(c, M) for c in row] + [[0] * M] * (width - len(row)) for row in contents]
    entry_lengths = [[len(c) for c in row] + [0] * (width - len(row)) for row in contents]
    return {
        "lengths": lengths,
        "legal": legal,
        "provisional": provisional,
        "provisional_lengths": provisional_lengths,
        "extending": extending,
        "entries": torch.tensor(entries, dtype=torch.long).reshape(len(ids), width, M),
        "entry_lengths": torch.tensor(entry_lengths, dtype=torch.long).reshape(len(ids), width),
    }


def precomputed_block(
    codebooks: Mapping[str, torch.Tensor],
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    keep: list[int],
    codec: LZWCodec,
    position_mode: str,
    validate: bool = False,
) -> tuple[ConsumedBlock, EntryBatch]:
    """The block and entries of ``codebooks`` (`codebook_tensors`' output) for these whole sequences.

    Always checked, with tensor operations and one host sync: types and shapes; every value in its
    range (lengths at most M, entry ids below V, legal counts within K and the entries held); ids
    in the id space and legal where they stand; padding where the mask has it; each id standing for
    as many base ids as its entry holds; each row's entry count agreeing with its legal counts.
    With ``validate``, also the tensors themselves against what the codec makes of the ids (a
    Python pass over them: for checking a collator, not for every step).

    Raises:
        ValueError: naming the first tensor, index and value that is wrong.
    """
    batch_size, length = input_ids.shape
    tensors = _checked_layout(codebooks, batch_size, length, codec.max_subtokens, input_ids.device)
    real = attention_mask[:, -length:].to(input_ids.device).bool()
    problems = _problems(tensors, input_ids, real, codec)
    flags = torch.stack([problem.any() for _, problem in problems]).tolist()  # the one host sync
    for (describe, problem), flagged in zip(problems, flags):
        if flagged:
            raise ValueError(describe(*(int(i) for i in torch.nonzero(problem)[0])))
    if validate:
        _check_against_the_ids(tensors, input_ids, real, codec)
    block = ConsumedBlock.from_codebook_tensors(tensors, position_mode, keep)
    width, M = tensors["entries"].shape[1:]
    entries = EntryBatch(
        rows=None,
        slots=None,
        subtokens=tensors["entries"].reshape(batch_size * width, M),
        lengths=tensors["entry_lengths"].reshape(batch_size * width).clamp(min=1),  # absent entries: never read
    )
    return block, entries


def _checked_layout(codebooks, batch_size: int, length: int, M: int, device) -> dict[str, torch.LongTensor]:
    """The tensors on ``device``, once keys, types and shapes are right."""
    if not isinstance(codebooks, Mapping) or set(codebooks) != set(CODEBOOK_TENSOR_KEYS):
        keys = sorted(codebooks) if isinstance(codebooks, Mapping) else type(codebooks).__name__
        raise ValueError(f"codebooks must be what codebook_tensors() returns ({CODEBOOK_TENSOR_KEYS}), got {keys}")
    for key, value in codebooks.items():
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
            kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"codebooks[{key!r}] must be an integer tensor (codebook_tensors() makes them), got {kind}"
            )
    width = codebooks["entries"].shape[1] if codebooks["entries"].dim() == 3 else -1
    children = codebooks["extending"].shape[2] if codebooks["extending"].dim() == 3 else -1
    expected = {
        "lengths": (batch_size, length),
        "legal": (batch_size, length),
        "provisional": (batch_size, length, M),
        "provisional_lengths": (batch_size, length),
        "extending": (batch_size, length, max(children, 1)),
        "entries": (batch_size, width, M),
        "entry_lengths": (batch_size, width),
    }
    for key, shape in expected.items():
        if tuple(codebooks[key].shape) != shape:
            raise ValueError(f"codebooks[{key!r}] has shape {tuple(codebooks[key].shape)}, expected {shape}")
    return {key: codebooks[key].to(device=device, dtype=torch.long) for key in CODEBOOK_TENSOR_KEYS}


def _problems(tensors: dict, input_ids, real, codec: LZWCodec) -> list[tuple[Callable[..., str], torch.Tensor]]:
    """``(message of an index, where it is wrong)`` for each check, in the order they are reported."""
    V, K, M = codec.initial_vocab_size, codec.max_codebook_size, codec.max_subtokens
    lengths, legal, entry_lengths = tensors["lengths"], tensors["legal"], tensors["entry_lengths"]
    width = entry_lengths.shape[1]
    hyper = input_ids - V
    is_hyper = real & (hyper >= 0)
    allowed = F.pad(legal[:, :-1], (1, 0))  # a hyper id is legal where the position before allowed it
    held = entry_lengths.gather(1, hyper.clamp(0, width - 1)) if width else torch.zeros_like(lengths)
    stands_for = torch.where(is_hyper, held, real.long())
    # At a row's last real position, its legal count is its entries, plus the provisional one.
    last = real.long().cumsum(1).argmax(1, keepdim=True)
    counted = legal.gather(1, last)[:, 0] - (tensors["provisional_lengths"].gather(1, last)[:, 0] > 0).long()
    installed = (entry_lengths > 0).sum(1)
    ranges = {
        "lengths": (0, M),
        "legal": (0, min(K, width + 1)),
        "provisional": (0, V - 1),
        "provisional_lengths": (0, M),
        "extending": (-1, V - 1),
        "entries": (0, V - 1),
        "entry_lengths": (0, M),
    }

    def outside_range(key, low, high):
        def describe(*index):
            value = int(tensors[key][index])
            return f"codebooks[{key!r}][{', '.join(map(str, index))}] = {value} is outside [{low}, {high}]"

        return describe, (tensors[key] < low) | (tensors[key] > high)

    def at(b, t):
        return f"input_ids[{b}, {t}] = {int(input_ids[b, t])}"

    not_theirs = "the codebooks are not these ids'"
    return [
        (
            lambda b, t: f"{at(b, t)} is outside the id space [0, {codec.total_vocab_size})",
            (input_ids < 0) | (hyper >= K),
        ),
        *(outside_range(key, low, high) for key, (low, high) in ranges.items()),
        (
            lambda b, t: f"codebooks do not match the attention mask at [{b}, {t}]: they were made for other rows",
            (lengths > 0) != real,
        ),
        (
            lambda b, t: (
                f"{at(b, t)} is not a legal id there ({int(allowed[b, t])} hyper ids are installed): " + not_theirs
            ),
            is_hyper & (hyper >= allowed),
        ),
        (
            lambda b, t: (
                f"{at(b, t)} names entry {int(hyper[b, t])} but codebooks['entries'] holds {width}: " + not_theirs
            ),
            is_hyper & (hyper >= width),
        ),
        (
            lambda b, t: (
                f"codebooks['lengths'][{b}, {t}] = {int(lengths[b, t])} but {at(b, t)} stands for "
                f"{int(stands_for[b, t])} base ids: {not_theirs}"
            ),
            real & (lengths != stands_for),
        ),
        (
            lambda b: (
                f"row {b} of the codebooks holds {int(installed[b])} entries but its legal counts say "
                f"{int(counted[b])}: {not_theirs}"
            ),
            real.any(1) & (counted != installed),
        ),
    ]


def _check_against_the_ids(tensors: dict, input_ids, real, codec: LZWCodec) -> None:
    """Raise unless ``tensors`` are exactly what `codebook_tensors` makes of these ids."""
    expected = codebook_tensors(codec, input_ids.cpu(), real.cpu())
    for key in CODEBOOK_TENSOR_KEYS:
        given, wanted = tensors[key].cpu(), expected[key]
        if given.shape != wanted.shape:
            raise ValueError(
                f"codebooks[{key!r}] has shape {tuple(given.shape)}; these ids give {tuple(wanted.shape)}"
            )
        differ = torch.nonzero(given != wanted)
        if len(differ):
            index = tuple(int(i) for i in differ[0])
            raise ValueError(
                f"codebooks[{key!r}][{', '.join(map(str, index))}] = {int(given[index])}; these ids give "
                f"{int(wanted[index])}: the codebooks are not these ids'"
            )


def whole_codebook_table(vectors: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The ``(B, E, D)`` table of precomputed codebooks' entries: their vectors come every row's whole
    codebook in order (`precomputed_block`'s `EntryBatch`), E per row, so no state stores them."""
    return vectors.reshape(batch_size, len(vectors) // batch_size, vectors.shape[-1])
