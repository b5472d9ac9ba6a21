"""lm-evaluation-harness model ``zip2zip``: a zip2zip checkpoint scored the way lm-eval scores plain models.

Run it with lm-eval's own command line, through ours so that the class is registered::

    python -m zip2zip_hf lm-eval run --model zip2zip --model_args pretrained=PATH --tasks TASK ...

or in Python, where ``import zip2zip_hf`` registers it: ``lm_eval.simple_evaluate(model="zip2zip", ...)``.
(lm-eval's plain ``hf`` model would load the checkpoint too, but it splits compressed ids of
``context + continuation`` at the context's length, which scores the wrong ids whenever a phrase
crosses the boundary.)

Everything lm-eval does with text and tokens happens with the *base* tokenizer, exactly as for the
``hf`` model: the context/continuation split, rolling windows, truncation, chat templates, stop
sequences. Only where the model reads ids are they compressed:

* **loglikelihood**: the context is compressed from an empty codebook and the continuation is scored
  as its canonical ids after it (`canonical_continuation`); ``is_greedy`` asks whether greedy
  decoding writes exactly those ids. The context's last id is marked as a prompt's end
  (``open_phrase_at``): the continuation may go on inside its phrase, as generation may. Truncation
  drops *base* tokens of the context (a compressed suffix would refer to entries made before it).
* **loglikelihood_rolling** (perplexity and bits-per-byte tasks): each of lm-eval's windows is such
  a pair, so every base token of the document is scored once.
* **generate_until**: prompts are compressed, our ``generate`` stops on the decoded text, and the
  written ids are expanded back to base ids, of which at most ``max_gen_toks`` are kept: the text
  budget the base model gets (the zip2zip model may take fewer steps to write it).

With a codebook of size 0 every number equals the ``hf`` model's on the base model.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedTokenizerFast

from ..tokenization_zip2zip import Zip2ZipTokenizer
from .forced_decoding import canonical_continuation


__all__ = ["Zip2ZipLM", "base_tokenizer_of"]

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def base_tokenizer_of(tokenizer: Zip2ZipTokenizer) -> PreTrainedTokenizerFast:
    """A fast tokenizer over the base vocabulary with the zip2zip tokenizer's special tokens and chat template."""
    specials = {name: getattr(tokenizer, name) for name in _SPECIAL_TOKENS if getattr(tokenizer, name) is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.base_tokenizer,
        chat_template=tokenizer.chat_template,
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        **specials,
    )


@register_model("zip2zip")
class Zip2ZipLM(HFLM):
    """lm-eval's `HFLM` for a `Zip2ZipForCausalLM` and its `Zip2ZipTokenizer` (see the module docstring).

    Takes HFLM's arguments. ``pretrained`` is a saved zip2zip checkpoint or a loaded model; a loaded
    model needs ``tokenizer=`` its `Zip2ZipTokenizer`. ``self.tokenizer`` is the base tokenizer and
    ``self.zip2zip_tokenizer`` the compressing one.
    """

    def __init__(self, pretrained, backend: str = "causal", **kwargs):
        if backend != "causal":
            raise ValueError(f"a zip2zip model is a causal LM: backend must be 'causal', got {backend!r}")
        super().__init__(pretrained, backend=backend, **kwargs)

    def _create_tokenizer(self, pretrained, tokenizer, *args, **kwargs) -> None:
        super()._create_tokenizer(pretrained, tokenizer, *args, **kwargs)
        if not isinstance(self.tokenizer, Zip2ZipTokenizer):
            raise ValueError(
                f"the zip2zip model needs a Zip2ZipTokenizer, got {type(self.tokenizer).__name__}: "
                "for a plain checkpoint use lm-eval's 'hf' model"
            )
        self.zip2zip_tokenizer = self.tokenizer
        self.tokenizer = base_tokenizer_of(self.zip2zip_tokenizer)

    @property
    def codec(self):
        return self.zip2zip_tokenizer.codec

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's scoring of ``(key, context ids, continuation ids)`` requests, on compressed ids."""
        compressed = [(key, *self._compress_pair(context, continuation)) for key, context, continuation in requests]
        self._context_ends = _context_ends(compressed, self.max_length)
        try:
            return super()._loglikelihood_tokens(compressed, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._context_ends = {}

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """HFLM's forward, with each row's context end open (see the module docstring). HFLM hands
        over the rows alone, right-padded with 0: a row is known by its ids, padding stripped."""
        open_at = torch.zeros_like(inps, dtype=torch.bool)
        ends = getattr(self, "_context_ends", {})
        for b, row in enumerate(inps.tolist()):
            for length in _unpadded_lengths(row):
                for end in ends.get(tuple(row[:length]), ()):
                    open_at[b, end] = True
        precision = getattr(self, "mixed_precision_dtype", None)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=precision, enabled=precision is not None):
            return self.model(inps, open_phrase_at=open_at).logits

    def _compress_pair(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Compressed context (its base ids cut from the left to fit) and the continuation's canonical ids."""
        room = max(1, self.max_length + 1 - len(continuation))
        context_codes = self.codec.encode(context[-room:])[0]
        return context_codes, canonical_continuation(self.codec, context_codes, continuation)

    # ------------------------------------------------------------------ generation

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generation contract (base ids in, prompt + written base ids out) on compressed ids."""
        attention_mask = generation_kwargs.pop("attention_mask", torch.ones_like(context))
        prompts = [row[mask.bool()].tolist() for row, mask in zip(context.cpu(), attention_mask.cpu())]
        codes = [self.codec.encode(prompt)[0] for prompt in prompts]
        batch = self.zip2zip_tokenizer.pad({"input_ids": codes}, padding=True, return_tensors="pt").to(context.device)
        max_new_tokens = max_length - context.shape[1]
        # The stop sequences go to our generate, which matches them on decoded text (HFLM's criterion
        # would decode compressed ids with the base tokenizer).
        written = super()._model_generate(
            batch["input_ids"],
            max_length=batch["input_ids"].shape[1] + max_new_tokens,
            stop=[],
            attention_mask=batch["attention_mask"],
            stop_strings=list(stop) or None,
            tokenizer=self.zip2zip_tokenizer,
            **generation_kwargs,
        )[:, batch["input_ids"].shape[1] :]
        pad = self.tokenizer.pad_token_id
        continuations = []
        for prompt, prompt_codes, row in zip(prompts, codes, written.tolist()):
            base = self.codec.decode(prompt_codes + row)[0][len(prompt) : len(prompt) + max_new_tokens]
            continuations.append(base + [pad] * (max_new_tokens - len(base)))
        return torch.cat([context, torch.tensor(continuations, dtype=context.dtype, device=context.device)], dim=1)


def _context_ends(compressed: list[tuple], max_length: int) -> dict[tuple[int, ...], set[int]]:
    """``{row ids: indices of context ends}`` for the rows HFLM builds of ``(key, context, continuation)``
    requests (``(context + continuation)[-(max_length + 1):][:-1]``). Two requests whose rows are the
    same ids split elsewhere open both ends: each scores only after its own, where the other's end,
    if later, leaves one position unruled rather than a continuation ruled out."""
    ends: dict[tuple[int, ...], set[int]] = {}
    for _, context, continuation in compressed:
        whole = context + continuation
        start = max(0, len(whole) - (max_length + 1))
        end = len(context) - 1 - start
        if end >= 0:
            ends.setdefault(tuple(whole[start:-1]), set()).add(end)
    return ends


def _unpadded_lengths(row: list[int]) -> list[int]:
    """The lengths ``row`` may have had before right padding with 0: its own, then one less for each
    trailing 0."""
    lengths = [len(row)]
    while lengths[-1] > 0 and row[lengths[-1] - 1] == 0:
        lengths.append(lengths[-1] - 1)
    return lengths
