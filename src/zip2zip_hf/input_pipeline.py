"""The input pipeline `Zip2ZipModel` and `Zip2ZipForCausalLM` share: compressed ids to the base
model's last hidden states.

For a block of ids, `Zip2ZipInputPipeline`:

1. checks the inputs and settles, before any tensor work, the cache and codebook state to continue,
   the positions whose logits are wanted, the padding mask and the base model's keyword arguments
   (a `BlockPlan`); `all_or_nothing` makes the block one transaction of the cache and its codebooks;
2. feeds the ids to the codebooks (`HyperState.consume`, or the collator's precomputed codebooks),
   encodes the entries they installed with the input hyper-encoder, and embeds the block: base rows
   for base ids, the entries' vectors for hyper ids;
3. runs the base model's decoder on those embeddings, at the positions the codebooks give.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel

from ._compat import cache_keyword, pop_cache, truncate_cache
from .cache_zip2zip import Zip2ZipCache, Zip2ZipStaticCache
from .codebook_blocks import ConsumedBlock, EntryBatch
from .hyper_encoder import encode_entries
from .hyper_state import DeferredLegalityChecks, HyperState
from .lzw import LZWCodec
from .precomputed_codebooks import precomputed_block, whole_codebook_table


__all__ = ["BlockPlan", "Zip2ZipInputPipeline", "all_or_nothing"]


@dataclass
class BlockPlan:
    """What a forward settles before a block runs.

    Attributes:
        cache / state: the cache to pass on and its codebooks (None with precomputed codebooks).
        past_length: positions held before this block (what a failed block rolls back to).
        keep: the positions whose logits are computed.
        mask: ``(B, T)`` this block's padding mask.
        precomputed: the `ConsumedBlock` and `EntryBatch` from ``codebooks=`` (None otherwise).
        base_kwargs: the base model's keyword arguments, but the embeddings and positions.
        cache_position: ``(T,)`` this block's positions in the cache.
        deferred_checks: where the block's legality check goes instead of being read when it ends
            (`DeferredLegalityChecks`, from `generate`), or None.
        score_provisional: whether the provisional entry gets a logit (the causal LM's head).
        open_kept: ``(B, kept)`` True at the kept positions after which any legal id may follow,
            canonical or not: the end of a prompt (``open_phrase_at``); None for none.
    """

    cache: Cache | None
    state: HyperState | None
    past_length: int
    keep: list[int]
    mask: torch.Tensor
    precomputed: tuple[ConsumedBlock, EntryBatch] | None
    base_kwargs: dict
    cache_position: torch.LongTensor
    deferred_checks: DeferredLegalityChecks | None = None
    score_provisional: bool = True
    open_kept: torch.BoolTensor | None = None


class Zip2ZipInputPipeline:
    """The input side of both zip2zip models (a mixin of `Zip2ZipPreTrainedModel`).

    It owns what it reads: `_init_input_pipeline` sets every attribute below, and the class declares
    them. From its host it takes only what every ``PreTrainedModel`` has: ``config`` and ``training``.
    Whether the codebook state keeps output vectors (the host has a head) is an argument of
    `_plan_block`, not a property of the class.

    Attributes:
        language_model: the wrapped base model (a whole ``*ForCausalLM`` for the causal LM, its
            decoder alone for the bare model).
        input_hyper_encoder: maps an entry's base ids to its input vector, over input-embedding rows.
        codec: the LZW codec of the config's compression settings.
        codebooks_on_device: where decoding steps keep the codebooks (`HyperState`): None (the
            default) on the model's device when it is an accelerator, in Python streams on a CPU;
            True or False to choose. The logits are the same either way.
    """

    language_model: PreTrainedModel
    input_hyper_encoder: nn.Module
    codec: LZWCodec
    codebooks_on_device: bool | None = None
    # The decoder's forward parameters, and the name under which it takes the cache.
    _base_forward_params: frozenset[str]
    _base_cache_keyword: str

    def _init_input_pipeline(self, config, language_model: PreTrainedModel, input_hyper_encoder: nn.Module) -> None:
        """Set what the pipeline reads: the base model, the input hyper-encoder, the codec, and what
        the decoder's signature says (asked once here, not per call)."""
        self.language_model = language_model
        self.input_hyper_encoder = input_hyper_encoder
        self.codec = config.codec()
        self._base_forward_params = frozenset(inspect.signature(self._decoder().forward).parameters)
        self._base_cache_keyword = cache_keyword(self._base_forward_params)

    def _decoder(self) -> nn.Module:
        """The base model's decoder: what turns input embeddings into last hidden states."""
        return self.language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @torch.compiler.disable  # checks and Python bookkeeping: never part of a compiled step
    def _plan_block(
        self,
        input_ids,
        attention_mask,
        cache,
        use_cache,
        kwargs: dict,
        *,
        has_head: bool,
        inputs_embeds,
        codebooks,
        validate_codebooks: bool = False,
        deferred_checks: DeferredLegalityChecks | None = None,
        labels=None,
        logits_to_keep=0,
        score_provisional: bool = True,
        open_phrase_at: int | torch.BoolTensor | None = None,
    ) -> BlockPlan:
        """Check the inputs and settle everything a block needs before it runs (see `BlockPlan`).
        ``has_head``: whether a fresh codebook state keeps output vectors too; ``labels``,
        ``logits_to_keep``, ``score_provisional`` and ``open_phrase_at`` are the head's."""
        cache = pop_cache(kwargs, cache)
        check_input_ids(input_ids, inputs_embeds)
        batch_size, length = input_ids.shape
        if labels is not None and tuple(labels.shape) != (batch_size, length):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids {(batch_size, length)}")
        keep = kept_positions(length, 0 if labels is not None else logits_to_keep)
        open_kept = open_kept_positions(open_phrase_at, input_ids, keep)
        # No mask given means no padding. With a cache the base model is told so (None): a mask of
        # ones would make it read the mask back to find that out (a host sync per step). Without a
        # cache it gets the ones, or it would take the jumps of base positions for packed sequences.
        pass_mask = attention_mask is not None or cache is None
        if codebooks is not None:
            if use_cache or (cache is not None and cache.get_seq_length()):
                raise ValueError("codebooks= describe whole sequences: pass them without a cache and use_cache=False")
            attention_mask = checked_attention_mask(attention_mask, input_ids, 0)
            precomputed = precomputed_block(
                codebooks,
                input_ids,
                attention_mask,
                keep,
                self.codec,
                self.config.position_mode,
                validate=validate_codebooks,
            )
            cache = state = None
        else:
            use_cache = use_cache if use_cache is not None else self.config.get_text_config().use_cache
            cache, state = self._resolve_state(cache, batch_size, use_cache, has_head)
            attention_mask = checked_attention_mask(attention_mask, input_ids, state.num_positions)
            max_positions = cache.max_positions if isinstance(cache, Zip2ZipStaticCache) else None
            state.prepare(input_ids, self.get_input_embeddings().weight, max_positions)
            precomputed = None
        block_mask = attention_mask[:, -length:].contiguous()
        if isinstance(cache, Zip2ZipStaticCache):
            if attention_mask.shape[1] > cache.max_positions:
                raise ValueError(
                    f"the static cache holds {cache.max_positions} positions but this call needs "
                    f"{attention_mask.shape[1]}: make it larger (max_cache_len)"
                )
            # As wide as the cache, so that a compiled step sees the same shapes at every step.
            attention_mask = F.pad(attention_mask, (0, cache.max_positions - attention_mask.shape[1]))
        base_kwargs = {
            "attention_mask": attention_mask if pass_mask else None,
            self._base_cache_keyword: cache,
            "use_cache": cache is not None,
            "return_dict": True,
            **kwargs,
        }
        past_length = state.num_positions if state is not None else 0
        cache_position = torch.arange(past_length, past_length + length, device=input_ids.device)
        if "cache_position" in self._base_forward_params and kwargs.get("cache_position") is None:
            # Up to 4.57 the base model would otherwise ask the cache, which a static cache answers
            # by reading its keys back (a sync, and no graph for a compiled step).
            base_kwargs["cache_position"] = cache_position
        return BlockPlan(
            cache,
            state,
            past_length,
            keep,
            block_mask,
            precomputed,
            base_kwargs,
            cache_position,
            deferred_checks,
            score_provisional,
            open_kept,
        )

    def _resolve_state(self, cache: Cache | None, batch_size: int, use_cache: bool, has_head: bool):
        """The cache to pass on and the codebook state to continue (fresh when nothing is cached)."""
        state = getattr(cache, "hyper_state", None)
        if state is not None and state.num_positions > 0:
            if state.batch_size != batch_size:
                raise ValueError(f"input_ids has {batch_size} rows but the cache holds {state.batch_size}")
            return cache, state
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(
                f"the cache ({type(cache).__name__}) carries no zip2zip codebook state: pass the cache "
                "this model returned"
            )
        if cache is not None and type(cache) not in (Zip2ZipCache, Zip2ZipStaticCache, DynamicCache):
            raise NotImplementedError(
                f"{type(cache).__name__} is not supported: a zip2zip model keeps its codebooks in its own "
                "cache classes, Zip2ZipCache (dynamic) and Zip2ZipStaticCache (static); offloaded and "
                "quantized caches are not supported yet"
            )
        max_positions = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        state = HyperState(self.codec, batch_size, self.codebooks_on_device, has_head, max_positions)
        if not use_cache:
            return None, state
        # An empty DynamicCache from elsewhere (e.g. the one generate() makes) is replaced by ours,
        # which generate() then carries on from our output.
        if type(cache) not in (Zip2ZipCache, Zip2ZipStaticCache):
            cache = Zip2ZipCache(config=self.config.get_text_config())
        cache.hyper_state = state
        return cache, state

    def _embed_block(self, input_ids: torch.LongTensor, block: BlockPlan):
        """Consume a block of ids (or take its precomputed codebooks), encode and store the input
        vectors of the entries it installed, and embed it: base rows for base ids, the input table's
        vectors for hyper ids. Returns the `ConsumedBlock`, the new entries (on the ids' device) and the
        embeddings."""
        if block.state is None:
            consumed, entries = block.precomputed
        else:
            consumed = block.state.consume(
                input_ids, block.mask, block.keep, self.config.position_mode, block.cache_position
            )
            entries = block.state.unencoded_entries()
        device = input_ids.device
        consumed = consumed.to(device)
        entries = EntryBatch(entries.rows, entries.slots, entries.subtokens.to(device), entries.lengths.to(device))
        subtokens, lengths = entries.subtokens, entries.lengths
        # Under DDP every rank must use every encoder parameter every step, whether or not its batch
        # installs or reads any hypertoken: when training, the encoder runs on a dummy entry if there
        # is none, and its output joins the embeddings times exactly 0.
        anchor = self.training and torch.is_grad_enabled()
        n_new = len(subtokens)
        if anchor and n_new == 0:
            subtokens, lengths = subtokens.new_zeros(1, subtokens.shape[1]), lengths.new_ones(1)
        vectors = encode_entries(self.input_hyper_encoder, subtokens, lengths, self.get_input_embeddings().weight)
        new_vectors = vectors if len(vectors) == n_new else vectors[:n_new]  # without the dummy
        if block.state is None:
            input_table = whole_codebook_table(new_vectors, input_ids.shape[0])
        else:
            input_table = block.state.write_input_vectors(entries, new_vectors)

        V = self.codec.initial_vocab_size
        is_hyper = input_ids >= V
        # Hyper ids take their vectors below. Ids outside the id space are reported once the step
        # is queued (`raise_if_illegal`); until then they read a row in bounds.
        inputs_embeds = self.get_input_embeddings()(input_ids.clamp(0, V - 1))
        if anchor:
            inputs_embeds = inputs_embeds + 0.0 * vectors.sum()
        if input_table is None or input_table.shape[1] == 0:
            return consumed, entries, inputs_embeds  # no entry installed, so no hyper id was legal
        slots = (input_ids - V).clamp(0, input_table.shape[1] - 1)
        vectors = input_table.gather(1, slots[..., None].expand(-1, -1, input_table.shape[-1]))
        inputs_embeds = torch.where(
            (is_hyper & consumed.real)[..., None], vectors.to(inputs_embeds.dtype), inputs_embeds
        )
        return consumed, entries, inputs_embeds

    def _run_decoder(self, input_ids: torch.LongTensor, block: BlockPlan):
        """The input pipeline both classes share: `_embed_block`, then the base model's decoder at the
        codebook's positions. Returns the `ConsumedBlock`, the new entries and the decoder's output."""
        consumed, entries, inputs_embeds = self._embed_block(input_ids, block)
        outputs = self._decoder()(inputs_embeds=inputs_embeds, position_ids=consumed.positions, **block.base_kwargs)
        return consumed, entries, outputs


def check_input_ids(input_ids, inputs_embeds) -> None:
    """Compressed ids are the only input: a non-empty 2-D integer tensor, and no embeddings."""
    if input_ids is None or inputs_embeds is not None:
        raise ValueError(
            "a zip2zip model needs input_ids (not inputs_embeds): hypertokens are embedded from the codebook"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")


def checked_attention_mask(attention_mask, input_ids: torch.Tensor, past_length: int) -> torch.Tensor:
    """The ``(B, past + T)`` mask, all ones when none is given; any other shape is an error (a
    broadcast mask would let rows skip their own codebook)."""
    batch_size, length = input_ids.shape
    expected = (batch_size, past_length + length)
    if attention_mask is None:
        return torch.ones(expected, dtype=torch.long, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != expected:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must be a (batch, past + length) = {expected} tensor of 0/1, got {shape}")
    return attention_mask.contiguous()  # a sliced mask would give a compiled step another layout each time


def kept_positions(length: int, logits_to_keep) -> list[int]:
    """Positions whose logits are computed: the last ``logits_to_keep`` (0: all), or the given indices."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
        keep = logits_to_keep.tolist()
        if logits_to_keep.dtype.is_floating_point or any(not 0 <= t < length for t in keep):
            raise ValueError(f"logits_to_keep indices must be ints in [0, {length}), got {keep}")
        return keep
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 0:
        logits_to_keep = logits_to_keep.item()
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(
            f"logits_to_keep must be an int >= 0 (0 keeps all) or a 1-D tensor of positions, got {logits_to_keep!r}"
        )
    if logits_to_keep and logits_to_keep < length:
        return list(range(length - logits_to_keep, length))
    return list(range(length))


@contextlib.contextmanager
def all_or_nothing(block: BlockPlan, input_ids: torch.LongTensor):
    """The block as one transaction of its state (`HyperState.block`: snapshot, count, legality
    check, record or roll back), plus the positions the base model may already have written into
    the cache, cut back on failure, so a caller that catches the error keeps its cache."""
    state = block.state
    transaction = (
        state.block(input_ids, block.mask, block.deferred_checks) if state is not None else contextlib.nullcontext()
    )
    try:
        with transaction:
            yield
    except BaseException:
        if block.cache is not None:
            _truncate(block.cache, block.past_length)
        raise


_truncate = torch.compiler.disable(truncate_cache)  # the rollback stays eager, whoever compiles the model


def open_kept_positions(open_phrase_at, input_ids: torch.LongTensor, keep: list[int]) -> torch.BoolTensor | None:
    """``(B, kept)`` True at the kept positions that ``open_phrase_at`` names (None for None): an
    index into the block (negative from the end) for every row, or a ``(B, T)`` bool tensor, per row.
    A ValueError names anything else."""
    if open_phrase_at is None:
        return None
    batch_size, length = input_ids.shape
    if isinstance(open_phrase_at, torch.Tensor):
        if open_phrase_at.dtype != torch.bool or tuple(open_phrase_at.shape) != (batch_size, length):
            raise ValueError(
                f"open_phrase_at as a tensor must be a bool tensor shaped like input_ids {(batch_size, length)}, "
                f"got a {open_phrase_at.dtype} tensor of shape {tuple(open_phrase_at.shape)}"
            )
        return open_phrase_at[:, keep].to(input_ids.device)
    if (
        isinstance(open_phrase_at, bool)
        or not isinstance(open_phrase_at, int)
        or not -length <= open_phrase_at < length
    ):
        raise ValueError(
            f"open_phrase_at must be an index into this block's {length} ids or a (batch, length) bool tensor, "
            f"got {open_phrase_at!r}"
        )
    kept = torch.tensor(keep, device=input_ids.device) == open_phrase_at % length
    return kept[None, :].expand(batch_size, len(keep))
