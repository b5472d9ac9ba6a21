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

import inspect

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, Cache, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 4.57 copies a local checkpoint's remote code one import deep (the files this module
# imports, not theirs), so every core file the model needs is imported here by name (the F401s).
from ._compat import forget_key_mapping, output_cache_field
from .base_tokenizer import load_base_tokenizer  # noqa: F401
from .cache_zip2zip import Zip2ZipCache  # noqa: F401
from .checkpoint_loading import (
    FORMAT_1_KEY_MAPPING,
    HUB_KEYWORDS,
    base_head_patterns,
    check_saved_tokenizer,
    damaged_weights_message,
    decoder_key_mapping,
    loading_problems,
)
from .codebook_blocks import ConsumedBlock, EntryBatch
from .codebook_stores import StreamStore  # noqa: F401
from .configuration_zip2zip import COMPRESSION_KEYS, ZIP2ZIP_FORMAT_VERSION, Zip2ZipConfig
from .device_codebooks import DeviceCodebooks  # noqa: F401
from .generation_zip2zip import Zip2ZipGenerationMixin
from .hyper_encoder import encode_entries, hyper_encoder_of
from .hyper_logits import check_head_reproduces_base, decoder_of, hyper_loss, select_kept, widen_logits
from .hyper_state import DeferredLegalityChecks, HyperState
from .input_pipeline import BlockPlan, Zip2ZipInputPipeline, all_or_nothing
from .lzw import LZWCodec  # noqa: F401
from .lzw_codebook import DEFAULT_MAX_CODEBOOK_SIZE, DEFAULT_MAX_SUBTOKENS
from .precomputed_codebooks import codebook_tensors, whole_codebook_table  # noqa: F401
from .reference_hyper_encoders import build_reference_encoder  # noqa: F401
from .speculative_zip2zip import speculative_decoding  # noqa: F401


__all__ = ["HYPER_ENCODER_NAMES", "Zip2ZipForCausalLM", "Zip2ZipModel", "Zip2ZipPreTrainedModel"]

# The modules this class adds to the base model (attribute and weight-name prefix).
HYPER_ENCODER_NAMES = ("input_hyper_encoder", "output_hyper_encoder")
# What every saved config.json lists for remote code, whichever of the two classes saved it.
_MODEL_AUTO_MAP = {
    "AutoModel": "modeling_zip2zip.Zip2ZipModel",
    "AutoModelForCausalLM": "modeling_zip2zip.Zip2ZipForCausalLM",
}


class Zip2ZipPreTrainedModel(Zip2ZipInputPipeline, PreTrainedModel):
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

    def _build_input_side(
        self, config: Zip2ZipConfig, language_model: PreTrainedModel, encoder: nn.Module | None = None
    ) -> None:
        """What both the bare model and the LM own: the input pipeline's base model, encoder (built
        from the config unless given) and codec."""
        if encoder is None:
            encoder = hyper_encoder_of(config, residual=getattr(config, "input_hyper_encoder_residual", "mean"))
        self._init_input_pipeline(config, language_model, encoder)

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
        # Mis-shaped weights come back in the loading info, reported below by name (transformers
        # would raise its own generic report first); none is ever kept re-initialised.
        kwargs["ignore_mismatched_sizes"] = True
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except SafetensorError as error:  # neither an OSError nor a ValueError: name the file
            raise OSError(damaged_weights_message(path, error)) from error
        # The weights are in today's layout now, and are saved so.
        forget_key_mapping(model, mapping)
        model.config.zip2zip_format_version = ZIP2ZIP_FORMAT_VERSION
        problems = loading_problems(model, info)
        if problems:
            raise ValueError("the checkpoint does not match the model: " + "; ".join(sorted(problems)))
        check_saved_tokenizer(model.config, path)
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


class Zip2ZipModel(Zip2ZipPreTrainedModel):
    """The bare zip2zip model: compressed ids in, the base model's last hidden states out, one per
    compressed position (what ``AutoModel`` gives, as ``LlamaModel`` is to ``LlamaForCausalLM``).

    It reads ids exactly as `Zip2ZipForCausalLM` does (codebook state, input hyper-encoder, positions
    from ``position_mode``, the cache) and has no head: no output hyper-encoder, no logits. Loading a
    `Zip2ZipForCausalLM` checkpoint gives the same weights but the head's.
    """

    # A causal-LM checkpoint's head: not part of the bare model. Each model adds its base's own head
    # (GPT-NeoX's ``embed_out``, BioGPT's ``output_projection``, ...: see `checkpoint_loading.base_head_patterns`).
    _keys_to_ignore_on_load_unexpected = [r"^output_hyper_encoder\.", r"^language_model\.lm_head\."]

    def __init__(
        self,
        config: Zip2ZipConfig,
        base_model: PreTrainedModel | None = None,
        input_hyper_encoder: nn.Module | None = None,
    ):
        """``base_model``: the decoder to read with (a fresh ``AutoModel`` of the text config if None);
        ``input_hyper_encoder``: the encoder to share (a fresh one if None). To view a
        `Zip2ZipForCausalLM` without its head, use its `bare_model`, which passes both."""
        super().__init__(config)
        self._keys_to_ignore_on_load_unexpected = [
            *type(self)._keys_to_ignore_on_load_unexpected,
            *base_head_patterns(config.get_text_config()),
        ]
        if base_model is None:
            base_model = AutoModel.from_config(config.text_config)
        self._build_input_side(config, base_model, input_hyper_encoder)
        self.post_init()

    @classmethod
    def _checkpoint_key_mapping(cls, path, kwargs: dict) -> dict[str, str]:
        """A causal-LM checkpoint names the base model's decoder ``language_model.<prefix>.*`` (``model``
        for Llama, ``transformer`` for GPT-2); here it is ``language_model.*``."""
        config = kwargs.get("config")
        if not isinstance(config, PretrainedConfig):
            hub = {key: kwargs[key] for key in HUB_KEYWORDS if key in kwargs}
            config = cls.config_class.from_pretrained(path, **hub)
        return decoder_key_mapping(config.get_text_config())

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
        deferred_checks: DeferredLegalityChecks | None = None,
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
            deferred_checks=deferred_checks,
            has_head=False,
        )
        with all_or_nothing(block, input_ids):
            _, _, outputs = self._run_decoder(input_ids, block)
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
        codebooks_on_device: where decoding steps keep the codebooks (see `Zip2ZipInputPipeline`).
    """

    def __init__(self, config: Zip2ZipConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        self._build_input_side(
            config, base_model if base_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        tied = config.tie_hyper_encoders
        self.output_hyper_encoder = None if tied else hyper_encoder_of(config)
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
        check_head_reproduces_base(base_model)
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
        """The base model's decoder (``LlamaModel`` for Llama), as transformers' ``get_decoder`` means
        it: a module of the base model, which reads base ids or embeddings only. Hyper ids (``>= V``)
        are outside its embedding table: for compressed ids use `bare_model`."""
        return self._decoder()

    def bare_model(self) -> Zip2ZipModel:
        """This model without its head: a `Zip2ZipModel` over this model's own decoder and input
        hyper-encoder (shared, not copied: the same parameters, so training one trains the other). It
        reads compressed ids as this model does, and returns the last hidden states this model's
        head reads. What ``AutoModel.from_pretrained`` gives from this model's checkpoint, without
        saving it."""
        bare = Zip2ZipModel(self.config, base_model=self._decoder(), input_hyper_encoder=self.input_hyper_encoder)
        bare.codebooks_on_device = self.codebooks_on_device
        return bare.train(self.training)

    def _decoder(self) -> nn.Module:
        return decoder_of(self.language_model)

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
        score_provisional: bool = True,
        open_phrase_at: int | torch.BoolTensor | None = None,
        deferred_checks: DeferredLegalityChecks | None = None,
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
            score_provisional: False makes the provisional entry's logit ``-inf`` (it stays legal to
                read): what `generate` passes for a model that does not write it
                (``config.write_provisional_hypertokens``).
            open_phrase_at: where a prompt ends: the text may go on inside the phrase of the id
                there, which the prompt's end cut short, so the logits there allow every legal id, not
                only canonical ones (``config.canonical_ids_only``). An index into ``input_ids``
                (negative from the end) for every row, or a ``(B, T)`` bool tensor marking each row's.
                `generate` passes -1 for the prompt; lm-eval marks each context's end.
            deferred_checks: a `DeferredLegalityChecks` that takes this call's legality check, to be
                read later, instead of reading it before returning (a host sync once the codebooks
                are on the device): what `generate` passes, whose ids come from masked logits, so
                that no decoding step waits for the host.
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
            score_provisional=score_provisional,
            open_phrase_at=open_phrase_at,
            deferred_checks=deferred_checks,
            has_head=True,
        )
        loss = None
        with all_or_nothing(block, input_ids):
            consumed, logits, outputs = self._run_block(input_ids, block)
            if labels is not None:
                loss = hyper_loss(logits, labels, consumed, self.codec.initial_vocab_size, num_items_in_batch)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{output_cache_field(): block.cache},
        )
        return output.to_tuple() if return_dict is False else output

    def _run_block(self, input_ids: torch.LongTensor, block: BlockPlan):
        """Run a block through the shared input pipeline (`_run_decoder`), then the head: return the
        `ConsumedBlock`, the widened logits and the decoder's output.

        Tensor work only, once the codebooks are on the device: one graph for ``torch.compile``,
        while the checks and the rollback around it stay in `forward`.
        """
        consumed, entries, outputs = self._run_decoder(input_ids, block)
        hidden = select_kept(outputs.last_hidden_state, block.keep, input_ids.shape[1])
        output_table, provisional_vectors, unused = self._output_vectors(block.state, entries, consumed)
        logits = widen_logits(
            self.get_output_embeddings()(hidden),
            hidden,
            consumed,
            output_table,
            provisional_vectors,
            self.codec.initial_vocab_size,
            self.codec.max_codebook_size,
            self.config.get_text_config(),
            block.score_provisional,
            self.config.canonical_ids_only,
            block.open_kept,
        )
        if unused is not None:  # keep every output-encoder parameter in the graph (DDP), adding exactly 0
            logits = logits + unused
        return consumed, logits, outputs

    def _output_vectors(self, state: HyperState | None, entries: EntryBatch, consumed: ConsumedBlock):
        """Encode the output side of the new entries and the provisional contents, in one call.

        Returns the ``(B, capacity, D)`` output table (entry k at index k), the ``(B, kept, D)``
        provisional vectors, and a zero that ties every encoder parameter to the loss when training
        (None otherwise).
        """
        (batch_size, kept, M), subtokens, lengths = consumed.provisional.shape, entries.subtokens, entries.lengths
        # The provisional content at each kept position has length 0 where none is legal: encoded
        # as one id and never read.
        vectors = encode_entries(
            self._output_hyper_encoder(),
            torch.cat([subtokens, consumed.provisional.reshape(-1, M)]),
            torch.cat([lengths, consumed.provisional_lengths.reshape(-1)]).clamp(min=1),
            self.get_output_embeddings().weight,
        )
        unused = 0.0 * vectors.sum() if self.training and torch.is_grad_enabled() else None
        new_vectors, provisional_vectors = vectors.split([len(subtokens), batch_size * kept])
        if state is None:
            output_table = whole_codebook_table(new_vectors, batch_size)
        else:
            output_table = state.write_output_vectors(entries, new_vectors)
        return output_table, provisional_vectors.reshape(batch_size, kept, -1), unused
