"""The codebook state of one request, without a model: what a server (or a batching engine) keeps
per request to read its prompt, expand what the model writes, and count both ways.

A request's codebook starts empty, reads the prompt's compressed ids, then every id the model
writes; each id is checked (legal where it stands) and expanded to base ids with the request's own
codebook, so the text is known at every step. The counts are the usage a client is billed in: base
tokens (what the OpenAI API calls tokens), and the compressed ids the model actually read and wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..lzw import LZWCodec, LZWStream
from ..lzw_codebook import as_id_list


__all__ = ["RequestCodebook", "RequestUsage"]


@dataclass(frozen=True)
class RequestUsage:
    """A request's usage, in base tokens and in compressed ids (model positions and steps)."""

    prompt_tokens: int
    completion_tokens: int
    prompt_ids: int
    completion_ids: int

    def to_openai(self) -> dict:
        """The OpenAI ``usage`` object, counted in base tokens, with the compressed counts under
        ``compressed`` (``completion_tokens`` there is the number of decoding steps)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "compressed": {
                "prompt_tokens": self.prompt_ids,
                "completion_tokens": self.completion_ids,
                "total_tokens": self.prompt_ids + self.completion_ids,
            },
        }


class RequestCodebook:
    """One request's canonical codebook and counts.

    Args:
        codec: the model's codec (`Zip2ZipTokenizer.codec` or `Zip2ZipForCausalLM.codec`).

    Example::

        request = RequestCodebook(tokenizer.codec)
        request.read_prompt(prompt_ids)          # compressed ids, as the tokenizer wrote them
        base_ids = request.write(new_ids)        # each model step's ids, expanded
        request.legal_hyper_ids()                # what the model may write next: V .. V + n - 1
        request.usage()
    """

    def __init__(self, codec: LZWCodec):
        self.codec = codec
        self._stream: LZWStream = codec.stream()
        self._prompt_ids = self._prompt_tokens = 0
        self._completion_ids = self._completion_tokens = 0

    def read_prompt(self, ids: Sequence[int]) -> list[int]:
        """Feed the prompt's compressed ids; return its base ids. Only before anything is written."""
        if self._completion_ids:
            raise ValueError("the prompt is read before the model writes anything")
        ids, base_ids = self._feed(ids)
        self._prompt_ids += len(ids)
        self._prompt_tokens += len(base_ids)
        return base_ids

    def write(self, ids: Sequence[int]) -> list[int]:
        """Feed ids the model wrote (one step, or the accepted ids of a verified draft); return their
        base ids. An id that is not legal where it stands is a ValueError, and changes nothing."""
        ids, base_ids = self._feed(ids)
        self._completion_ids += len(ids)
        self._completion_tokens += len(base_ids)
        return base_ids

    def legal_hyper_ids(self) -> range:
        """The hyper ids the model may write next (installed entries and the provisional one)."""
        V = self.codec.initial_vocab_size
        return range(V, V + self._stream.num_legal_hyper)

    def usage(self) -> RequestUsage:
        return RequestUsage(self._prompt_tokens, self._completion_tokens, self._prompt_ids, self._completion_ids)

    def _feed(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """The ids as a list and their base ids; all or nothing (a failed block rolls back)."""
        ids, base_ids, mark = as_id_list(ids), [], self._stream.mark()
        try:
            self._stream.feed(ids, out=base_ids)
        except BaseException:
            self._stream.rollback(mark)
            raise
        return ids, base_ids
