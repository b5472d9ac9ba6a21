"""Online LZW over base-token ids: the codec behind zip2zip hypertokens.

Pure Python, no torch: the tokenizer, the model and the data pipeline all share this one file, and a
saved checkpoint carries a copy of it.

Semantics (greedy LZW, compatible with the reference `zip2zip-compression` codec):

* Base ids are ``0 <= id < V``. Hypertoken ``V + k`` is the k-th entry created in this sequence;
  an entry is a run of 2..M base ids. Every sequence starts with an empty codebook of capacity K.
* With current phrase ``w`` and next id ``c``: if ``len(w) < M`` and ``w + c`` is an entry, extend
  ``w``; otherwise emit ``w`` and, if ``len(w) < M`` and the codebook is not full, add ``w + c``;
  then ``w = [c]``.
* Disabled ids (special tokens, added tokens, pad) flush ``w``, are emitted alone and never belong
  to an entry.

Example (V=10, M=3, K=5)::

    >>> codes, codebook = LZWCodec(10, 5, 3).encode([1, 2, 1, 2, 1, 2, 1, 2, 3, 3, 3, 3])
    >>> codes
    [1, 2, 10, 12, 2, 3, 14, 3]
    >>> codebook.to_dict()
    {10: [1, 2], 11: [2, 1], 12: [1, 2, 1], 13: [2, 3], 14: [3, 3]}

The model side never trusts a compressed stream to be greedy: a model may emit any installed id.
`LZWStream` therefore expands every id to its base ids and runs those through the encoder, so its
codebook is always the *canonical* one, ``encode(decode(stream))``'s, for any legal stream.

Which ids are legal after a prefix: every base id; every installed hyper id; and the *provisional*
id ``V + n`` (n = entries installed so far) whose content is ``w + w[0]`` -- the classic LZW
"KwKwK" case, where the encoder emits an entry right after the step that creates it (runs such as
``=====`` compress only through it). It is legal when ``w`` is non-empty, shorter than M, the
codebook is not full and ``w + w[0]`` is not an entry yet (so feeding it creates exactly that entry).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


__all__ = ["Codebook", "LZWCodec", "LZWStream"]


class Codebook:
    """The entries of one sequence: hyper id ``V + k`` -> the base ids it stands for.

    Entries are stored as (prefix code, last base id) pairs, the way LZW builds them; their base ids
    are expanded on demand and memoised.
    """

    __slots__ = ("initial_vocab_size", "max_codebook_size", "_lookup", "_prefix", "_last", "_expanded")

    def __init__(self, initial_vocab_size: int, max_codebook_size: int):
        self.initial_vocab_size = initial_vocab_size
        self.max_codebook_size = max_codebook_size
        # (prefix_code * V + last_id) -> hyper id. An int key hashes far faster than a tuple.
        self._lookup: dict[int, int] = {}
        self._prefix: list[int] = []
        self._last: list[int] = []
        self._expanded: list[tuple[int, ...]] = []

    def __len__(self) -> int:
        return len(self._prefix)

    @property
    def is_full(self) -> bool:
        return len(self._prefix) >= self.max_codebook_size

    def __contains__(self, hyper_id: int) -> bool:
        return 0 <= hyper_id - self.initial_vocab_size < len(self._prefix)

    def get_subtokens(self, code: int) -> tuple[int, ...]:
        """Base ids of ``code``: itself for a base id, the entry's content for an installed hyper id."""
        k = code - self.initial_vocab_size
        if k < 0:
            return (code,)
        expanded = self._expanded
        while len(expanded) <= k:  # fill the memo in creation order: a prefix is always older
            j = len(expanded)
            prefix = self._prefix[j]
            head = expanded[prefix - self.initial_vocab_size] if prefix >= self.initial_vocab_size else (prefix,)
            expanded.append(head + (self._last[j],))
        return expanded[k]

    def to_dict(self) -> dict[int, list[int]]:
        """``{hyper_id: [base ids]}`` in creation order."""
        return {self.initial_vocab_size + k: list(self.get_subtokens(self.initial_vocab_size + k)) for k in range(len(self))}

    def to_list(self) -> list[list[int]]:
        """Entry contents in creation order (entry k is hyper id ``V + k``)."""
        return list(self.to_dict().values())

    def copy(self) -> Codebook:
        other = Codebook(self.initial_vocab_size, self.max_codebook_size)
        other._lookup = dict(self._lookup)
        other._prefix = list(self._prefix)
        other._last = list(self._last)
        other._expanded = list(self._expanded)
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codebook):
            return NotImplemented
        return self.initial_vocab_size == other.initial_vocab_size and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Codebook({self.to_dict()})"


def _scan(codec: LZWCodec, codebook: Codebook, base_ids: Iterable[int], w: int, wlen: int, emit) -> tuple[int, int]:
    """Run greedy LZW over ``base_ids`` from phrase state ``(w, wlen)``; return the new state.

    ``w`` is the code of the pending phrase (-1 for none) and ``wlen`` its length in base ids. Codes
    are passed to ``emit`` as they are decided. This is the one LZW loop: `encode` and `LZWStream`
    both run it, so their codebooks cannot drift apart.
    """
    V, M, disabled = codec.initial_vocab_size, codec.max_subtokens, codec.disabled_ids
    lookup, prefix, last = codebook._lookup, codebook._prefix, codebook._last
    room = codec.max_codebook_size - len(prefix)
    for c in base_ids:
        if c in disabled:
            if w >= 0:
                emit(w)
                w = -1
            emit(c)
            continue
        if w < 0:
            w, wlen = c, 1
            continue
        if wlen < M:
            key = w * V + c
            extended = lookup.get(key)
            if extended is not None:
                w = extended
                wlen += 1
                continue
            if room > 0:
                lookup[key] = V + len(prefix)
                prefix.append(w)
                last.append(c)
                room -= 1
        emit(w)
        w, wlen = c, 1
    return w, wlen


def _discard(code: int) -> None:
    pass


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
        ids = ids.tolist()
    return ids if isinstance(ids, list) else list(ids)


class LZWCodec:
    """Greedy LZW codec with a per-sequence codebook.

    Args:
        initial_vocab_size: V, the base/hyper boundary. Base ids are ``< V``, hypertokens ``V + k``.
        max_codebook_size: K, the most entries one sequence may create.
        max_subtokens: M, the most base ids one hypertoken stands for.
        disabled_ids: ids never merged (special and added tokens, pad).
    """

    def __init__(
        self,
        initial_vocab_size: int,
        max_codebook_size: int,
        max_subtokens: int,
        disabled_ids: Iterable[int] = (),
    ):
        if initial_vocab_size < 1:
            raise ValueError(f"initial_vocab_size must be >= 1, got {initial_vocab_size}")
        if max_codebook_size < 0:
            raise ValueError(f"max_codebook_size must be >= 0, got {max_codebook_size}")
        if max_subtokens < 1:
            raise ValueError(f"max_subtokens must be >= 1, got {max_subtokens}")
        disabled = frozenset(int(i) for i in disabled_ids)
        bad = sorted(i for i in disabled if not 0 <= i < initial_vocab_size)
        if bad:
            raise ValueError(f"disabled_ids must be base ids in [0, {initial_vocab_size}), got {bad}")
        self.initial_vocab_size = initial_vocab_size
        self.max_codebook_size = max_codebook_size
        self.max_subtokens = max_subtokens
        self.disabled_ids = disabled

    @property
    def total_vocab_size(self) -> int:
        """V + K: the width of the id space (base ids and every hyper slot)."""
        return self.initial_vocab_size + self.max_codebook_size

    def __repr__(self) -> str:
        return (
            f"LZWCodec(initial_vocab_size={self.initial_vocab_size}, max_codebook_size={self.max_codebook_size}, "
            f"max_subtokens={self.max_subtokens}, disabled_ids={sorted(self.disabled_ids)})"
        )

    def new_codebook(self) -> Codebook:
        return Codebook(self.initial_vocab_size, self.max_codebook_size)

    # ------------------------------------------------------------------ encode

    def encode(self, ids: Sequence[int]) -> tuple[list[int], Codebook]:
        """Compress base ids; return ``(codes, codebook)``.

        Raises:
            ValueError: an id is negative or ``>= V`` (hyper ids cannot be re-compressed).
        """
        ids = _as_id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.initial_vocab_size):
            position, bad = next((i, c) for i, c in enumerate(ids) if not 0 <= c < self.initial_vocab_size)
            raise ValueError(
                f"encode() takes base ids in [0, {self.initial_vocab_size}); got {bad} at position {position}"
            )
        codebook = self.new_codebook()
        codes: list[int] = []
        w, _ = _scan(self, codebook, ids, -1, 0, codes.append)
        if w >= 0:
            codes.append(w)
        return codes, codebook

    def batch_encode(self, batch: Iterable[Sequence[int]]) -> list[tuple[list[int], Codebook]]:
        """`encode` each sequence independently."""
        return [self.encode(ids) for ids in batch]

    # ------------------------------------------------------------------ decode

    def decode(self, codes: Sequence[int]) -> tuple[list[int], Codebook]:
        """Expand compressed ids to base ids; return ``(base_ids, codebook)``.

        The codebook is the canonical one (equal to ``encode(base_ids)``'s) for any legal stream.

        Raises:
            ValueError: an id that is not legal at its position (negative, ``>= V + K``, or a
                hyper id not installed at that point), naming the id and the position.
        """
        stream = self.stream()
        base_ids: list[int] = []
        stream.feed(codes, out=base_ids)
        return base_ids, stream.codebook

    def batch_decode(self, batch: Iterable[Sequence[int]]) -> list[tuple[list[int], Codebook]]:
        """`decode` each sequence independently."""
        return [self.decode(codes) for codes in batch]

    def stream(self) -> LZWStream:
        """A fresh streaming state (empty codebook) for this codec."""
        return LZWStream(self)


class LZWStream:
    """The canonical codebook of a compressed stream, fed one id (or a block) at a time.

    This is the model-side state during generation: after any prefix of any legal stream its
    codebook equals ``codec.encode(codec.decode(prefix)[0])[1]``.
    """

    __slots__ = ("codec", "codebook", "num_codes", "num_base_ids", "_w", "_wlen")

    def __init__(self, codec: LZWCodec):
        self.codec = codec
        self.codebook = codec.new_codebook()
        self.num_codes = 0  # ids fed so far: the position of the next one
        self.num_base_ids = 0  # base ids those expanded to
        self._w = -1  # code of the pending phrase, -1 when none
        self._wlen = 0

    def copy(self) -> LZWStream:
        other = LZWStream.__new__(LZWStream)
        other.codec = self.codec
        other.codebook = self.codebook.copy()
        other.num_codes, other.num_base_ids = self.num_codes, self.num_base_ids
        other._w, other._wlen = self._w, self._wlen
        return other

    @property
    def num_installed(self) -> int:
        return len(self.codebook)

    def provisional_subtokens(self) -> tuple[int, ...] | None:
        """Content of the provisional id ``V + num_installed`` (``w + w[0]``), or None when it is not legal."""
        w = self._w
        codec, codebook = self.codec, self.codebook
        if w < 0 or self._wlen >= codec.max_subtokens or codebook.is_full:
            return None
        phrase = codebook.get_subtokens(w)
        if w * codec.initial_vocab_size + phrase[0] in codebook._lookup:
            return None
        return phrase + phrase[:1]

    @property
    def num_legal_hyper(self) -> int:
        """Legal hyper ids are exactly ``V .. V + num_legal_hyper - 1``."""
        return len(self.codebook) + (self.provisional_subtokens() is not None)

    def expand(self, code: int, position: int | None = None) -> tuple[int, ...]:
        """Base ids of ``code`` if it is legal next; otherwise a ValueError naming it (and ``position``)."""
        codec, codebook = self.codec, self.codebook
        if 0 <= code < codec.initial_vocab_size or code in codebook:
            return codebook.get_subtokens(code)
        if code == codec.initial_vocab_size + len(codebook):
            provisional = self.provisional_subtokens()
            if provisional is not None:
                return provisional
        where = f" at position {self.num_codes if position is None else position}"
        if not 0 <= code < codec.total_vocab_size:
            raise ValueError(f"id {code}{where} is outside the id space [0, {codec.total_vocab_size})")
        raise ValueError(
            f"hyper id {code}{where} is not installed: {len(codebook)} entries exist "
            f"(ids {codec.initial_vocab_size}..{codec.initial_vocab_size + len(codebook) - 1})"
        )

    def feed(self, codes: Sequence[int] | int, out: list[int] | None = None) -> list[tuple[int, tuple[int, ...]]]:
        """Consume compressed ids; return the entries they installed as ``(hyper_id, base ids)``.

        Base ids are appended to ``out`` when given. The state is unchanged when an id is illegal
        up to the ids before it, which were consumed.
        """
        if isinstance(codes, int):
            codes = [codes]
        codebook = self.codebook
        before = len(codebook)
        for code in _as_id_list(codes):
            base_ids = self.expand(code)
            self._w, self._wlen = _scan(self.codec, codebook, base_ids, self._w, self._wlen, _discard)
            self.num_codes += 1
            self.num_base_ids += len(base_ids)
            if out is not None:
                out.extend(base_ids)
        V = self.codec.initial_vocab_size
        return [(V + k, codebook.get_subtokens(V + k)) for k in range(before, len(codebook))]
