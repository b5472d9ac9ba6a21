"""What a `Zip2ZipTokenizer` takes from its base tokenizer: the Rust tokenizer itself (loaded from a
saved file), the ids its post-processor adds around a sequence, the settings `from_base` copies
from a Hugging Face fast tokenizer, and the options of a base tokenizer's encoding that a compressed
row cannot honour.

Part of a checkpoint's remote-code closure: imports only tokenizers and the standard library.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from tokenizers import Tokenizer


__all__ = [
    "NAMED_SPECIAL_TOKENS",
    "load_base_tokenizer",
    "refuse_unsupported_options",
    "settings_of_base",
    "special_affixes",
]

# Named special-token attributes copied from a base tokenizer (the same in transformers 4.57 and 5.x).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_base_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The ``tokenizers`` JSON at ``path``; a ValueError naming the file if it is not one."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
        if isinstance(error, OSError):
            raise
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {error}") from None


def special_affixes(base: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids the base tokenizer's post-processor puts before and after a single sequence (e.g. BOS, EOS).

    Learned once from a probe text: `sequence_ids` is None exactly for the post-processor's tokens.
    """
    encoding = base.encode("a", add_special_tokens=True)
    content = [i for i, sequence_id in enumerate(encoding.sequence_ids) if sequence_id is not None]
    if not content:  # the probe encoded to nothing: everything the post-processor adds is a prefix
        return list(encoding.ids), []
    return list(encoding.ids[: content[0]]), list(encoding.ids[content[-1] + 1 :])


def settings_of_base(base_tokenizer: Any, max_codebook_size: int, max_subtokens: int) -> dict[str, Any]:
    """`Zip2ZipTokenizer` keyword arguments that wrap a fast tokenizer: its Rust tokenizer, V, the
    special tokens (pad falls back to EOS), the disabled ids (every special and added token, pad and
    the post-processor's ids), the chat template and the other settings `from_base` copies."""
    rust = base_tokenizer.backend_tokenizer
    named = {k: str(v) for k, v in base_tokenizer.special_tokens_map.items() if k in NAMED_SPECIAL_TOKENS}
    if "pad_token" not in named:
        if "eos_token" not in named:
            raise ValueError("the base tokenizer has neither a pad nor an eos token: set base_tokenizer.pad_token")
        named["pad_token"] = named["eos_token"]
    extra = [t for t in base_tokenizer.all_special_tokens if t not in named.values()]
    pad_id = rust.token_to_id(named["pad_token"])
    prefix, suffix = special_affixes(rust)
    disabled = (
        set(base_tokenizer.all_special_ids)
        | set(base_tokenizer.added_tokens_decoder)
        | {pad_id}
        | set(prefix + suffix)
    )

    settings: dict[str, Any] = dict(
        base_tokenizer_object=rust,
        initial_vocab_size=len(base_tokenizer),
        max_codebook_size=max_codebook_size,
        max_subtokens=max_subtokens,
        disabled_ids=sorted(disabled),
        added_tokens_decoder=copy.deepcopy(dict(base_tokenizer.added_tokens_decoder)),
        additional_special_tokens=extra,
        model_max_length=base_tokenizer.model_max_length,
        clean_up_tokenization_spaces=bool(base_tokenizer.clean_up_tokenization_spaces),
        name_or_path=base_tokenizer.name_or_path,
        **named,
    )
    if base_tokenizer.chat_template is not None:
        settings["chat_template"] = copy.deepcopy(base_tokenizer.chat_template)
    return settings


def refuse_unsupported_options(
    text_pair: bool,
    is_split_into_words: bool,
    return_overflowing_tokens: bool,
    return_offsets_mapping: bool,
    split_special_tokens: bool,
    truncation,
) -> None:
    """NotImplementedError for the encoding options a compressed row cannot honour."""
    if text_pair:
        raise NotImplementedError("Zip2ZipTokenizer does not encode pairs of sequences")
    if is_split_into_words:
        raise NotImplementedError("Zip2ZipTokenizer does not encode pre-tokenized input (is_split_into_words)")
    if return_overflowing_tokens:
        raise NotImplementedError("Zip2ZipTokenizer does not return overflowing tokens")
    if return_offsets_mapping:
        raise NotImplementedError("offsets are not available: a hypertoken spans several base tokens")
    if split_special_tokens:
        raise NotImplementedError("Zip2ZipTokenizer does not split special tokens")
    if truncation == "only_second":
        raise NotImplementedError("truncation='only_second' needs pairs, which Zip2ZipTokenizer does not encode")
