"""Zip2ZipTokenizer: a base HF tokenizer whose output is LZW-compressed into per-sequence hypertokens.

The base tokenizer (a Rust ``tokenizers.Tokenizer``) is held by composition and does all the real
tokenization, so a text's base ids are exactly the base tokenizer's ids. This class only adds LZW on
top: ``tok(text)`` returns compressed ids (base ids ``< V`` and hypertokens ``V + k``), ``decode``
expands them again. Every sequence has its own codebook, rebuilt from the ids themselves, so only
whole sequences (from their first id) can be decoded.

Part of a checkpoint's remote-code closure: imports only transformers, tokenizers and siblings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer
from transformers import BatchEncoding, PreTrainedTokenizer

from ._compat import original_init_errors, tokenizer_init_kwargs
from .base_tokenizer import load_base_tokenizer, refuse_unsupported_options, settings_of_base, special_affixes
from .lzw import LZWCodec
from .lzw_codebook import DEFAULT_MAX_CODEBOOK_SIZE, DEFAULT_MAX_SUBTOKENS, Codebook, setting


__all__ = ["Zip2ZipTokenizer"]


def _plain(ids: Any) -> Any:
    """Tensors and arrays as (nested) Python lists; anything else as it is (`as_id_list` checks the ids)."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


class Zip2ZipTokenizer(PreTrainedTokenizer):
    r"""A base tokenizer plus online LZW compression into per-sequence hypertokens.

    Build one from a Hugging Face fast tokenizer with `Zip2ZipTokenizer.from_base`; reload a saved one
    with `from_pretrained` / `AutoTokenizer.from_pretrained`.

    * ``tok(text)`` / ``tok(texts, padding=True, return_tensors="pt")`` give compressed ``input_ids``
      (ids ``< V`` are base tokens, ``V + k`` the k-th hypertoken of that sequence) and an
      ``attention_mask`` that is 0 exactly on the padding. Padding is on the left by default.
    * ``max_length`` counts compressed tokens. Right truncation keeps the first codes; left truncation
      drops *base* tokens from the left and compresses the rest afresh (a compressed suffix would refer
      to entries created before it).
    * ``decode`` expands compressed ids from the sequence start (left padding is fine) and decodes
      the base ids with the base tokenizer.
    * ``len(tok)``, ``get_vocab()`` and ``vocab_size`` describe the base vocabulary only: hypertokens
      have no fixed string.

    Args:
        base_tokenizer_file: path of the base tokenizer's ``tokenizers`` JSON (``base_tokenizer.json``).
        initial_vocab_size: V, the base/hyper boundary: the base tokenizer's length, added tokens included.
        max_codebook_size: K, the most hypertokens one sequence may create.
        max_subtokens: M, the most base tokens one hypertoken stands for.
        disabled_ids: ids never merged into a hypertoken (special and added tokens, pad). Defaults to
            the base tokenizer's added tokens.
        base_tokenizer_object: a ``tokenizers.Tokenizer`` to use instead of ``base_tokenizer_file`` (copied).
        kwargs: the usual tokenizer settings (special tokens, ``chat_template``, ``padding_side``,
            ``model_max_length``, ...).
    """

    vocab_files_names = {"base_tokenizer_file": "base_tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        base_tokenizer_file: str | os.PathLike | None = None,
        initial_vocab_size: int | None = None,
        max_codebook_size: int | None = None,
        max_subtokens: int | None = None,
        disabled_ids: Iterable[int] | None = None,
        base_tokenizer_object: Tokenizer | None = None,
        tokenizer_file: str | None = None,  # transformers 5 always passes it (a tokenizer.json we never write)
        **kwargs,
    ):
        # No defaults here: a saved tokenizer_config.json that lost a setting must not silently get
        # another K or M than its model (`from_base` is where the defaults live).
        for name, value in (("max_codebook_size", max_codebook_size), ("max_subtokens", max_subtokens)):
            if value is None:
                raise ValueError(
                    f"{name} must be an int, got None: a saved tokenizer_config.json must carry the "
                    "value its model's config.json has"
                )
        if base_tokenizer_object is not None:
            base = Tokenizer.from_str(base_tokenizer_object.to_str())  # a copy: we change its settings
        elif base_tokenizer_file is not None:
            base = load_base_tokenizer(base_tokenizer_file)
        else:
            raise ValueError(
                "Zip2ZipTokenizer needs a base tokenizer: pass base_tokenizer_file, or build one with "
                "Zip2ZipTokenizer.from_base(base_tokenizer)"
            )
        # Truncation and padding are ours (they count compressed tokens); the base must never apply its own.
        base.no_truncation()
        base.no_padding()
        # Everything get_vocab() needs must exist before super().__init__, which registers the special
        # tokens through get_vocab().
        self._base = base

        base_length = base.get_vocab_size(with_added_tokens=True)
        if initial_vocab_size is None:
            initial_vocab_size = base_length
        if initial_vocab_size != base_length:
            raise ValueError(
                f"initial_vocab_size={initial_vocab_size} but the base tokenizer has {base_length} ids: "
                "V must be the base tokenizer's length"
            )
        self._prefix_ids, self._suffix_ids = special_affixes(base)
        if disabled_ids is None:
            disabled_ids = set(base.get_added_tokens_decoder())
        disabled = {setting("disabled id", i) for i in disabled_ids}
        # Left/right truncation keeps the post-processor's tokens (BOS, EOS) outside the compressed
        # part; that is only equivalent to compressing the whole row when they are never merged.
        stray = sorted(set(self._prefix_ids + self._suffix_ids) - disabled)
        if stray:
            raise ValueError(f"the base tokenizer's post-processor adds ids {stray} that are not in disabled_ids")

        # The codec checks the settings (ints, never truncated floats; K and M bounded).
        self.codec = LZWCodec(initial_vocab_size, max_codebook_size, max_subtokens, disabled)
        self.initial_vocab_size = self.codec.initial_vocab_size
        self.max_codebook_size = self.codec.max_codebook_size
        self.max_subtokens = self.codec.max_subtokens
        self.disabled_ids = sorted(self.codec.disabled_ids)

        # In init_kwargs, so save_pretrained writes their current values (class defaults are not saved).
        kwargs.setdefault("padding_side", type(self).padding_side)
        kwargs.setdefault("truncation_side", type(self).truncation_side)
        super().__init__(
            initial_vocab_size=self.initial_vocab_size,
            max_codebook_size=self.max_codebook_size,
            max_subtokens=self.max_subtokens,
            disabled_ids=self.disabled_ids,
            **tokenizer_init_kwargs(kwargs, self.SPECIAL_TOKENS_ATTRIBUTES),
        )
        if self.pad_token_id is not None and self.pad_token_id not in disabled:
            raise ValueError(f"the pad id {self.pad_token_id} must be in disabled_ids, or padding would be merged")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        base_tokenizer: Any,
        max_codebook_size: int = DEFAULT_MAX_CODEBOOK_SIZE,
        max_subtokens: int = DEFAULT_MAX_SUBTOKENS,
        **kwargs,
    ) -> Zip2ZipTokenizer:
        """Wrap a Hugging Face fast tokenizer (or the path/name of one) with LZW compression.

        Copies the special tokens (named ones and the additional/extra ones), the chat template,
        ``model_max_length`` and ``clean_up_tokenization_spaces``. V is ``len(base_tokenizer)``, added
        tokens included. The disabled ids are every special and added token plus pad.

        If the base has no pad token, its EOS token is used as pad (padding is then told apart from a
        real EOS by the attention mask, never by the id).

        Args:
            base_tokenizer: a ``PreTrainedTokenizerFast`` / ``TokenizersBackend``, or a path or Hub id
                that ``AutoTokenizer.from_pretrained`` loads into one.
            max_codebook_size: K, the most hypertokens one sequence may create.
            max_subtokens: M, the most base tokens one hypertoken stands for.
            kwargs: overrides for the new tokenizer's settings (e.g. ``padding_side="right"``).
        """
        if isinstance(base_tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            base_tokenizer = AutoTokenizer.from_pretrained(str(base_tokenizer))
        if isinstance(base_tokenizer, Zip2ZipTokenizer):
            raise ValueError("base_tokenizer is already a Zip2ZipTokenizer")
        if not getattr(base_tokenizer, "is_fast", False):
            raise ValueError(f"from_base needs a fast (Rust-backed) tokenizer, got {type(base_tokenizer).__name__}")
        settings = settings_of_base(base_tokenizer, max_codebook_size, max_subtokens)
        settings.update(kwargs)
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> Zip2ZipTokenizer:
        """`PreTrainedTokenizer.from_pretrained`; a bad saved setting or file raises its own error."""
        with original_init_errors():
            return super().from_pretrained(*args, **kwargs)

    @property
    def special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the base tokenizer's post-processor puts before and after one sequence (e.g. BOS, EOS)."""
        return list(self._prefix_ids), list(self._suffix_ids)

    @property
    def base_tokenizer(self) -> Tokenizer:
        """The Rust base tokenizer (without truncation or padding)."""
        return self._base

    # ------------------------------------------------------------------ vocabulary (the base's)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary size without added tokens, like the base tokenizer's ``vocab_size``."""
        return self._base.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """V: the base tokenizer's length, added tokens included; hyper slots are never counted."""
        return self._base.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """The base vocabulary (added tokens included). Hypertokens are per sequence and have no entry."""
        return self._base.get_vocab(with_added_tokens=True)

    def _add_tokens(self, new_tokens: Sequence[Any], special_tokens: bool = False) -> int:
        # Ids >= V are hypertokens: a new token would collide with them. Known tokens (the base's
        # specials, registered by the parent __init__) are fine.
        vocab = self.get_vocab()
        unknown = [str(t) for t in new_tokens or () if str(t) and str(t) not in vocab]
        if unknown:
            raise ValueError(
                f"cannot add tokens {unknown} to a Zip2ZipTokenizer: ids >= V are hypertokens. Add them to the "
                "base tokenizer and rebuild with Zip2ZipTokenizer.from_base"
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs) -> list[str]:
        """The base tokenizer's tokens for ``text`` (uncompressed: hypertokens have no string)."""
        return self._base.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self._base.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token: str) -> int | None:
        token_id = self._base.token_to_id(token)
        return self.unk_token_id if token_id is None else token_id

    def _convert_id_to_token(self, index: int) -> str | None:
        """The base token string of a base id; None for a hypertoken (it has no fixed string)."""
        return self._base.id_to_token(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if self._base.decoder is None:
            return "".join(tokens)
        return self._base.decoder.decode(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write the base tokenizer as ``base_tokenizer.json`` (never ``tokenizer.json``: transformers 5
        would load that as a plain tokenizer without LZW)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["base_tokenizer_file"]
        path = os.path.join(save_directory, name)
        self._base.save(path)
        return (path,)

    # ------------------------------------------------------------------ encoding

    def base_ids(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """The base tokenizer's ids for each text (a list of texts), exactly as the base tokenizer encodes them."""
        if isinstance(texts, str):
            raise TypeError("base_ids takes a list of texts, not a single string")
        rows = [list(e.ids) for e in self._base.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens:
            rows = [self._prefix_ids + row + self._suffix_ids for row in rows]
        return rows

    def _compress(self, content: list[int], add_special_tokens: bool, max_length: int | None) -> list[int]:
        """Compressed ids of one row of base ids, the post-processor's specials added around it.

        With ``max_length``, the result has at most that many ids: right truncation keeps the first
        codes (a prefix of a greedy LZW output is the greedy output of its own text), left truncation
        drops base tokens from the left and compresses the rest from an empty codebook.
        """
        prefix, suffix = (self._prefix_ids, self._suffix_ids) if add_special_tokens else ([], [])
        codes, _ = self.codec.encode(content)
        if max_length is None or len(prefix) + len(codes) + len(suffix) <= max_length:
            return prefix + codes + suffix
        budget = max_length - len(prefix) - len(suffix)
        if budget < 0:
            raise ValueError(
                f"max_length={max_length} is shorter than the {len(prefix) + len(suffix)} special tokens "
                "the base tokenizer adds"
            )
        if self.truncation_side == "right":
            return prefix + codes[:budget] + suffix
        return prefix + self.codec.encode_longest_suffix(content, budget) + suffix

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: Any = "do_not_pad",
        truncation_strategy: Any = "do_not_truncate",
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool = False,
        prepend_batch_axis: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        # The one encoding entry point. transformers 5 sends single and batched input here; 4.57 sends
        # single input here and batches through `_batch_encode_plus`, which forwards here. We take over
        # from the text (not at `prepare_for_model`, which only sees ids) so the base ids come from
        # the Rust tokenizer itself, and pad once at the end.
        strategy = getattr(truncation_strategy, "value", truncation_strategy)
        refuse_unsupported_options(
            text_pair=text_pair is not None,
            is_split_into_words=is_split_into_words,
            return_overflowing_tokens=return_overflowing_tokens,
            return_offsets_mapping=return_offsets_mapping,
            split_special_tokens=split_special_tokens or kwargs.get("sanitize_control_tokens"),
            truncation=strategy,
        )
        batched = isinstance(text, (list, tuple)) and (len(text) == 0 or not isinstance(text[0], int))
        contents = self._base_id_rows(list(text) if batched else [text])
        limit = max_length if strategy not in (None, False, "do_not_truncate") else None
        input_ids = [self._compress(content, add_special_tokens, limit) for content in contents]
        for ids in input_ids:
            self._eventual_warn_about_too_long_sequence(ids, max_length, verbose)

        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        encoded = self._encoded_fields(
            input_ids, return_token_type_ids, return_special_tokens_mask, return_length, return_attention_mask
        )
        if not batched:
            encoded = {key: value[0] for key, value in encoded.items()}
        padded = self.pad(
            encoded,
            padding=getattr(padding_strategy, "value", padding_strategy),
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        return BatchEncoding(
            dict(padded), tensor_type=return_tensors, prepend_batch_axis=prepend_batch_axis and not batched
        )

    def _base_id_rows(self, rows: list[Any]) -> list[list[int]]:
        """The base ids of each row: texts through the Rust tokenizer (in one batch), lists of base ids as given."""
        texts = [row for row in rows if isinstance(row, str)]
        encoded_texts = iter(self.base_ids(texts, add_special_tokens=False))
        contents = []
        for row in rows:
            if isinstance(row, str):
                contents.append(next(encoded_texts))
            elif isinstance(row, (list, tuple)) and all(isinstance(i, int) for i in row):
                contents.append(list(row))  # base ids given directly
            else:
                raise ValueError(f"expected a string or a list of base ids, got {type(row).__name__}: {row!r:.80}")
        return contents

    def _encoded_fields(
        self,
        input_ids: list[list[int]],
        return_token_type_ids: bool | None,
        return_special_tokens_mask: bool,
        return_length: bool,
        return_attention_mask: bool,
    ) -> dict[str, list]:
        """``input_ids`` and the per-row fields asked for, before padding."""
        encoded: dict[str, list] = {"input_ids": input_ids}
        if return_token_type_ids:
            encoded["token_type_ids"] = [[0] * len(ids) for ids in input_ids]
        if return_special_tokens_mask:
            special = set(self.all_special_ids)
            encoded["special_tokens_mask"] = [[int(i in special) for i in ids] for ids in input_ids]
        if return_length:
            encoded["length"] = [len(ids) for ids in input_ids]
        if return_attention_mask:
            # Built here, before padding, so it marks exactly the padding: a real EOS that shares the
            # pad id keeps mask 1.
            encoded["attention_mask"] = [[1] * len(ids) for ids in input_ids]
        return encoded

    def _batch_encode_plus(self, batch_text_or_text_pairs: Sequence[Any], **kwargs) -> BatchEncoding:
        # transformers 4.57 only (5.x has no such method): batches arrive here (see _compat).
        return self._encode_plus(list(batch_text_or_text_pairs), **kwargs)

    def prepare_for_model(
        self,
        ids: list[int],
        pair_ids: list[int] | None = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        prepend_batch_axis: bool = False,
        verbose: bool = True,
        **kwargs,
    ) -> BatchEncoding:
        """Compress one row of base ids, with the same options as ``__call__``."""
        padding_strategy, truncation_strategy, max_length, kwargs = self._get_padding_truncation_strategies(
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            verbose=verbose,
            **kwargs,
        )
        return self._encode_plus(
            list(ids),
            text_pair=pair_ids,
            add_special_tokens=add_special_tokens,
            padding_strategy=padding_strategy,
            truncation_strategy=truncation_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=return_tensors,
            prepend_batch_axis=prepend_batch_axis,
            verbose=verbose,
            **kwargs,
        )

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str | list[str]:
        """Text of compressed ids: LZW-decoded from the sequence start, then decoded by the base tokenizer.

        A list of sequences gives a list of texts; `decode_with_codebook` also returns the codebook.

        Raises:
            ValueError: an id that is not legal at its position (e.g. a hypertoken not created yet,
                as happens when decoding a slice that does not start at the sequence start).
        """
        if "return_codebook" in kwargs:
            raise TypeError("decode() no longer takes return_codebook: use decode_with_codebook()")
        ids = _plain(token_ids)
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        return self.decode_with_codebook(ids, skip_special_tokens, clean_up_tokenization_spaces)[0]

    def decode_with_codebook(
        self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> tuple[str, Codebook]:
        """`decode` of one sequence, and the codebook its ids built (the canonical one of its text)."""
        base_ids, codebook = self.codec.decode(token_ids)
        text = self._base.decode(base_ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text, codebook

    def _decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        return self.decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> list[str]:
        """`decode` each sequence (each from its own start)."""
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in _plain(sequences)]
