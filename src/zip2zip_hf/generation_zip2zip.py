"""`generate` for zip2zip models: hypertokens inside, plain base ids outside.

The decoding loop is transformers' own; the per-row codebooks ride in the `Zip2ZipCache` that the
model's forward returns, so greedy, sampling, beam search (the cache reorders them) and
``num_return_sequences`` (inputs are expanded before the first forward) need nothing special here.

What this mixin adds is the boundary with code that only knows base ids:

* the returned sequences keep the prompt ids unchanged and give the generated part *expanded to
  base ids*, so ``tokenizer.decode(out[0][n_prompt:])``, pipelines and lm-eval see the right text;
* streamers receive base ids;
* ``stop_strings`` are matched on the decoded generated text (transformers' own criterion indexes a
  table by token id and knows nothing of hyper ids).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin, StoppingCriteria, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from ._compat import CACHE_NAMES, beam_search_vocab_size, check_generation_internals, output_cache_field
from .hyper_state import DeferredLegalityChecks
from .lzw import LZWCodec, LZWStream
from .lzw_codebook import setting
from .speculative_zip2zip import (
    DEFAULT_MAX_MATCHING_NGRAM,
    DEFAULT_NUM_ASSISTANT_TOKENS,
    AssistantDrafter,
    PromptLookupDrafter,
    speculative_decoding,
)


__all__ = [
    "PositionLimit",
    "PromptStreams",
    "StopStringsOnText",
    "Zip2ZipGenerateBeamOutput",
    "Zip2ZipGenerateOutput",
    "Zip2ZipGenerationMixin",
]


# The modes whose loop only reorders, repeats or selects cache rows, which the codebooks follow.
_SUPPORTED_MODES = (
    GenerationMode.ASSISTED_GENERATION,  # our own loop (`_assisted_decoding`), which crops the cache
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.BEAM_SEARCH,
    GenerationMode.BEAM_SAMPLE,
)


class Zip2ZipGenerationMixin(GenerationMixin):
    """`GenerationMixin` whose outputs and streamed tokens are base ids (see module docstring)."""

    codec: LZWCodec

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, streamer=None, return_hypertokens: bool = False, **kwargs):
        r"""`GenerationMixin.generate`, with every decoding mode, over compressed ids.

        ``max_new_tokens`` / ``max_length`` count model steps: one step may write a hypertoken
        standing for several base tokens, so the text can be longer than ``max_new_tokens`` tokens.

        Args:
            return_hypertokens: return the raw compressed ids instead of expanding the generated
                part to base ids.

        Returns:
            Like `GenerationMixin.generate`. ``sequences[:, :n_prompt]`` are the prompt ids
            unchanged; the rest is the generated part in base ids, right-padded with the pad id.
            Scores and logits, when requested, stay one per model step and ``V + K`` wide. With
            ``return_dict_in_generate=True``, a `Zip2ZipGenerateOutput` (`Zip2ZipGenerateBeamOutput`
            for beams) that also carries ``codebooks``, one ``{hyper_id: [base ids]}`` per row.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("Zip2ZipForCausalLM.generate needs input_ids (or inputs): there is no text-free start")
        if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.numel() == 0):
            # The forward says the same, but transformers 4.57 fails on an empty prompt before it.
            raise ValueError(
                f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}"
            )
        check_generation_internals()
        config = self._refuse_unsupported_modes(generation_config, kwargs)
        _check_cache_continues_the_prompt(kwargs, input_ids)
        if config.cache_implementation == "static":
            generation_config, kwargs = self._with_static_cache(generation_config, config, input_ids, kwargs)
        if kwargs.get("tokenizer") is not None:
            self._check_tokenizer(kwargs["tokenizer"])
        attention_mask = kwargs.get("attention_mask")
        if streamer is not None:
            streamer = _BaseIdStreamer(streamer, self.codec)
        if not self.config.write_provisional_hypertokens:
            kwargs.setdefault("score_provisional", False)  # reaches every step's forward
        # The prompt's end may cut its last phrase short: the first id written may go on inside it.
        # The prefill's forward alone takes this (`_update_model_kwargs_for_generation` drops it).
        kwargs["open_phrase_at"] = -1
        # The ids come from masked logits: the steps record their legality on the device, read
        # once here at the end (a processor that unmasks an illegal id is still named).
        checks = kwargs["deferred_checks"] = kwargs.get("deferred_checks") or DeferredLegalityChecks()
        self._stop_before_the_positions_run_out(checks, kwargs)
        output = super().generate(inputs=inputs, generation_config=generation_config, streamer=streamer, **kwargs)
        checks.raise_if_illegal()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompts = _real_prompts(input_ids, attention_mask)
        after_prompt = PromptStreams(self.codec)
        tails, streams = [], []
        for row in range(len(sequences)):
            stream = after_prompt.start(prompts[row * len(prompts) // len(sequences)])  # rows grouped by prompt
            tail: list[int] = []
            stream.feed(sequences[row, input_ids.shape[1] :].tolist(), out=tail)
            tails.append(tail)
            streams.append(stream)
        if not isinstance(output, torch.Tensor):
            output = _with_codebooks(output, [stream.codebook.to_dict() for stream in streams])
        if return_hypertokens:
            return output
        expanded = _with_tails(input_ids.to(sequences.device), tails, self._pad_id(generation_config, kwargs))
        if isinstance(output, torch.Tensor):
            return expanded
        output.sequences = expanded
        return output

    def _update_model_kwargs_for_generation(self, *args, **kwargs) -> dict:
        """transformers' update after each forward, and the prompt's open phrase dropped after the
        first (the prefill): the ids after it are the model's own, canonical by its logits."""
        model_kwargs = super()._update_model_kwargs_for_generation(*args, **kwargs)
        model_kwargs.pop("open_phrase_at", None)
        return model_kwargs

    def _stop_before_the_positions_run_out(self, checks: DeferredLegalityChecks, kwargs: dict) -> None:
        """Add `PositionLimit` to the call's stopping criteria when the base model has a last position."""
        max_positions = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        if not max_positions:
            return
        per_id = self.codec.max_subtokens if self.config.position_mode == "base" else 1
        limit = PositionLimit(checks, max_positions, per_id, self.config.position_mode)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), limit])

    def _pad_id(self, generation_config, kwargs) -> int:
        config = generation_config or self.generation_config
        candidates = (kwargs.get("pad_token_id"), config.pad_token_id, self.config.pad_token_id, config.eos_token_id)
        for candidate in candidates:
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0

    def _refuse_unsupported_modes(self, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """NotImplementedError naming the mode, before any work, for what the codebooks cannot follow
        yet; else the generation config in effect (``generation_config`` updated by ``kwargs``)."""
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        config.update(**{key: value for key, value in kwargs.items() if hasattr(config, key)})
        speculative = kwargs.get("assistant_model") is not None or config.prompt_lookup_num_tokens is not None
        if speculative and kwargs.get("assistant_tokenizer") is not None:
            raise NotImplementedError(
                "assistant_tokenizer= (a draft model with another tokenizer) is not supported: the draft "
                "model must share the base tokenizer, whose ids the drafts are compressed from"
            )
        if speculative and (config.output_attentions or config.output_hidden_states):
            raise NotImplementedError("speculative decoding returns no attentions or hidden states")
        if speculative and (config.num_beams or 1) > 1:  # transformers would drop the drafts, with a warning
            drafts = (
                f"prompt_lookup_num_tokens={config.prompt_lookup_num_tokens}"
                if config.prompt_lookup_num_tokens is not None
                else "assistant_model="
            )
            raise ValueError(
                f"{drafts} (speculative decoding) and num_beams={config.num_beams} (beam search) do not go "
                "together: speculative decoding verifies drafts for greedy decoding and sampling only; "
                "leave out one of them"
            )
        if config.cache_implementation not in (None, "dynamic", "static"):
            raise NotImplementedError(
                f"cache_implementation={config.cache_implementation!r} is not supported by zip2zip models yet: "
                "the codebooks ride in a dynamic or a static cache (cache_implementation None, 'dynamic' or 'static')"
            )
        if getattr(config, "watermarking_config", None) is not None:
            raise NotImplementedError("watermarking is not supported: it assumes a fixed vocabulary of logits")
        mode = config.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in _SUPPORTED_MODES:
            raise NotImplementedError(f"generation mode {mode.value!r} is not supported by zip2zip models")
        return config

    def _with_static_cache(self, generation_config, config: GenerationConfig, input_ids: torch.Tensor, kwargs: dict):
        """``cache_implementation="static"`` as a `Zip2ZipStaticCache` handed to generate.

        transformers would build a plain `StaticCache`, which cannot carry the codebooks; ours is
        sized the same way (prompt plus new tokens, or ``max_cache_len`` when larger) and passed as
        the caller's own cache, which generate then uses as it would its own (``torch.compile`` of
        the decoding steps on CUDA included).
        """
        from .cache_zip2zip import Zip2ZipStaticCache

        if any(kwargs.get(name) is not None for name in CACHE_NAMES):
            raise ValueError("pass either a cache or cache_implementation='static', not both")
        length = input_ids.shape[1] + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        length = max(length, getattr(config, "max_cache_len", None) or 0)
        cache = Zip2ZipStaticCache(config=self.config.get_text_config(), max_cache_len=length)
        # The request is now the cache (generate refuses both): drop it from the call's keywords and
        # generation config (the model's own is set aside in `_prepare_generation_config`).
        kwargs = {key: value for key, value in kwargs.items() if key != "cache_implementation"}
        if generation_config is not None and generation_config.cache_implementation is not None:
            generation_config = copy.deepcopy(generation_config)
            generation_config.cache_implementation = None
        return generation_config, {**kwargs, output_cache_field(): cache}

    def _prepare_generation_config(self, *args, **kwargs) -> tuple[GenerationConfig, dict]:
        """transformers' merge of the call's settings with the model's, less a static request the
        model's own config makes when `_with_static_cache` has already turned it into our cache (the
        call's own copy is changed: the model's config is shared by every thread calling it)."""
        from .cache_zip2zip import Zip2ZipStaticCache

        generation_config, model_kwargs = super()._prepare_generation_config(*args, **kwargs)
        if any(isinstance(model_kwargs.get(name), Zip2ZipStaticCache) for name in CACHE_NAMES):
            generation_config.cache_implementation = None
        return generation_config, model_kwargs

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """Keep the 2-D padding mask: with a static cache, generate would turn it into the base
        model's 4-D mask here, but the forward needs it as it is (padding is skipped by the
        codebooks) and the base model builds its own 4-D mask from it."""
        return attention_mask

    def _check_tokenizer(self, tokenizer) -> None:
        """A tokenizer handed to generate must make the ids this model reads (ours: the same settings)."""
        if hasattr(tokenizer, "max_codebook_size"):
            self.config.check_tokenizer(tokenizer)
        elif len(tokenizer) != self.codec.initial_vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} ids but the model's base vocabulary V is "
                f"{self.codec.initial_vocab_size}: it is not this model's tokenizer"
            )

    def _assisted_decoding(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        assistant_model=None,
        assistant_tokenizer=None,
        tokenizer=None,
        **model_kwargs,
    ):
        """Prompt lookup and assisted generation: drafts of the text, written as canonical
        compressed ids and verified in one forward (`speculative_zip2zip`). transformers' own loop
        compares ids of one fixed vocabulary and cannot rewind a codebook."""
        if synced_gpus:
            raise NotImplementedError("speculative decoding under synced_gpus (ZeRO-3, FSDP) is not supported")
        if assistant_model is not None:
            # The call's setting, else the draft model's own, else transformers' default.
            num_tokens = generation_config.num_assistant_tokens or getattr(
                getattr(assistant_model, "generation_config", None), "num_assistant_tokens", None
            )
            drafter = AssistantDrafter(
                assistant_model,
                setting("num_assistant_tokens", num_tokens or DEFAULT_NUM_ASSISTANT_TOKENS, least=1),
                self.codec.initial_vocab_size,
            )
        else:
            ngram = generation_config.max_matching_ngram_size
            max_ngram = (
                DEFAULT_MAX_MATCHING_NGRAM if ngram is None else setting("max_matching_ngram_size", ngram, least=1)
            )
            num_tokens = setting("prompt_lookup_num_tokens", generation_config.prompt_lookup_num_tokens, least=0)
            drafter = PromptLookupDrafter(num_tokens, max_ngram, self.codec.max_subtokens)
        return speculative_decoding(
            self, input_ids, drafter, logits_processor, stopping_criteria, generation_config, streamer, **model_kwargs
        )

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """transformers' checks, less its tokenizer check of a draft model: that compares vocabulary
        sizes, where ours needs only the base ids (`AssistantDrafter` checks it has rows for them)."""
        others = {key: value for key, value in generation_mode_kwargs.items() if key != "assistant_model"}
        return super()._validate_generation_mode(generation_mode, generation_config, others)

    def _beam_search(self, *args, **kwargs):
        with beam_search_vocab_size(self.config.get_text_config(), self.codec.total_vocab_size):
            return super()._beam_search(*args, **kwargs)

    def _get_stopping_criteria(self, generation_config, stopping_criteria, tokenizer=None, **kwargs):
        stop_strings = generation_config.stop_strings
        if stop_strings is None or tokenizer is None:  # transformers raises for a missing tokenizer
            return super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer, **kwargs)
        generation_config = copy.copy(generation_config)
        generation_config.stop_strings = None
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer, **kwargs)
        criteria.append(StopStringsOnText(stop_strings, tokenizer, self.codec))
        return criteria


def _check_cache_continues_the_prompt(kwargs: dict, input_ids) -> None:
    """A cache handed to generate holds a prefix of ``input_ids`` (generate feeds the rest)."""
    cache = next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
    held = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
    if held >= input_ids.shape[1] > 0:
        raise ValueError(
            f"the cache already holds {held} positions and input_ids only {input_ids.shape[1]}: a cache "
            "handed to generate must hold a prefix of them (a new cache, cache.reset(), or cache.crop(n))"
        )


@dataclass
class Zip2ZipGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus ``codebooks``: per row, ``{hyper_id: [base ids]}``."""

    codebooks: list[dict[int, list[int]]] | None = None


@dataclass
class Zip2ZipGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    """`GenerateBeamDecoderOnlyOutput` plus ``codebooks``: per row, ``{hyper_id: [base ids]}``."""

    codebooks: list[dict[int, list[int]]] | None = None


def _with_codebooks(output, codebooks: list[dict[int, list[int]]]):
    """The generate output as our typed subclass of its class, carrying the rows' codebooks."""
    typed = Zip2ZipGenerateBeamOutput if isinstance(output, GenerateBeamDecoderOnlyOutput) else Zip2ZipGenerateOutput
    return typed(**output, codebooks=codebooks)


class PromptStreams:
    """The one place generation rebuilds a row's codebook from its prompt.

    The LZW stream after each distinct prompt is built once; every row that grows from that prompt
    (``num_return_sequences``, beams, a stopping criterion's per-step rows) starts from its own copy
    and is fed the ids written after the prompt.
    """

    def __init__(self, codec: LZWCodec):
        self.codec = codec
        self._after: dict[tuple[int, ...], tuple[LZWStream, list[int]]] = {}

    def start(self, prompt: list[int], out: list[int] | None = None) -> LZWStream:
        """A fresh stream that has read ``prompt`` (compressed ids); ``out``, when given, is extended
        with the prompt's base ids."""
        key = tuple(prompt)
        if key not in self._after:
            stream, base_ids = self.codec.stream(), []
            stream.feed(key, out=base_ids)
            self._after[key] = stream, base_ids
        stream, base_ids = self._after[key]
        if out is not None:
            out.extend(base_ids)
        return stream.copy()


def _real_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each prompt's ids without its padding."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    return [[i for i, keep in zip(row, mask, strict=True) if keep] for row, mask in zip(rows, attention_mask.tolist())]


def _with_tails(prompt_ids: torch.Tensor, tails: list[list[int]], pad_id: int) -> torch.Tensor:
    """Prompt ids (repeated per generated row) followed by each row's base-id tail, right-padded."""
    repeats = len(tails) // len(prompt_ids)
    prompts = prompt_ids.repeat_interleave(repeats, dim=0)
    width = max((len(t) for t in tails), default=0)
    tail = torch.full((len(tails), width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    for row, ids in enumerate(tails):
        tail[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
    return torch.cat([prompts, tail], dim=1)


class _BaseIdStreamer(BaseStreamer):
    """Hands a user's streamer base ids: hypertokens expanded with the row's own codebook."""

    def __init__(self, streamer: BaseStreamer, codec: LZWCodec):
        self.streamer = streamer
        self.prompts = PromptStreams(codec)
        self.stream: LZWStream | None = None

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streamers support batch size 1 only")
        ids = value.reshape(-1).tolist()
        base_ids: list[int] = []
        if self.stream is None:  # the first call carries the prompt
            self.stream = self.prompts.start(ids, out=base_ids)
            self.streamer.put(torch.tensor([base_ids], dtype=value.dtype))
        else:
            self.stream.feed(ids, out=base_ids)
            self.streamer.put(torch.tensor(base_ids, dtype=value.dtype))

    def end(self) -> None:
        self.streamer.end()


class PositionLimit(StoppingCriteria):
    """Stops generation before an id just written could need a position the base model does not have.

    ``max_new_tokens`` counts steps, but in ``position_mode="base"`` an id takes one position per base
    id it stands for, up to M. The id a step writes is fed by the next step, so generation stops once
    the positions a row holds plus the most one id can take pass ``max_positions``. Every row stops
    then: transformers keeps feeding a finished row (its pad id), which takes positions too. The
    positions are read from the call's codebook state where it lives (on the device: no host sync).
    """

    def __init__(self, checks, max_positions: int, positions_per_id: int, position_mode: str):
        self.checks, self.max_positions = checks, max_positions
        self.positions_per_id, self.position_mode = positions_per_id, position_mode

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        states = self.checks.states
        if not states:
            return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        fullest = states[-1].positions_held(self.position_mode).to(input_ids.device).amax()
        return (fullest + self.positions_per_id > self.max_positions).expand(len(input_ids))


class StopStringsOnText(StoppingCriteria):
    """Stops a row once its generated text (decoded through its own codebook) contains a stop string.

    transformers calls stopping criteria after every step with the whole ``input_ids``; the first call
    fixes the prompt length. Each row's decoding state is kept under its ids so far, so a step costs
    one hash of the row plus decoding a short window of base ids, not the whole row again (and beam
    reordering, which reshuffles rows, simply finds each row's state under its own prefix).
    A stop string can only newly appear in text that overlaps the last step: the window holds the
    last step's base ids plus 4 base ids per character of the longest stop string (every base id
    carries at least one UTF-8 byte) and a margin for decoders that treat the first id specially.
    """

    _MARGIN = 8

    def __init__(self, stop_strings: str | list[str], tokenizer, codec: LZWCodec):
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        self.prompt_length: int | None = None
        self._lookback = 4 * max((len(s) for s in self.stop_strings), default=0) + self._MARGIN
        self._prompts = PromptStreams(codec)
        self._rows: dict[tuple[int, ...], tuple[LZWStream, list[int]]] = {}

    def _decode_base(self, base_ids: list[int]) -> str:
        base = getattr(self.tokenizer, "base_tokenizer", None)  # a Zip2ZipTokenizer's rust tokenizer
        if base is not None:
            return base.decode(base_ids, skip_special_tokens=False)
        return self.tokenizer.decode(base_ids)

    def _fresh(self, row: list[int]) -> tuple[LZWStream, list[int]]:
        """The state of ``row`` (without its last id) rebuilt from its prompt."""
        stream, base_ids = self._prompts.start(row[: self.prompt_length]), []
        stream.feed(row[self.prompt_length : -1], out=base_ids)
        return stream, base_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1] - 1
        rows: dict[tuple[int, ...], tuple[LZWStream, list[int]]] = {}
        taken: set[tuple[int, ...]] = set()
        done = []
        for row in input_ids.tolist():
            previous = tuple(row[:-1])
            if previous in self._rows:
                stream, base_ids = self._rows[previous]
                if previous in taken:  # several rows grew from one (beams): each needs its own copy
                    stream, base_ids = stream.copy(), list(base_ids)
                taken.add(previous)
            else:
                stream, base_ids = self._fresh(row)
            before = len(base_ids)
            stream.feed(row[-1:], out=base_ids)
            rows[tuple(row)] = (stream, base_ids)
            text = self._decode_base(base_ids[max(0, before - self._lookback) :])
            done.append(any(s in text for s in self.stop_strings))
        self._rows = rows
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
