"""Speculative decoding over hypertokens: prompt lookup and assisted generation.

Each iteration drafts a continuation of the row's *text* (base ids), writes it as the canonical
compressed ids that continue the row's codebook (`LZWStream.continuation`), and verifies all of it
in one forward of the zip2zip model. Drafted ids are accepted while they equal what the model picks
itself (greedy, or the sample it draws at that position), and the model's own pick after the last
accepted id is kept too, so the text is exactly what plain decoding writes. The cache, codebooks
included, is then cropped back to the accepted ids (`Zip2ZipCache.crop`).

Drafts come from text, not from compressed ids: a phrase read for the second time is written with
other (longer) ids than the first time, so the compressed ids of a repeat do not repeat, while its
base ids do; and a draft model knows only base ids.

* `PromptLookupDrafter` (``generate(prompt_lookup_num_tokens=n)``): the text that followed the
  latest earlier occurrence of the row's last base ids (the longest suffix, up to
  ``max_matching_ngram_size`` base ids, that occurred before), found in an index updated as the
  text grows (O(1) per base id, no scan of the context).
* `AssistantDrafter` (``generate(assistant_model=m)``): any causal LM over the same base vocabulary
  (the base model itself, or a smaller one) continues the text greedily in base ids; its cache keeps
  the longest prefix it shares with the accepted text, so it never reads a base id twice.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ._compat import cache_keyword, output_cache_field, pop_cache
from .lzw import LZWCodec, LZWStream


__all__ = [
    "DEFAULT_MAX_MATCHING_NGRAM",
    "DEFAULT_NUM_ASSISTANT_TOKENS",
    "AssistantDrafter",
    "PromptLookupDrafter",
    "speculative_decoding",
]

# Base ids a prompt-lookup match may span when `max_matching_ngram_size` is not set: base ids are
# finer than the model's steps, and the longest earlier match is tried first, so a long n-gram costs
# no recall and picks the right place to copy from in text where short n-grams recur everywhere.
DEFAULT_MAX_MATCHING_NGRAM = 8
# Base ids a draft model writes per iteration when neither the call nor its generation config says
# (``num_assistant_tokens``; transformers' default).
DEFAULT_NUM_ASSISTANT_TOKENS = 20


class PromptLookupDrafter:
    """Drafts by copying the text that followed an earlier occurrence of the text's end.

    Args:
        num_tokens: compressed ids drafted per iteration (``prompt_lookup_num_tokens``).
        max_ngram: the longest suffix of the text looked up, in base ids.
        max_subtokens: M, so that ``num_tokens`` ids can cover up to ``num_tokens * M`` base ids.
    """

    def __init__(self, num_tokens: int, max_ngram: int, max_subtokens: int):
        self.num_tokens = num_tokens
        self.max_ngram = max_ngram
        self.span = num_tokens * max_subtokens
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest occurrence ends
        self._previous: dict[tuple[int, ...], int] = {}  # n-gram -> where the one before ended
        self._indexed = 0  # base ids indexed so far

    def draft(self, stream: LZWStream, text: list[int], max_codes: int) -> list[int]:
        """Up to ``max_codes`` compressed ids continuing ``text`` (the row's base ids, read by ``stream``)."""
        self._index(text)
        for n in range(min(self.max_ngram, len(text) - 1), 0, -1):
            suffix = tuple(text[-n:])
            end = self._ends.get(suffix)
            if end == len(text):  # that is the suffix itself: take the occurrence before it
                end = self._previous.get(suffix)
            if end is not None:
                return stream.continuation(text[end : end + self.span], max_codes=min(max_codes, self.num_tokens))
        return []

    def _index(self, text: list[int]) -> None:
        for end in range(self._indexed + 1, len(text) + 1):
            for n in range(1, min(self.max_ngram, end) + 1):
                ngram = tuple(text[end - n : end])
                if ngram in self._ends:
                    self._previous[ngram] = self._ends[ngram]
                self._ends[ngram] = end
        self._indexed = len(text)


class AssistantDrafter:
    """Drafts with a causal LM over the same base vocabulary, greedily, in base ids.

    Args:
        assistant_model: the draft model (a plain transformers causal LM).
        num_tokens: base ids it writes per iteration (``num_assistant_tokens``).
        vocab_size: V: the text's ids are below it, and ids at or past it are never drafted.
    """

    def __init__(self, assistant_model, num_tokens: int, vocab_size: int):
        rows = assistant_model.get_input_embeddings().num_embeddings
        if rows < vocab_size:
            raise ValueError(
                f"the assistant model reads {rows} ids but the base vocabulary V is {vocab_size}: a draft "
                "model must share the base tokenizer"
            )
        self.model = assistant_model
        self.num_tokens = num_tokens
        self.max_positions = getattr(assistant_model.config, "max_position_embeddings", None)
        self.vocab_size = vocab_size
        self.cache = DynamicCache(config=assistant_model.config)
        self._cache_keyword = cache_keyword(inspect.signature(assistant_model.forward).parameters)
        self._held: list[int] = []  # the base ids whose keys and values its cache holds, in order

    def draft(self, stream: LZWStream, text: list[int], max_codes: int) -> list[int]:
        if not text:  # an all-padding prompt: no id to read the first draft's logits at
            return []
        # Keep what the cache shares with the accepted text (its own last draft, where accepted);
        # the text's last id is read again, as its logits give the first drafted id.
        keep = min(_common_prefix(self._held, text), len(text) - 1)
        if len(self._held) > keep:
            self.cache.crop(keep - len(self._held))
            self._held = self._held[:keep]
        pending, written = text[keep:], []
        # Never more base ids than codes left in the budget (each code holds at least one), nor more
        # than the draft model has positions for (the text's last id is read again first).
        room = self.max_positions - len(text) + 1 if self.max_positions is not None else self.num_tokens
        for _ in range(max(0, min(self.num_tokens, max_codes, room))):
            ids = torch.tensor([pending], device=self.model.device)
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_keyword: self.cache})
            self._held += pending
            pending = [int(out.logits[0, -1, : self.vocab_size].argmax())]
            written += pending
        return stream.continuation(written, max_codes=max_codes)


def speculative_decoding(
    model,
    input_ids: torch.LongTensor,
    drafter,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    streamer=None,
    **model_kwargs,
):
    """The decoding loop of ``generate`` with drafts (batch size 1, as transformers' own).

    Every accepted id is checked by ``stopping_criteria`` one at a time, so that EOS, stop strings,
    ``max_new_tokens`` and any other criterion end the text exactly where plain decoding would.
    Returns what transformers' decoding loops return (compressed ids; `generate` expands them).
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one row at a time (batch size 1), got {input_ids.shape[0]}")
    codec: LZWCodec = model.codec
    cache = pop_cache(model_kwargs)
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    want = generation_config.return_dict_in_generate
    scores = () if want and generation_config.output_scores else None
    raw_logits = () if want and generation_config.output_logits else None
    # The row's text as it grows, and the codebook the drafts are written against.
    stream, text = codec.stream(), []
    stream.feed(input_ids[0][mask[0].bool()].tolist(), out=text)
    # Positions in the cache (a cache handed to generate may hold some); the ids after them are fed
    # next, with the draft.
    cached = cache.hyper_state.num_positions if getattr(cache, "hyper_state", None) is not None else 0
    # The prompt's last phrase may go on in the first id written (see `generate`): open at the first verification.
    model_kwargs.pop("open_phrase_at", None)
    open_phrase_at = input_ids.shape[1] - cached - 1 if input_ids.shape[1] > cached else None
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    base_positions = model.config.position_mode == "base"
    per_id = codec.max_subtokens if base_positions else 1  # the most positions one id takes
    done = False
    while not done:
        cur_len = input_ids.shape[1]
        budget = generation_config.max_length - cur_len - 1
        last_id = False  # plain decoding's `PositionLimit`: the id written now is the last that fits
        if max_positions:
            # Plain decoding stops after an id when the ids before it and one more at its most could pass
            # the last position. The draft gets the room for itself and the id after it, each at its most:
            # the verifying forward never needs a position past the last, and that rule stops at no id
            # within it; where not even one id more fits, the id written now is the last, as in plain decoding.
            held = len(text) if base_positions else int(mask.sum())
            budget = min(budget, (max_positions - held) // per_id - 1)
            last_id = held + per_id > max_positions
        draft = drafter.draft(stream, text, budget) if budget > 0 else []
        candidate = torch.cat([input_ids, input_ids.new_tensor([draft]).reshape(1, -1)], dim=1)
        full_mask = torch.cat([mask, mask.new_ones(1, len(draft))], dim=1)
        out = model(
            input_ids=candidate[:, cached:],
            attention_mask=full_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=len(draft) + 1,
            score_provisional=model_kwargs.get("score_provisional", True),
            open_phrase_at=open_phrase_at,
        )
        open_phrase_at = None
        cache = getattr(out, output_cache_field())
        if model.codebooks_on_device is None:
            # Python streams, even on an accelerator: an iteration reads its accepted ids on the host
            # anyway, and streams take a block of ids in one pass where `DeviceCodebooks` take M
            # masked iterations of tensor operations per id.
            cache.hyper_state.place_codebooks(False)
        logits = out.logits[:, -len(draft) - 1 :].float()
        try:
            accepted, processed, done = _verify(
                input_ids, candidate, draft, logits, logits_processor, stopping_criteria, generation_config.do_sample
            )
        except BaseException:
            cache.crop(cached)  # accepted or rolled back, as a forward is: no draft stays in the cache
            raise
        done = done or last_id  # no draft then: ``accepted`` is that one id
        input_ids = torch.cat([input_ids, input_ids.new_tensor([accepted])], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, len(accepted))], dim=1)
        cached = input_ids.shape[1] - 1  # the last accepted id is fed with the next draft
        cache.crop(cached)
        stream.feed(accepted, out=text)
        if streamer is not None:
            streamer.put(torch.tensor([accepted]))
        if scores is not None:
            scores += tuple(processed[:, i] for i in range(len(accepted)))
        if raw_logits is not None:
            raw_logits += tuple(logits[:, i] for i in range(len(accepted)))
    if streamer is not None:
        streamer.end()
    if not want:
        return input_ids
    output = {"sequences": input_ids, "scores": scores, "logits": raw_logits}
    return GenerateDecoderOnlyOutput(**output, **{output_cache_field(GenerateDecoderOnlyOutput): cache})


def _verify(input_ids, candidate, draft: list[int], logits, logits_processor, stopping_criteria, do_sample: bool):
    """The ids of the draft the model accepts, then its own next id; the processed scores; and
    whether a stopping criterion ended the text among them (cut right where it did)."""
    picked, processed = _pick(candidate, input_ids.shape[1], logits, logits_processor, do_sample)
    picked = picked.tolist()  # the iteration's one host sync
    accepted = picked[: _common_prefix(draft, picked) + 1]
    for n in range(1, len(accepted) + 1):  # stop exactly where one step at a time would
        grown = torch.cat([input_ids, input_ids.new_tensor([accepted[:n]])], dim=1)
        if bool(stopping_criteria(grown, processed[:, n - 1]).all()):
            return accepted[:n], processed, True
    return accepted, processed, False


def _pick(candidate, cur_len: int, logits, logits_processor, do_sample: bool):
    """The model's own id at every verified position (argmax, or a sample of the processed scores),
    and those scores; position i sees the candidate's ids before it, as one step at a time would."""
    processed = logits.clone()
    for i in range(logits.shape[1]):
        processed[:, i] = logits_processor(candidate[:, : cur_len + i], logits[:, i])
    if do_sample:
        picked = torch.multinomial(processed[0].softmax(dim=-1), num_samples=1).squeeze(1)
    else:
        picked = processed[0].argmax(dim=-1)
    return picked, processed


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
