"""Zip2ZipForCausalLM: any Hugging Face causal LM reading and writing per-sequence hypertokens.

A forward pass:

1. hands the new ids to the batch's `HyperState`, which feeds each row through its canonical LZW
   stream, validating each id and recording, per position, which hyper ids are legal next;
2. encodes only the entries installed since the last call, with the input hyper-encoder over
   input-embedding rows and the output hyper-encoder over lm_head rows;
3. runs the base model on mixed embeddings (base rows for base ids, encoder vectors for hyper ids)
   with positions from the codebook state (``position_mode``);
4. widens the logits to ``V + K``: hyper logit k is ``h . f_out(lm_head[entry k])``; every id not
   legal at that position (uninstalled slots, model rows in ``[V, vocab_size)``) is ``-inf``.

The codebook state travels in the returned `Zip2ZipCache`, so incremental calls continue it and
calls without a cache rebuild it from ``input_ids``: teacher forcing and step-by-step decoding see
the same codebook, legal set and positions at every step.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Cache, DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# transformers 4.57 copies a local checkpoint's remote code one import deep (the files this module
# imports, not theirs), so every core file the model needs is imported here by name (the F401s).
from ._compat import cache_keyword, forget_key_mapping, output_cache_field, pop_cache, truncate_cache
from .cache_zip2zip import Zip2ZipCache, Zip2ZipStaticCache
from .codebook_blocks import ConsumedBlock, EntryBatch
from .codebook_rows import StreamRows  # noqa: F401
from .configuration_zip2zip import COMPRESSION_KEYS, ZIP2ZIP_FORMAT_VERSION, Zip2ZipConfig
from .generation_zip2zip import Zip2ZipGenerationMixin
from .hyper_encoder import build_hyper_encoder
from .hyper_state import HyperState
from .lzw import DEFAULT_MAX_CODEBOOK_SIZE, DEFAULT_MAX_SUBTOKENS
from .lzw_tensors import DeviceCodebooks  # noqa: F401
from .precomputed_codebooks import precomputed_block
from .speculative_zip2zip import speculative_decoding  # noqa: F401


__all__ = ["HYPER_ENCODER_NAMES", "Zip2ZipForCausalLM", "Zip2ZipModel", "Zip2ZipPreTrainedModel"]

# The modules this class adds to the base model (attribute and weight-name prefix).
HYPER_ENCODER_NAMES = ("input_hyper_encoder", "output_hyper_encoder")
# Checkpoints of format 1 named the wrapped model's weights ``model.*``; a regex no format-2 name
# matches, so it is safe to apply to every checkpoint.
FORMAT_1_KEY_MAPPING = {r"^model\.": "language_model."}
# What every saved config.json lists for remote code, whichever of the two classes saved it.
_MODEL_AUTO_MAP = {
    "AutoModel": "modeling_zip2zip.Zip2ZipModel",
    "AutoModelForCausalLM": "modeling_zip2zip.Zip2ZipForCausalLM",
}
# `from_pretrained` arguments that say where a checkpoint is (its config is read with the same ones).
_HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class Zip2ZipPreTrainedModel(PreTrainedModel):
    config_class = Zip2ZipConfig
    # Not an attribute name: the wrapped object is a whole *ForCausalLM, and a prefix equal to an
    # attribute would let transformers half-load a plain base checkpoint into the wrapper.
    base_model_prefix = "zip2zip"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    codebooks_on_device: bool | None = None
    _has_head = False  # whether the codebook state keeps output vectors (an output table)

    def _build_input_side(self, config: Zip2ZipConfig, language_model: PreTrainedModel) -> None:
        """What both the bare model and the LM own: the base model, the input hyper-encoder, the codec."""
        self.language_model = language_model
        residual = getattr(config, "input_hyper_encoder_residual", "mean")
        self.input_hyper_encoder = build_hyper_encoder(**_encoder_settings(config), residual=residual)
        self.codec = config.codec()
        self._base_forward_params = set(inspect.signature(self._decoder().forward).parameters)
        self._base_cache_keyword = cache_keyword(self._base_forward_params)

    def _decoder(self) -> nn.Module:
        """The base model's decoder: what turns input embeddings into last hidden states."""
        return self.language_model

    def _init_weights(self, module: nn.Module) -> None:
        # The base model's own modules are initialised by its own `_init_weights` (transformers
        # dispatches to the nearest PreTrainedModel); here only the hyper-encoders remain.
        if hasattr(module, "reset_parameters") and module in self._hyper_encoder_modules():
            module.reset_parameters()

    def _hyper_encoder_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self, name, None) for name in HYPER_ENCODER_NAMES) if m is not None]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but loud: missing or mis-shaped weights raise, and so do
        weights the model has no place for (e.g. after editing ``hyper_encoder``,
        ``tie_hyper_encoders`` or the base model's ``num_hidden_layers`` in config.json): trained
        weights are never silently dropped."""
        want_info = kwargs.pop("output_loading_info", False)
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        mapping = {**FORMAT_1_KEY_MAPPING, **cls._checkpoint_key_mapping(path, kwargs)}
        kwargs["key_mapping"] = {**mapping, **(kwargs.get("key_mapping") or {})}
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # The weights are in today's layout now, and are saved so.
        forget_key_mapping(model, mapping)
        model.config.zip2zip_format_version = ZIP2ZIP_FORMAT_VERSION
        problems = [f"missing: {k}" for k in info.get("missing_keys", ())]
        problems += [f"mis-shaped: {m[0] if isinstance(m, tuple) else m}" for m in info.get("mismatched_keys", ())]
        # transformers has already left out what the class ignores (`_keys_to_ignore_on_load_unexpected`);
        # 4.57 does not apply the base model's own list, so it is applied here too.
        ignored = [
            re.compile(p) for p in getattr(model.language_model, "_keys_to_ignore_on_load_unexpected", None) or ()
        ]
        unexpected = [k for k in info.get("unexpected_keys", ()) if not any(p.search(k) for p in ignored)]
        problems += [f"unexpected: {k}" for k in unexpected]
        if problems:
            raise ValueError("the checkpoint does not match the model: " + "; ".join(sorted(problems)))
        _check_saved_tokenizer(model.config, path)
        return (model, info) if want_info else model

    @classmethod
    def _checkpoint_key_mapping(cls, path, kwargs: dict) -> dict[str, str]:
        """Renames from a saved checkpoint's weight names to this class's (none here)."""
        return {}

    def save_pretrained(self, *args, **kwargs):
        # Both Auto classes in every saved config.json, whichever class is saved: AutoModel gives the
        # bare model and AutoModelForCausalLM the LM, from one checkpoint, as for built-in models.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_MODEL_AUTO_MAP}
        return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ------------------------------------------------------------------ a block of ids (both classes)

    @torch.compiler.disable  # checks and Python bookkeeping: never part of a compiled step
    def _plan_block(
        self, input_ids, attention_mask, cache, use_cache, kwargs: dict, *, inputs_embeds, codebooks, **head
    ) -> _Block:
        """Check the inputs and settle everything a block needs before it runs (see `_Block`).
        ``head``: the LM's ``labels`` and ``logits_to_keep``; ``validate_codebooks``."""
        labels, logits_to_keep = head.get("labels"), head.get("logits_to_keep", 0)
        cache = pop_cache(kwargs, cache)
        _check_input_ids(input_ids, inputs_embeds)
        batch_size, length = input_ids.shape
        if labels is not None and tuple(labels.shape) != (batch_size, length):
            raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids {(batch_size, length)}")
        keep = _kept_positions(length, 0 if labels is not None else logits_to_keep)
        if codebooks is not None:
            if use_cache or (cache is not None and cache.get_seq_length()):
                raise ValueError("codebooks= describe whole sequences: pass them without a cache and use_cache=False")
            attention_mask = _checked_attention_mask(attention_mask, input_ids, 0)
            precomputed = precomputed_block(
                codebooks,
                input_ids,
                attention_mask,
                keep,
                self.codec,
                self.config.position_mode,
                validate=head.get("validate_codebooks", False),
            )
            cache = state = None
        else:
            use_cache = use_cache if use_cache is not None else self.config.get_text_config().use_cache
            cache, state = self._resolve_state(cache, batch_size, use_cache)
            attention_mask = _checked_attention_mask(attention_mask, input_ids, state.num_positions)
            state.prepare(input_ids, self.get_input_embeddings().weight)
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
            "attention_mask": attention_mask,
            self._base_cache_keyword: cache,
            "use_cache": cache is not None,
            "return_dict": True,
            **kwargs,
        }
        past_length = state.num_positions if state is not None else 0
        if "cache_position" in self._base_forward_params and kwargs.get("cache_position") is None:
            # Up to 4.57 the base model would otherwise ask the cache, which a static cache answers
            # by reading its keys back (a sync, and no graph for a compiled step).
            base_kwargs["cache_position"] = torch.arange(past_length, past_length + length, device=input_ids.device)
        return _Block(cache, state, past_length, keep, block_mask, precomputed, base_kwargs)

    def _resolve_state(self, cache: Cache | None, batch_size: int, use_cache: bool):
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
        state = HyperState(self.codec, batch_size, self.codebooks_on_device, has_head=self._has_head)
        if not use_cache:
            return None, state
        # An empty DynamicCache from elsewhere (e.g. the one generate() makes) is replaced by ours,
        # which generate() then carries on from our output.
        if type(cache) not in (Zip2ZipCache, Zip2ZipStaticCache):
            cache = Zip2ZipCache(config=self.config.get_text_config())
        cache.hyper_state = state
        return cache, state

    def _consume_block(self, input_ids: torch.LongTensor, block: _Block) -> tuple[ConsumedBlock, EntryBatch]:
        """The block's `ConsumedBlock` and the entries it installed (precomputed ones, or from the state)."""
        if block.state is None:
            step, entries = block.precomputed
        else:
            step = block.state.consume(input_ids, block.mask, block.keep, self.config.position_mode)
            entries = block.state.unencoded_entries()
        return step.to(input_ids.device), entries

    def _embed(self, input_ids: torch.LongTensor, step: ConsumedBlock, input_table: torch.Tensor | None):
        """Input embeddings: base rows for base ids, the input table's vectors for hyper ids."""
        V = self.codec.initial_vocab_size
        is_hyper = input_ids >= V
        # Ids outside the id space are reported after the step is queued (`raise_if_illegal`);
        # until then they read row 0, never out of bounds.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_hyper | (input_ids < 0), 0))
        if input_table is None or input_table.shape[1] == 0:
            return inputs_embeds  # no entry installed, so no hyper id was legal
        slots = (input_ids - V).clamp(0, input_table.shape[1] - 1)
        vectors = input_table.gather(1, slots[..., None].expand(-1, -1, input_table.shape[-1]))
        return torch.where((is_hyper & step.real)[..., None], vectors.to(inputs_embeds.dtype), inputs_embeds)


class Zip2ZipModel(Zip2ZipPreTrainedModel):
    """The bare zip2zip model: compressed ids in, the base model's last hidden states out, one per
    compressed position (what ``AutoModel`` gives, as ``LlamaModel`` is to ``LlamaForCausalLM``).

    It reads ids exactly as `Zip2ZipForCausalLM` does (codebook state, input hyper-encoder, positions
    from ``position_mode``, the cache) and has no head: no output hyper-encoder, no logits. Loading a
    `Zip2ZipForCausalLM` checkpoint gives the same weights but the head's.
    """

    # A causal-LM checkpoint's head: not part of the bare model.
    _keys_to_ignore_on_load_unexpected = [r"^output_hyper_encoder\.", r"^language_model\.lm_head\."]

    def __init__(self, config: Zip2ZipConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            base_model = AutoModel.from_config(config.text_config)
        self._build_input_side(config, base_model)
        self.post_init()

    @classmethod
    def _checkpoint_key_mapping(cls, path, kwargs: dict) -> dict[str, str]:
        """A causal-LM checkpoint names the base model's decoder ``language_model.<prefix>.*`` (``model``
        for Llama, ``transformer`` for GPT-2); here it is ``language_model.*``."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            hub = {key: kwargs[key] for key in _HUB_KEYWORDS if key in kwargs}
            config = cls.config_class.from_pretrained(path, **hub)
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config.get_text_config()), None)
        prefix = getattr(causal_lm, "base_model_prefix", "")
        return {rf"^language_model\.{re.escape(prefix)}\.": "language_model."} if prefix else {}

    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        codebooks: dict[str, torch.Tensor] | None = None,
        validate_codebooks: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""Run the base model's decoder on compressed ids.

        Takes `Zip2ZipForCausalLM.forward`'s arguments but the head's (``labels``, ``logits_to_keep``).

        Returns:
            `BaseModelOutputWithPast` whose ``last_hidden_state`` is ``(B, T, hidden)``, one vector per
            compressed position, with the cache under the name the installed transformers uses.
        """
        kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        block = self._plan_block(
            input_ids,
            attention_mask,
            cache,
            use_cache,
            kwargs,
            inputs_embeds=inputs_embeds,
            codebooks=codebooks,
            validate_codebooks=validate_codebooks,
        )
        with _all_or_nothing(block, input_ids):
            step, entries = self._consume_block(input_ids, block)
            subtokens, lengths = entries.subtokens.to(input_ids.device), entries.lengths.to(input_ids.device)
            vectors = _encode(self.input_hyper_encoder, subtokens, lengths, self.get_input_embeddings().weight)
            input_table, _ = _tables(block.state, entries, input_ids.shape[0], vectors)
            inputs_embeds = self._embed(input_ids, step, input_table)
            outputs = self.language_model(
                inputs_embeds=inputs_embeds, position_ids=step.positions, **block.base_kwargs
            )
        output = BaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{output_cache_field(BaseModelOutputWithPast): block.cache},
        )
        return output.to_tuple() if return_dict is False else output


class Zip2ZipForCausalLM(Zip2ZipPreTrainedModel, Zip2ZipGenerationMixin):
    """A causal LM whose vocabulary grows per sequence with LZW hypertokens.

    Build one around a loaded model with `from_base` (or `from_base_pretrained`), load a saved one
    with ``AutoModelForCausalLM.from_pretrained(path)`` after ``import zip2zip_hf``, or with
    ``trust_remote_code=True`` without the package.

    Attributes:
        codebooks_on_device: where decoding steps keep the codebooks (`HyperState`): None (the
            default) on the model's device when it is an accelerator, in Python streams on a CPU;
            True or False to choose. The logits are the same either way.
    """

    _has_head = True

    def __init__(self, config: Zip2ZipConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        self._build_input_side(
            config, base_model if base_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        tied = config.tie_hyper_encoders
        self.output_hyper_encoder = None if tied else build_hyper_encoder(**_encoder_settings(config))
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base_model: PreTrainedModel, tokenizer, **config_kwargs) -> Zip2ZipForCausalLM:
        """Wrap an already-loaded causal LM without changing its weights.

        Args:
            base_model: any Hugging Face ``*ForCausalLM``.
            tokenizer: the `Zip2ZipTokenizer` made from the base model's tokenizer; its compression
                settings (V, K, M, disabled ids) and special ids go into the config.
            config_kwargs: the other `Zip2ZipConfig` settings: ``hyper_encoder`` (``"attention"`` or
                ``"mean"``), ``position_mode`` (``"base"`` or ``"compressed"``), ``tie_hyper_encoders``,
                ``hyper_encoder_hidden_size`` / ``_num_layers`` / ``_num_heads``,
                ``input_hyper_encoder_residual`` (default here ``"last"`` for untied attention
                encoders: a fresh wrap then starts closer to its base).
        """
        untied_attention = config_kwargs.get("hyper_encoder", "attention") == "attention"
        if untied_attention and not config_kwargs.get("tie_hyper_encoders"):
            config_kwargs.setdefault("input_hyper_encoder_residual", "last")
        clash = sorted(set(config_kwargs) & {*COMPRESSION_KEYS, "pad_token_id"})
        if clash:
            raise ValueError(f"{', '.join(clash)} come from the tokenizer: build it with the settings you want")
        config = Zip2ZipConfig(
            text_config=base_model.config,
            **tokenizer.codec.settings(),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **config_kwargs,
        )
        config.check_tokenizer(tokenizer)
        model = cls(config, base_model=base_model)
        model._check_head_reproduces_base()
        for encoder in model._hyper_encoder_modules():
            encoder.to(device=base_model.device, dtype=base_model.dtype)
        model.generation_config = base_model.generation_config
        model.name_or_path = base_model.name_or_path
        return model

    @classmethod
    def from_base_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        max_codebook_size: int = DEFAULT_MAX_CODEBOOK_SIZE,
        max_subtokens: int = DEFAULT_MAX_SUBTOKENS,
        **kwargs,
    ):
        """Load a base causal LM and its tokenizer, wrap both; return ``(model, tokenizer)``.

        `Zip2ZipConfig` settings (``hyper_encoder``, ``position_mode``, ...) are taken from ``kwargs``
        for `from_base`; the rest go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
        ``device_map``, ...).
        """
        from .tokenization_zip2zip import Zip2ZipTokenizer

        config_keys = set(inspect.signature(Zip2ZipConfig.__init__).parameters) - {"self", "text_config", "kwargs"}
        config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in config_keys}
        base_model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = Zip2ZipTokenizer.from_base(
            pretrained_model_name_or_path, max_codebook_size=max_codebook_size, max_subtokens=max_subtokens
        )
        return cls.from_base(base_model, tokenizer, **config_kwargs), tokenizer

    # ------------------------------------------------------------------ embeddings (PEFT, resize)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self._decoder()

    def _decoder(self) -> nn.Module:
        return _decoder_of(self.language_model)

    @torch.no_grad()
    def _check_head_reproduces_base(self) -> None:
        """Refuse a base model that does to its logits what `_postprocess_logits` does not know:
        the hyper logits would miss it. Checked on two ids, the base model's forward against ours."""
        base = self.language_model
        was_training = base.training
        base.eval()  # no dropout: both runs must see the same activations
        try:
            ids = torch.tensor([[0, 1]], device=base.device)
            expected = base(input_ids=ids, use_cache=False).logits
            hidden = self._decoder()(input_ids=ids, use_cache=False).last_hidden_state
            ours = self._postprocess_logits(self.get_output_embeddings()(hidden))
        finally:
            base.train(was_training)
        if not torch.allclose(ours.float(), expected.float(), rtol=1e-3, atol=1e-3):
            raise NotImplementedError(
                f"{type(base).__name__} changes its head's logits in a way zip2zip cannot apply to "
                "hypertoken logits (known: logit_scale, logits_scaling, final_logit_softcapping)"
            )

    def _output_hyper_encoder(self) -> nn.Module:
        return self.output_hyper_encoder if self.output_hyper_encoder is not None else self.input_hyper_encoder

    # ------------------------------------------------------------------ forward

    # Eager itself, whoever compiles the model: the checks and the codebooks' phase switch
    # (`_plan_block`), the snapshot, the rollback and the legality check are Python. What
    # ``torch.compile`` compiles is the block's tensor work (`_run_block` and all it calls): one graph
    # of fixed shapes per decoding step once the codebooks are on the device.
    @torch.compiler.disable(recursive=False)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        codebooks: dict[str, torch.Tensor] | None = None,
        validate_codebooks: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""Run the base model on compressed ids.

        Args:
            input_ids: ``(B, T)`` compressed ids: base ids ``< V`` and hyper ids ``V + k``. Without a
                cache, the whole sequences; with a cache, only the new ids of each row.
            attention_mask: ``(B, past + T)``; 0 marks padding, which is skipped by the codebook.
            position_ids: accepted for API compatibility and ignored: positions always come from the
                attention mask and the codebook (``position_mode``), so padding and caching cannot
                make them disagree with the codebook.
            cache: the `Zip2ZipCache` a previous call returned (it carries the codebooks); also taken
                as ``past_key_values``, its name before transformers 5.24.
            labels: ``(B, T)`` targets in compressed id space (``-100`` ignored), shifted inside.
            logits_to_keep: compute logits for the last this many positions only (0: all), or a 1-D
                tensor of the positions to keep.
            codebooks: the codebooks of these whole sequences, precomputed as tensors by
                `codebook_tensors` (as `Zip2ZipDataCollator` does, off the critical path), so the
                forward runs no Python over the ids. Only without a cache (``use_cache=False``). The
                same logits and loss as without them. They are checked against the ids and the
                settings (one host sync); ``validate_codebooks=True`` also compares them with what
                the codec makes of the ids (a Python pass: for checking a custom collator).
            num_items_in_batch (in ``kwargs``): the Trainer's token count for gradient accumulation.

        Returns:
            `CausalLMOutputWithPast` whose ``logits`` are ``V + K`` wide; ids that are not legal at a
            position are ``-inf`` there. The cache is returned under the name the installed
            transformers reads (``cache`` from 5.24 on, ``past_key_values`` before).

        Raises:
            ValueError: bad input (shapes, ids outside the id space or not legal at their position, a
                cache this model did not make). Nothing is changed then: the cache holds exactly what
                it held before the call.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.update(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        block = self._plan_block(
            input_ids,
            attention_mask,
            cache,
            use_cache,
            kwargs,
            inputs_embeds=inputs_embeds,
            codebooks=codebooks,
            labels=labels,
            logits_to_keep=logits_to_keep,
            validate_codebooks=validate_codebooks,
        )
        with _all_or_nothing(block, input_ids):
            step, logits, outputs = self._run_block(input_ids, block)
            loss = self._loss(logits, labels, step, num_items_in_batch) if labels is not None else None

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{output_cache_field(): block.cache},
        )
        return output.to_tuple() if return_dict is False else output

    def _run_block(self, input_ids: torch.LongTensor, block: _Block):
        """Consume a block of ids (or take its precomputed block and entries), then return the
        `ConsumedBlock`, the widened logits and the base model's output.

        Tensor work only, once the codebooks are on the device: one graph for ``torch.compile``,
        while the checks and the rollback around it stay in `forward`.
        """
        state, keep = block.state, block.keep
        step, entries = self._consume_block(input_ids, block)
        input_table, output_table, provisional_vectors, unused = self._hyper_vectors(state, entries, step)
        inputs_embeds = self._embed(input_ids, step, input_table)
        outputs = self._decoder()(inputs_embeds=inputs_embeds, position_ids=step.positions, **block.base_kwargs)
        hidden = _select(outputs.last_hidden_state, keep, input_ids.shape[1])
        base_logits = self.get_output_embeddings()(hidden)
        logits = self._widen(base_logits, hidden, step, output_table, provisional_vectors)
        if unused is not None:  # keep every encoder parameter in the graph (DDP), adding exactly 0
            logits = logits + unused
        return step, logits, outputs

    def _hyper_vectors(self, state: HyperState | None, entries: EntryBatch, step: ConsumedBlock):
        """Encode the new entries (both sides) and the provisional contents (output side).

        Returns the ``(B, capacity, D)`` input and output tables (entry k at index k), the
        ``(B, kept, D)`` provisional vectors, and a zero that ties every encoder parameter to the loss
        when training (None otherwise).
        """
        device, (batch_size, kept, M) = step.legal.device, step.provisional.shape
        subtokens, lengths = entries.subtokens.to(device), entries.lengths.to(device)
        # Under DDP every rank must use every encoder parameter every step, whether or not its batch
        # installs or reads any hypertoken: when training, the input encoder runs on a dummy entry
        # if there is none (the output one always has the provisional contents).
        anchor = self.training and torch.is_grad_enabled()
        n_new = len(subtokens)
        if anchor and n_new == 0:
            subtokens, lengths = subtokens.new_zeros(1, M), lengths.new_ones(1)
        input_vectors = _encode(self.input_hyper_encoder, subtokens, lengths, self.get_input_embeddings().weight)
        # One call for the output side: the new entries, then the provisional content at each kept
        # position (length 0 where none is legal: encoded as one id and never read).
        output_vectors = _encode(
            self._output_hyper_encoder(),
            torch.cat([subtokens, step.provisional.reshape(-1, M)]),
            torch.cat([lengths, step.provisional_lengths.reshape(-1)]).clamp(min=1),
            self.get_output_embeddings().weight,
        )
        unused = 0.0 * (input_vectors.sum() + output_vectors.sum()) if anchor else None
        input_vectors, (output_new, provisional_vectors) = (
            input_vectors[:n_new],
            output_vectors.split([len(subtokens), batch_size * kept]),
        )
        output_new = output_new[:n_new]
        input_table, output_table = _tables(state, entries, batch_size, input_vectors, output_new)
        return input_table, output_table, provisional_vectors.reshape(batch_size, kept, -1), unused

    def _widen(self, base_logits, hidden, step: ConsumedBlock, output_table, provisional_vectors) -> torch.Tensor:
        """``[base logits for ids < V | hyper logits | -inf]``, ``V + K`` wide, illegal ids at -inf.

        Fixed work per position, no host sync: hyper logits are computed for every slot the table
        holds plus one (the provisional slot may sit just past the installed entries), then masked.
        """
        V, K = self.codec.initial_vocab_size, self.codec.max_codebook_size
        if output_table is None:
            output_table = hidden.new_zeros(hidden.shape[0], 0, hidden.shape[-1])
        width = min(K, output_table.shape[1] + 1)
        columns = output_table[:, :width]
        if columns.shape[1] < width:  # the provisional slot just past the installed entries
            columns = F.pad(columns, (0, 0, 0, width - columns.shape[1]))
        hyper = torch.einsum("btd,bkd->btk", hidden, columns.to(hidden.dtype))
        slot = torch.arange(width, device=hidden.device)
        provisional_scores = (hidden * provisional_vectors.to(hidden.dtype)).sum(-1)
        is_provisional = (slot == step.legal[..., None] - 1) & (step.provisional_lengths > 0)[..., None]
        hyper = torch.where(is_provisional, provisional_scores[..., None].to(hyper.dtype), hyper)
        hyper = self._postprocess_logits(hyper).masked_fill(slot >= step.legal[..., None], float("-inf"))
        tail = base_logits.new_full((*base_logits.shape[:2], K - width), float("-inf"))
        return torch.cat([self._postprocess_logits(base_logits[..., :V]), hyper.to(base_logits.dtype), tail], dim=-1)

    def _postprocess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the base causal LM does to its head's output, done to base and hyper logits alike:
        a scale (Cohere's ``logit_scale``, Granite's ``logits_scaling``) and soft-capping (Gemma 2/3's
        ``final_logit_softcapping``). `from_base` checks that nothing else is done."""
        text_config = self.config.get_text_config()
        scale = getattr(text_config, "logit_scale", None)
        divisor = getattr(text_config, "logits_scaling", None)
        cap = getattr(text_config, "final_logit_softcapping", None)
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _loss(self, logits, labels, step: ConsumedBlock, num_items_in_batch=None) -> torch.Tensor:
        """Next-token cross-entropy over ``V + K`` classes; a target illegal at its position raises."""
        V = self.codec.initial_vocab_size
        targets = labels[:, 1:].to(logits.device)
        legal = step.legal[:, :-1].to(logits.device)
        counted = targets != -100
        illegal = counted & ((targets < 0) | ((targets >= V) & (targets - V >= legal)))
        if illegal.any():
            b, t = (int(i) for i in torch.nonzero(illegal)[0])
            raise ValueError(
                f"labels[{b}, {t + 1}] = {int(targets[b, t])} is not a legal target there "
                f"(legal hyper ids: {V}..{V + int(legal[b, t]) - 1})"
            )
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        denominator = num_items_in_batch if num_items_in_batch is not None else counted.sum().clamp(min=1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(loss.device)
        return loss / denominator


# ---------------------------------------------------------------------- helpers


@dataclass
class _Block:
    """What `forward` settles before a block runs.

    Attributes:
        cache / state: the cache to pass on and its codebooks (None with precomputed codebooks).
        past_length: positions held before this block (what a failed block rolls back to).
        keep: the positions whose logits are computed.
        mask: ``(B, T)`` this block's padding mask.
        precomputed: the `ConsumedBlock` and `EntryBatch` from ``codebooks=`` (None otherwise).
        base_kwargs: the base model's keyword arguments, but the embeddings and positions.
    """

    cache: Cache | None
    state: HyperState | None
    past_length: int
    keep: list[int]
    mask: torch.Tensor
    precomputed: tuple[ConsumedBlock, EntryBatch] | None
    base_kwargs: dict


def _decoder_of(causal_lm: PreTrainedModel) -> nn.Module:
    """A causal LM's decoder: the module its head reads the last hidden state of."""
    decoder = causal_lm.base_model
    if decoder is causal_lm and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()  # e.g. Gemma 3 in 4.57, whose prefix names no attribute
    if decoder is causal_lm or decoder is None:
        raise NotImplementedError(
            f"{type(causal_lm).__name__} has no separate decoder (base_model / get_decoder()): a zip2zip "
            "model runs the decoder and the head apart, to score hypertokens with the head's input"
        )
    return decoder


def _encoder_settings(config: Zip2ZipConfig) -> dict:
    """`build_hyper_encoder` settings shared by the input and output encoders."""
    return dict(
        kind=config.hyper_encoder,
        hidden_size=config.get_text_config().hidden_size,
        max_subtokens=config.max_subtokens,
        latent_size=config.hyper_encoder_hidden_size,
        num_layers=config.hyper_encoder_num_layers,
        num_heads=config.hyper_encoder_num_heads,
    )


def _tables(state, entries, batch_size: int, input_vectors, output_vectors=None) -> tuple:
    """The ``(input, output)`` tables after a block: its new entry vectors stored in the state, or,
    with precomputed codebooks, the entries themselves (every row's whole codebook, in order). A
    model without a head (`Zip2ZipModel`) has no output vectors and gets no output table."""
    if state is not None:
        state.store(entries, input_vectors, output_vectors)
        return state.input_table, state.output_table

    def per_row(vectors):
        return None if vectors is None else vectors.reshape(batch_size, len(vectors) // batch_size, vectors.shape[-1])

    return per_row(input_vectors), per_row(output_vectors)


def _check_saved_tokenizer(config: Zip2ZipConfig, path) -> None:
    """A tokenizer saved beside the weights must compress exactly as the config says."""
    tokenizer_config = os.path.join(str(path), "tokenizer_config.json")
    if not os.path.isfile(tokenizer_config):
        return
    with open(tokenizer_config, encoding="utf-8") as f:
        saved = json.load(f)
    if "max_codebook_size" in saved:  # a Zip2ZipTokenizer (a plain one is not ours to judge)
        config.check_tokenizer(SimpleNamespace(**{key: saved.get(key) for key in COMPRESSION_KEYS}))


def _check_input_ids(input_ids, inputs_embeds) -> None:
    if input_ids is None or inputs_embeds is not None:
        raise ValueError(
            "a zip2zip model needs input_ids (not inputs_embeds): hypertokens are embedded from the codebook"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")


def _checked_attention_mask(attention_mask, input_ids: torch.Tensor, past_length: int) -> torch.Tensor:
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


def _kept_positions(length: int, logits_to_keep) -> list[int]:
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
def _all_or_nothing(block: _Block, input_ids: torch.LongTensor):
    """The block as one transaction of its state (`HyperState.block`: snapshot, count, legality
    check, record or roll back), plus the positions the base model may already have written into
    the cache, cut back on failure, so a caller that catches the error keeps its cache."""
    transaction = block.state.block(input_ids, block.mask) if block.state is not None else contextlib.nullcontext()
    try:
        with transaction:
            yield
    except BaseException:
        if block.cache is not None:
            truncate_cache(block.cache, block.past_length)
        raise


def _select(tensor: torch.Tensor, keep: list[int], length: int) -> torch.Tensor:
    """Rows of ``tensor`` (``(B, T or kept, ...)``) at the kept positions."""
    if tensor.shape[1] == len(keep):
        return tensor
    return tensor[:, keep] if len(keep) < length else tensor


def _encode(encoder: nn.Module, subtokens: torch.LongTensor, lengths: torch.LongTensor, weight: torch.Tensor):
    """Encoder vectors of the given entries; most decoding steps have none, and skip the call."""
    if len(subtokens) == 0:
        return weight.new_zeros(0, weight.shape[-1])
    return encoder(subtokens, lengths, weight)
