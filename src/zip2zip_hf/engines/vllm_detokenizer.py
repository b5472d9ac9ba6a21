"""Text of a zip2zip request in vLLM's frontend: its ids expanded to base ids, decoded as base text.

vLLM's frontend decodes each request's new ids with the engine's one tokenizer, which knows no
codebook: an id past the base vocabulary would be decoded as nothing. `Zip2ZipIncrementalDetokenizer`
keeps the request's canonical codebook (an `LZWStream` fed the prompt, then each output id), expands
each id to its base ids and decodes those incrementally with the base tokenizer, as vLLM decodes any
slow tokenizer's ids. Stop strings are then checked on base text by vLLM's own code, so a stop
string that ends inside a hypertoken cuts the text where the base model's server would.
"""

from __future__ import annotations

from types import SimpleNamespace

from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer


__all__ = ["Zip2ZipIncrementalDetokenizer", "install", "is_zip2zip_tokenizer"]


def is_zip2zip_tokenizer(tokenizer) -> bool:
    """A `Zip2ZipTokenizer` (or vLLM's cached copy of one): it has a codec and a base tokenizer."""
    return tokenizer is not None and hasattr(tokenizer, "codec") and hasattr(tokenizer, "base_tokenizer")


class Zip2ZipIncrementalDetokenizer(FastIncrementalDetokenizer):
    """One request's output text: compressed ids in (``token_ids``), base text out. vLLM's own
    detokenizer of a fast tokenizer does the decoding, over the base ids and the base tokenizer."""

    def __init__(self, tokenizer, request):
        self.codebook = tokenizer.codec.stream()  # the request's canonical codebook
        prompt_base_ids: list[int] = []
        self.codebook.feed(request.prompt_token_ids or [], out=prompt_base_ids)
        base_request = SimpleNamespace(
            request_id=request.request_id, sampling_params=request.sampling_params, prompt_token_ids=prompt_base_ids
        )
        super().__init__(SimpleNamespace(_tokenizer=tokenizer.base_tokenizer), base_request)

    def decode_next(self, next_token_id: int) -> str:
        expanded: list[int] = []
        self.codebook.feed([next_token_id], out=expanded)
        return "".join(super(Zip2ZipIncrementalDetokenizer, self).decode_next(base_id) for base_id in expanded)


def install() -> None:
    """Route a zip2zip tokenizer's requests to `Zip2ZipIncrementalDetokenizer` (once per process)."""
    original = IncrementalDetokenizer.from_new_request
    if getattr(original, "zip2zip", False):
        return

    def from_new_request(tokenizer, request):
        if is_zip2zip_tokenizer(tokenizer):
            return Zip2ZipIncrementalDetokenizer(tokenizer, request)
        return original(tokenizer, request)

    from_new_request.zip2zip = True
    IncrementalDetokenizer.from_new_request = staticmethod(from_new_request)
