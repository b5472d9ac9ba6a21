"""Zip2ZipConfig: the base causal LM's config nested as ``text_config``, plus compression settings."""

from __future__ import annotations

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .lzw import LZWCodec
from .lzw_codebook import DEFAULT_MAX_CODEBOOK_SIZE, DEFAULT_MAX_SUBTOKENS, setting


__all__ = ["Zip2ZipConfig"]

# Bump when the meaning of saved weights or settings changes; loading refuses newer formats and
# `Zip2ZipForCausalLM.from_pretrained` reads older ones. 2: the wrapped model's weights are named
# ``language_model.*`` (``model.*`` in 1). 3: ``input_hyper_encoder_residual`` is saved (a config
# without it, formats 1 and 2, means ``"mean"``, what those checkpoints were trained with).
ZIP2ZIP_FORMAT_VERSION = 3
# The hyper-encoders there are (the config's ``hyper_encoder``, `build_hyper_encoder`'s ``kind``).
HYPER_ENCODER_KINDS = ("mean", "attention", "reference")
# What an attention encoder outputs before training (its residual): the masked mean of the
# constituents, or the first or the last one.
HYPER_ENCODER_RESIDUALS = ("mean", "first", "last")
POSITION_MODES = ("compressed", "base")
# Settings a tokenizer and a model must agree on, or hyper ids mean different things to each
# (`LZWCodec.settings`).
COMPRESSION_KEYS = ("initial_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids")


class Zip2ZipConfig(PretrainedConfig):
    r"""Configuration of a `Zip2ZipForCausalLM`.

    Args:
        text_config: config (or its dict) of the wrapped causal LM.
        initial_vocab_size: V, the base/hyper boundary: the length of the base tokenizer, added tokens
            included. Hypertoken ids are ``V .. V + K - 1``; model rows in ``[V, vocab_size)`` are never
            legal outputs.
        max_codebook_size: K, the most hypertokens one sequence may create.
        max_subtokens: M, the most base tokens one hypertoken stands for.
        disabled_ids: ids never merged (special and added tokens, pad).
        pad_token_id: the padding id (always among ``disabled_ids``).
        hyper_encoder: ``"mean"`` (parameter-free masked mean), ``"attention"`` (small transformer), or
            ``"reference"``: one of the reference zip2zip package's encoders, as a checkpoint it trained
            describes it (``reference_hyper_encoder``; see `zip2zip_hf.interop`).
        hyper_encoder_hidden_size: latent width of the attention encoder (default: a quarter of the
            model width, at least 64, rounded up to a multiple of the heads; the encoder then costs
            about a tenth of what a full-width one does, which a prefill of mostly new entries feels).
        hyper_encoder_num_layers / hyper_encoder_num_heads: depth and heads of the attention encoder.
        tie_hyper_encoders: one encoder for the input and the output side.
        input_hyper_encoder_residual: what the input-side attention encoder outputs before training
            (its residual): ``"mean"`` of the constituents (the default, and what format 2 and older
            checkpoints used), or the ``"first"`` or ``"last"`` one. A tied encoder uses it on both
            sides. `Zip2ZipForCausalLM.from_base` picks ``"last"``.
        position_mode: ``"compressed"`` (one position per token) or ``"base"`` (a hypertoken takes the
            position of its last base token, so distances match the base model's).
        reference_hyper_encoder: with ``hyper_encoder="reference"``, the reference encoder's settings:
            its ``encoder`` config, its ``encoder_type`` and the ``pad_token_id`` it pads entries with.
        write_provisional_hypertokens: whether `generate` may write the provisional id (the entry the
            next id would create, e.g. in ``=====``). False for checkpoints converted from the
            reference package, whose generation never writes it; the forward scores it either way.
        canonical_ids_only: whether the forward gives ``-inf`` to every id that is not canonical at
            its position: one whose first base id would extend the phrase before it, which greedy LZW
            never writes (`hyper_logits.not_canonical`). Each text then has one id sequence, so the
            probability of its canonical ids is the text's (bits per byte are exact, not a bound)
            and `generate` writes only what training reads. False: the probability mass a model
            puts on other spellings of a text is kept (the reference package's logits).
    """

    model_type = "zip2zip"
    sub_configs = {"text_config": AutoConfig}
    # There is no default base model (4.57's to_diff_dict would otherwise build a config without one).
    has_no_defaults_at_init = True

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        initial_vocab_size: int | None = None,
        max_codebook_size: int = DEFAULT_MAX_CODEBOOK_SIZE,
        max_subtokens: int = DEFAULT_MAX_SUBTOKENS,
        disabled_ids: list[int] | tuple[int, ...] = (),
        pad_token_id: int | None = None,
        hyper_encoder: str = "attention",
        hyper_encoder_hidden_size: int | None = None,
        hyper_encoder_num_layers: int = 1,
        hyper_encoder_num_heads: int = 4,
        tie_hyper_encoders: bool = False,
        input_hyper_encoder_residual: str = "mean",
        position_mode: str = "base",
        reference_hyper_encoder: dict | None = None,
        write_provisional_hypertokens: bool = True,
        canonical_ids_only: bool = True,
        zip2zip_format_version: int = ZIP2ZIP_FORMAT_VERSION,
        **kwargs,
    ):
        self.text_config = _base_model_config(text_config)
        if initial_vocab_size is None:
            initial_vocab_size = self.text_config.vocab_size
        if hyper_encoder not in HYPER_ENCODER_KINDS:
            raise ValueError(f"hyper_encoder must be one of {HYPER_ENCODER_KINDS}, got {hyper_encoder!r}")
        if (hyper_encoder == "reference") != isinstance(reference_hyper_encoder, dict):
            raise ValueError(
                "reference_hyper_encoder (a dict of the reference encoder's settings) goes with "
                f"hyper_encoder='reference' and only with it; got hyper_encoder={hyper_encoder!r} and "
                f"reference_hyper_encoder={reference_hyper_encoder!r}"
            )
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        if zip2zip_format_version > ZIP2ZIP_FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses zip2zip format {zip2zip_format_version}; this code reads up to "
                f"{ZIP2ZIP_FORMAT_VERSION}: upgrade zip2zip_hf"
            )
        # Numbers from a hand-edited config.json are checked, never truncated: `setting` and the codec
        # reject floats, bools and None, and the codec bounds K and M.
        hyper_encoder_num_layers = setting("hyper_encoder_num_layers", hyper_encoder_num_layers, least=0)
        hyper_encoder_num_heads = setting("hyper_encoder_num_heads", hyper_encoder_num_heads, least=1)
        if hyper_encoder_hidden_size is not None:
            hyper_encoder_hidden_size = setting("hyper_encoder_hidden_size", hyper_encoder_hidden_size, least=1)
        if input_hyper_encoder_residual not in HYPER_ENCODER_RESIDUALS or (
            hyper_encoder == "mean" and input_hyper_encoder_residual != "mean"
        ):
            raise ValueError(
                f"input_hyper_encoder_residual must be one of {HYPER_ENCODER_RESIDUALS} (only 'mean' for a "
                f"mean hyper-encoder), got {input_hyper_encoder_residual!r}"
            )
        if not isinstance(tie_hyper_encoders, bool):
            raise ValueError(f"tie_hyper_encoders must be a bool, got {tie_hyper_encoders!r}")
        if pad_token_id is not None:
            pad_token_id = setting("pad_token_id", pad_token_id, least=0)
        if disabled_ids is None or isinstance(disabled_ids, (str, int)):
            raise ValueError(f"disabled_ids must be a list of ints, got {disabled_ids!r}")
        disabled = [*disabled_ids, *([pad_token_id] if pad_token_id is not None else [])]
        codec = LZWCodec(initial_vocab_size, max_codebook_size, max_subtokens, disabled)
        if codec.initial_vocab_size > self.text_config.vocab_size:
            raise ValueError(
                f"initial_vocab_size ({codec.initial_vocab_size}) exceeds the model's embedding rows "
                f"({self.text_config.vocab_size}): the tokenizer has ids the model cannot embed"
            )
        self.initial_vocab_size = codec.initial_vocab_size
        self.max_codebook_size = codec.max_codebook_size
        self.max_subtokens = codec.max_subtokens
        self.disabled_ids = sorted(codec.disabled_ids)
        self.hyper_encoder = hyper_encoder
        if hyper_encoder_hidden_size is None:
            quarter = max(64, self.text_config.hidden_size // 4)
            hyper_encoder_hidden_size = -(-quarter // hyper_encoder_num_heads) * hyper_encoder_num_heads
        self.hyper_encoder_hidden_size = hyper_encoder_hidden_size
        self.hyper_encoder_num_layers = hyper_encoder_num_layers
        self.hyper_encoder_num_heads = hyper_encoder_num_heads
        self.tie_hyper_encoders = tie_hyper_encoders
        self.input_hyper_encoder_residual = input_hyper_encoder_residual
        self.position_mode = position_mode
        self.reference_hyper_encoder = reference_hyper_encoder
        if not isinstance(write_provisional_hypertokens, bool):
            raise ValueError(f"write_provisional_hypertokens must be a bool, got {write_provisional_hypertokens!r}")
        self.write_provisional_hypertokens = write_provisional_hypertokens
        if not isinstance(canonical_ids_only, bool):
            raise ValueError(f"canonical_ids_only must be a bool, got {canonical_ids_only!r}")
        self.canonical_ids_only = canonical_ids_only
        self.zip2zip_format_version = zip2zip_format_version
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        # transformers propagates the attention implementation down to sub-configs; without this the
        # wrapped model's choice (sdpa, flash, ...) would be reset to None.
        kwargs.setdefault("attn_implementation", getattr(self.text_config, "_attn_implementation", None))
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def codec(self) -> LZWCodec:
        """The LZW codec these settings describe."""
        return LZWCodec(self.initial_vocab_size, self.max_codebook_size, self.max_subtokens, self.disabled_ids)

    def compression_settings(self) -> dict:
        return self.codec().settings()

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError when ``tokenizer`` compresses differently from this config."""
        theirs = {key: getattr(tokenizer, key, None) for key in COMPRESSION_KEYS}
        theirs["disabled_ids"] = sorted(theirs["disabled_ids"] or ())
        mine = self.compression_settings()
        diff = [
            f"{key}: model {mine[key]} vs tokenizer {theirs[key]}"
            for key in COMPRESSION_KEYS
            if mine[key] != theirs[key]
        ]
        if diff:
            raise ValueError("the tokenizer and the model disagree on compression settings: " + "; ".join(diff))


def _base_model_config(text_config: PretrainedConfig | dict | None) -> PretrainedConfig:
    """The wrapped model's config, from a config or its dict; a missing or unknown one is an error
    here, before anything is allocated (there is no default base model to fall back to)."""
    if isinstance(text_config, PretrainedConfig):
        return text_config
    if text_config is None:
        raise ValueError(
            "a zip2zip config needs text_config, the config of the base model it wraps (a config.json "
            "without a text_config was not saved by zip2zip_hf)"
        )
    if not isinstance(text_config, dict):
        raise ValueError(f"text_config must be a config or a dict, got {type(text_config).__name__}")
    model_type = text_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"text_config.model_type is {model_type!r}, which transformers {transformers.__version__} does not "
            "know: the base model's config must name its model type"
        )
    return CONFIG_MAPPING[model_type](**text_config)
