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

from .lzw_codebook import (
    MAX_CODEBOOK_SIZE,
    MAX_SUBTOKENS,
    Codebook,
    as_id_list,
    setting,
)


__all__ = ["LZWCodec", "LZWStream"]


class LZWCodec:
    """Greedy LZW codec with a per-sequence codebook.

    Args:
        initial_vocab_size: V, the base/hyper boundary. Base ids are ``< V``, hypertokens ``V + k``.
        max_codebook_size: K, the most entries one sequence may create.
        max_subtokens: M, the most base ids one hypertoken stands for.
        disabled_ids: ids never merged (special and added tokens, pad).

    Settings must be ints (never truncated from floats); K is at most `MAX_CODEBOOK_SIZE` and M at
    most `MAX_SUBTOKENS`.
    """

    def __init__(
        self,
        initial_vocab_size: int,
        max_codebook_size: int,
        max_subtokens: int,
        disabled_ids: Iterable[int] = (),
    ):
        initial_vocab_size = setting("initial_vocab_size", initial_vocab_size, least=1)
        max_codebook_size = setting("max_codebook_size", max_codebook_size, least=0, most=MAX_CODEBOOK_SIZE)
        max_subtokens = setting("max_subtokens", max_subtokens, least=1, most=MAX_SUBTOKENS)
        disabled = frozenset(setting("disabled id", i) for i in disabled_ids)
        bad = sorted(i for i in disabled if not 0 <= i < initial_vocab_size)
        if bad:
            raise ValueError(f"disabled_ids must be base ids in [0, {initial_vocab_size}), got {bad}")
        self.initial_vocab_size = initial_vocab_size
        self.max_codebook_size = max_codebook_size
        self.max_subtokens = max_subtokens
        self.disabled_ids = disabled

    def settings(self) -> dict:
        """``initial_vocab_size``, ``max_codebook_size``, ``max_subtokens`` and (sorted) ``disabled_ids``:
        what a tokenizer and a model must agree on, under the names config and tokenizer use."""
        return {
            "initial_vocab_size": self.initial_vocab_size,
            "max_codebook_size": self.max_codebook_size,
            "max_subtokens": self.max_subtokens,
            "disabled_ids": sorted(self.disabled_ids),
        }

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
        ids = as_id_list(ids)
        V = self.initial_vocab_size
        if ids and (min(ids) < 0 or max(ids) >= V):  # two C-speed passes; the loop below trusts its input
            position, bad = next((i, c) for i, c in enumerate(ids) if not 0 <= c < V)
            raise ValueError(f"encode() takes base ids in [0, {V}); got {bad} at position {position}")
        codebook = self.new_codebook()
        lookup = codebook._lookup
        disabled, M = self.disabled_ids, self.max_subtokens
        codes: list[int] = []
        emit = codes.append
        # The hot loop, one iteration per base id (profiled: this is where all the time goes).
        # - w is the code of the pending phrase, -1 for none; wlen its length in base ids.
        # - The common case, extending w, costs one dict probe. No `wlen < M` test is needed for it:
        #   an entry of length M is never a prefix of another entry, so its keys are simply absent.
        # - For w == -1 the key w * V + c is negative, never present: "no phrase" needs no own test.
        # - Disabled ids are never inside an entry, so they too always miss; they are recognised
        #   on the miss path only, which runs once per emitted code instead of once per base id.
        # - The codebook's dict is the only thing written when an entry is created.
        w, wlen = -1, 0
        new, limit = V, V + self.max_codebook_size  # next hyper id; the first id past the codebook
        for c in ids:
            key = w * V + c
            if key in lookup:
                w = lookup[key]
                wlen += 1
                continue
            if c in disabled:  # flush w, emit c alone, start with no phrase
                if w >= 0:
                    emit(w)
                emit(c)
                w = -1
                continue
            if w >= 0:
                emit(w)
                if new < limit and wlen < M:
                    lookup[key] = new
                    new += 1
            w, wlen = c, 1
        if w >= 0:
            emit(w)
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
        stream._feed(as_id_list(codes), base_ids)
        return base_ids, stream.codebook

    def encode_longest_suffix(self, ids: Sequence[int], budget: int) -> list[int]:
        """The codes of the longest suffix of ``ids`` (base ids) found to compress to at most ``budget``
        codes, from an empty codebook (what left truncation keeps: a compressed suffix would refer to
        entries created before it)."""
        content = as_id_list(ids)
        if budget == 0:
            return []
        # A hypertoken covers at most M base tokens, so no suffix longer than budget * M fits: start there.
        cut = max(0, len(content) - budget * self.max_subtokens)
        fails = cut - 1  # the largest cut known not to fit (-1: none)
        codes, codebook = self.encode(content[cut:])
        # Drop the base tokens under the excess codes and re-encode: the suffix starts with an empty
        # codebook, so it usually compresses worse than before and may need another round.
        while len(codes) > budget:
            fails = cut
            cut += sum(len(codebook.get_subtokens(c)) for c in codes[: len(codes) - budget])
            codes, codebook = self.encode(content[cut:])
        # The last round may have dropped more than needed: bisect between the last cut that did not fit
        # and the one that does. LZW length is not strictly monotone in the cut, but only cuts that fit
        # are ever kept.
        lo, hi = fails, cut
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate, _ = self.encode(content[mid:])
            if len(candidate) <= budget:
                hi, codes = mid, candidate
            else:
                lo = mid
        return codes

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

    def mark(self) -> tuple[int, int, int, int, int]:
        """An O(1) snapshot of this state; `rollback` returns to it as long as only `feed` ran since."""
        return len(self.codebook), self.num_codes, self.num_base_ids, self._w, self._wlen

    def rollback(self, mark: tuple[int, int, int, int, int]) -> None:
        """Return to the state of `mark`, uninstalling the entries created since (O(entries removed))."""
        num_entries, self.num_codes, self.num_base_ids, self._w, self._wlen = mark
        self.codebook.truncate(num_entries)

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

    def continuation(self, base_ids: Sequence[int], max_codes: int | None = None) -> list[int]:
        """The canonical compressed ids that continue this stream with the text ``base_ids``.

        Greedy longest match against the codebook as it grows, the provisional ("KwKwK") id
        included: what `LZWCodec.encode` writes for the whole text when the stream's ids are a
        prefix of its codes. At most ``max_codes`` ids (the text may then be only partly covered).
        The stream is left as it was.
        """
        base_ids = as_id_list(base_ids)
        codec, lookup = self.codec, self.codebook._lookup
        V, M = codec.initial_vocab_size, codec.max_subtokens
        mark, codes, i = self.mark(), [], 0
        limit = len(base_ids) if max_codes is None else max_codes
        try:
            while i < len(base_ids) and len(codes) < limit:
                code, length = base_ids[i], 1  # walk the trie: every prefix of an entry is an entry
                while length < M and i + length < len(base_ids) and code * V + base_ids[i + length] in lookup:
                    code, length = lookup[code * V + base_ids[i + length]], length + 1
                provisional = self.provisional_subtokens()  # never an entry, so never a prefix of one
                if provisional is not None and tuple(base_ids[i : i + len(provisional)]) == provisional:
                    code, length = V + len(lookup), len(provisional)
                self._feed([code], None)
                codes.append(code)
                i += length
        finally:
            self.rollback(mark)
        return codes

    def feed(
        self, codes: Sequence[int] | int, out: list[int] | None = None, lengths: list[int] | None = None
    ) -> list[tuple[int, tuple[int, ...]]]:
        """Consume compressed ids; return the entries they installed as ``(hyper_id, base ids)``.

        Base ids are appended to ``out`` when given, and how many each id stood for to ``lengths``.
        On an illegal id a ValueError names it and its position; the ids before it stay consumed,
        and the state is exactly as after them.
        """
        before = len(self.codebook)
        self._feed(as_id_list(codes), out, lengths)
        V, expanded = self.codec.initial_vocab_size, self.codebook._expanded
        return [(V + k, expanded[k]) for k in range(before, len(expanded))]

    def _feed(self, codes: list[int], out: list[int] | None, lengths: list[int] | None = None) -> None:
        """`feed` without the report: expand each id and run its base ids through greedy LZW.

        This is `LZWCodec.encode`'s loop (see the comments there) applied to the expanded text, so
        the codebook is the canonical one by construction; the tests pin the two loops together.
        It also memoises each new entry's content, as the next ids may use that entry at once.

        Shortcut (profiled: it halves decode time): every prefix (length >= 2) of an entry is an
        entry too, so once the first base id of an entry ``x`` has started a new phrase, the rest of
        ``x`` can only re-match its own prefixes and ends with the phrase ``x``: nothing is created
        and no lookups are needed. Only when that first id *extends* the pending phrase does the rest
        go through the loop one base id at a time. Greedy streams (ours) never hit that slow case.
        """
        codec, codebook = self.codec, self.codebook
        V, M, disabled = codec.initial_vocab_size, codec.max_subtokens, codec.disabled_ids
        lookup, expanded = codebook._lookup, codebook._expanded
        if len(expanded) < len(lookup):
            codebook._fill()
        new, limit = V + len(lookup), V + codec.max_codebook_size
        w, wlen = self._w, self._wlen
        sink = out if out is not None else []  # base ids land here; its growth counts them
        start = len(sink)
        for position, code in enumerate(codes):
            if 0 <= code < V:
                c, content = code, None
            else:
                if V <= code < new:
                    content = expanded[code - V]
                else:  # the provisional id, or an illegal one: rare, so take the slow, shared path
                    self._w, self._wlen = w, wlen
                    self.num_codes += position
                    self.num_base_ids += len(sink) - start
                    content = self.expand(code)  # raises, naming the id and its position, unless legal
                    self.num_codes -= position
                    self.num_base_ids -= len(sink) - start
                c = content[0]
            # One LZW step for the first base id c of this code.
            key = w * V + c
            if key in lookup:
                w = lookup[key]
                wlen += 1
                if content is not None:  # the rest of the entry, one base id at a time
                    for c in content[1:]:
                        key = w * V + c
                        if key in lookup:
                            w = lookup[key]
                            wlen += 1
                            continue
                        if new < limit and wlen < M:  # (w is a phrase here, and c never disabled)
                            lookup[key] = new
                            new += 1
                            expanded.append((expanded[w - V] if w >= V else (w,)) + (c,))
                        w, wlen = c, 1
            elif c in disabled:
                w = -1
            else:
                if w >= 0 and new < limit and wlen < M:
                    lookup[key] = new
                    new += 1
                    expanded.append((expanded[w - V] if w >= V else (w,)) + (c,))
                # A new phrase starts at c; for an entry it runs to the entry's end (the shortcut above).
                # The provisional id lands here too: its first id creates it, just in time.
                if content is None:
                    w, wlen = c, 1
                else:
                    w, wlen = code, len(content)
            if content is None:
                sink.append(c)
            else:
                sink.extend(content)
            if lengths is not None:
                lengths.append(1 if content is None else len(content))
        self._w, self._wlen = w, wlen
        self.num_codes += len(codes)
        self.num_base_ids += len(sink) - start
