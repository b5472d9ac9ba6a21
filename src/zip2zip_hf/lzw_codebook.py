"""The pieces of the LZW codec that stand alone: a sequence's `Codebook`, the bounds on the
compression settings, and the checks that turn user input into plain int ids and settings.

Pure Python, no torch, like `lzw` (which re-exports all of it).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable
from itertools import islice


__all__ = [
    "DEFAULT_MAX_CODEBOOK_SIZE",
    "DEFAULT_MAX_SUBTOKENS",
    "MAX_CODEBOOK_SIZE",
    "MAX_SUBTOKENS",
    "Codebook",
    "as_id_list",
    "setting",
]


class Codebook:
    """The entries of one sequence: hyper id ``V + k`` -> the base ids it stands for.

    The whole codebook is one dict ``key -> hyper id`` with ``key = prefix_code * V + last_base_id``:
    the lookup the LZW loop needs, and (dicts keep insertion order) the k-th key *is* entry k, so
    nothing else has to be written while encoding. Contents (tuples of base ids) are expanded from
    the keys on demand and memoised in creation order; `LZWStream` fills that memo as it goes.
    """

    __slots__ = ("initial_vocab_size", "max_codebook_size", "_lookup", "_expanded")

    def __init__(self, initial_vocab_size: int, max_codebook_size: int):
        self.initial_vocab_size = initial_vocab_size
        self.max_codebook_size = max_codebook_size
        # prefix_code * V + last_id -> hyper id, in creation order. An int key hashes far faster than
        # a (prefix, last) tuple, and no key is negative: the loops use that to mark "no phrase".
        self._lookup: dict[int, int] = {}
        self._expanded: list[tuple[int, ...]] = []  # contents of entries 0 .. len - 1 (a prefix of them)

    def __len__(self) -> int:
        return len(self._lookup)

    @property
    def is_full(self) -> bool:
        return len(self._lookup) >= self.max_codebook_size

    def __contains__(self, hyper_id: int) -> bool:
        return 0 <= hyper_id - self.initial_vocab_size < len(self._lookup)

    def _fill(self) -> None:
        """Expand the entries created since the memo was last filled (a prefix is always older)."""
        V, expanded = self.initial_vocab_size, self._expanded
        for key in islice(self._lookup, len(expanded), None):
            prefix, last = divmod(key, V)
            expanded.append((expanded[prefix - V] if prefix >= V else (prefix,)) + (last,))

    def get_subtokens(self, code: int) -> tuple[int, ...]:
        """Base ids of ``code``: itself for a base id, the entry's content for an installed hyper id."""
        k = code - self.initial_vocab_size
        if k < 0:
            if code < 0:
                raise ValueError(f"id {code} is negative")
            return (code,)
        if k >= len(self._expanded):
            if k >= len(self._lookup):
                raise ValueError(f"hyper id {code} is not installed: the codebook has {len(self._lookup)} entries")
            self._fill()
        return self._expanded[k]

    def to_dict(self) -> dict[int, list[int]]:
        """``{hyper_id: [base ids]}`` in creation order."""
        self._fill()
        V = self.initial_vocab_size
        return {V + k: list(content) for k, content in enumerate(self._expanded)}

    def to_list(self) -> list[list[int]]:
        """Entry contents in creation order (entry k is hyper id ``V + k``)."""
        self._fill()
        return [list(content) for content in self._expanded]

    def truncate(self, num_entries: int) -> None:
        """Keep the first ``num_entries`` entries: uninstall the newer ones (newest first, O(removed))."""
        lookup = self._lookup
        while len(lookup) > num_entries:
            lookup.popitem()  # dicts pop in LIFO order: the newest entry
        del self._expanded[num_entries:]

    def copy(self) -> Codebook:
        other = Codebook(self.initial_vocab_size, self.max_codebook_size)
        other._lookup = dict(self._lookup)
        other._expanded = list(self._expanded)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codebook):
            return NotImplemented
        # Same V and the same key -> id pairs is the same entries under the same ids.
        return self.initial_vocab_size == other.initial_vocab_size and self._lookup == other._lookup

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"Codebook({self.to_dict()})"


# The defaults of K and M wherever a user does not choose (the paper's main setting).
DEFAULT_MAX_CODEBOOK_SIZE = 2048
DEFAULT_MAX_SUBTOKENS = 4
# Upper bounds on the settings, so that a typo fails here and not as a huge allocation later.
# K: logits are V + K wide at every position, and a sequence creates at most one entry per base
# token, so 2**20 entries already serve contexts of a million tokens (and cost 4 MiB of float32
# logits per position on their own).
MAX_CODEBOOK_SIZE = 2**20
# M: the attention hyper-encoder learns one position per constituent and runs over M slots per entry;
# phrases of hundreds of tokens almost never repeat verbatim, so longer entries buy nothing.
MAX_SUBTOKENS = 256


def as_id_list(ids) -> list[int]:
    """``ids`` as a list of Python ints; a ValueError names the first element that is not an integer id."""
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays (a 0-d one gives a bare int)
        ids = ids.tolist()
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"ids must be a sequence of ints, got {type(ids).__name__}: {ids!r:.80}")
    ids = ids if isinstance(ids, list) else list(ids)
    if set(map(type, ids)) <= {int}:  # one C-speed pass; bools, numpy ints and the rest go one by one
        return ids
    return [_id(i, position) for position, i in enumerate(ids)]


def _id(value, position: int) -> int:
    """One id as a plain int (numpy/torch ints welcome; bools, floats, strings and lists are not)."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise ValueError(f"ids must be ints: got {type(value).__name__} {value!r:.40} at position {position}")


def setting(name: str, value, least: int | None = None, most: int | None = None) -> int:
    """A compression setting as a plain int in ``[least, most]``; numpy/torch ints are welcome, but
    bools, floats (even ``2.0``), strings and None are rejected, never truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None
    if least is not None and number < least:
        raise ValueError(f"{name} must be >= {least}, got {number}")
    if most is not None and number > most:
        raise ValueError(f"{name} must be <= {most}, got {number}")
    return number
