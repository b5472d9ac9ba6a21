"""Everything that differs between the transformers releases zip2zip_hf supports (4.57 to 5.25).

One place per difference, each saying which release needs it. Where the installed release can be
asked (a dataclass field, a signature), the code asks instead of comparing version numbers, so a new
release takes the path that matches what it has. What cannot be asked is checked by
`check_generation_internals`, which fails loudly, naming the release, when an internal that the
generation code overrides has moved: a silent fallback would give wrong text, not an error.

Part of a checkpoint's remote-code closure. The tokenizer imports it too and must work without
torch, so what needs torch is imported inside the function that needs it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import threading

import transformers


__all__ = [
    "CACHE_NAMES",
    "SUPPORTED_RELEASES",
    "TRANSFORMERS_VERSION",
    "beam_search_reads_vocab_size",
    "beam_search_vocab_size",
    "cache_keyword",
    "check_generation_internals",
    "checkpointing_arguments",
    "crop_length",
    "crop_zero_removes_nothing",
    "enable_activation_checkpointing",
    "forget_key_mapping",
    "original_init_errors",
    "output_cache_field",
    "pop_cache",
    "saved_weight_names",
    "tokenizer_init_kwargs",
    "truncate_cache",
]

TRANSFORMERS_VERSION: str = transformers.__version__
SUPPORTED_RELEASES = "4.57 to 5.25"

# ---------------------------------------------------------------------- the cache's name (5.24)

# transformers 5.24 renamed the cache of `forward` and `generate`, and the output field that holds it,
# from `past_key_values` to `cache` (`past_key_values` and Mamba's `cache_params` stay deprecated
# aliases until 5.40). Our forward takes any of the names; its output uses the one generate reads.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")


@functools.cache
def output_cache_field(output_class: type | None = None) -> str:
    """The field of a model output (default `CausalLMOutputWithPast`) that holds the cache, the one
    generate reads: ``cache`` from 5.24 on."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = (output_class or CausalLMOutputWithPast).__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


def cache_keyword(forward_parameters) -> str:
    """The keyword a base model's forward reads its cache from: ``cache`` from 5.24 on."""
    return "cache" if "cache" in forward_parameters else "past_key_values"


def pop_cache(kwargs: dict, cache=None):
    """The cache given as ``cache`` or under any of `CACHE_NAMES` in ``kwargs`` (popped from them).

    Passing it twice is an error, and so is any other cache-like object left in ``kwargs``: handed
    to the base model, it would grow its keys and values while the codebooks stayed behind.
    """
    from transformers import Cache

    given = {"cache": cache} if cache is not None else {}
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            given[name] = value
    if len(given) > 1:
        raise ValueError(f"the cache was passed twice, as {' and '.join(given)}: pass it once, as `cache`")
    cache = next(iter(given.values()), None)
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(
            f"the cache must be the transformers Cache this model returned, got {type(cache).__name__} "
            "(tuples of tensors, the legacy format, cannot carry the codebooks)"
        )
    for key, value in kwargs.items():
        if isinstance(value, Cache) or _is_legacy_cache(value):
            raise ValueError(
                f"forward got a cache under `{key}`, which zip2zip_hf does not read on transformers "
                f"{TRANSFORMERS_VERSION} (supported: {SUPPORTED_RELEASES}); pass the cache as `cache`"
            )
    return cache


def _is_legacy_cache(value) -> bool:
    """A tuple of per-layer ``(key, value)`` tensor tuples, the cache format of transformers 4.x."""
    import torch

    return (
        isinstance(value, (tuple, list))
        and len(value) > 0
        and isinstance(value[0], (tuple, list))
        and len(value[0]) > 0
        and isinstance(value[0][0], torch.Tensor)
    )


# ---------------------------------------------------------------------- cache methods


def truncate_cache(cache, length: int) -> None:
    """Cut every layer of a cache back to ``length`` positions (layers already that short, e.g. ones
    a failed forward never reached, stay as they are).

    A layer's ``crop`` takes the length to keep in older releases and the number of positions to
    remove in newer ones (`crop_zero_removes_nothing`); both read a negative number as "remove that
    many from the end", which is what we pass. Static layers had no ``crop`` before the releases
    that count their positions in a ``cumulative_length`` they can crop (5.24 has it): those of 4.57
    and 5.0 count the positions whose keys are not all zero, later ones (5.17, 5.18) keep the count
    in ``cumulative_length`` (a tensor at a fixed address, written in place). The positions past
    ``length`` are zeroed and the counter, where there is one, set back.
    """
    for index, layer in enumerate(cache.layers):
        excess = int(cache.get_seq_length(index)) - length
        if excess <= 0:  # crop(0) empties the layer where crop takes the length to keep
            continue
        if hasattr(layer, "crop"):
            layer.crop(-excess)
            continue
        layer.keys[:, :, length:].zero_()
        layer.values[:, :, length:].zero_()
        counter = getattr(layer, "cumulative_length", None)
        if hasattr(counter, "fill_"):
            counter.fill_(length)
        elif isinstance(counter, int):
            layer.cumulative_length = length


@functools.cache
def crop_zero_removes_nothing() -> bool:
    """Whether the installed caches read ``crop(0)`` as "remove nothing" (their ``crop`` takes the
    number of positions to remove, as in 5.17 and 5.24, whose decoding loops call ``crop(0)`` to mean
    that) or as "keep nothing" (it takes the length to keep, as in 4.57 and 5.0). Asked of a transformers
    `DynamicCache` holding two positions; where that cannot be built, of the name ``crop`` gives
    its argument."""
    import torch
    from transformers import DynamicCache

    try:
        cache = DynamicCache()
        states = torch.zeros(1, 1, 2, 1)
        cache.update(states, states, 0)
        cache.crop(0)
        return int(cache.get_seq_length()) == 2
    except Exception:  # the probe could not be built: ask the signature instead
        from transformers.cache_utils import DynamicLayer

        return "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def crop_length(current: int, argument: int) -> int:
    """The length that ``Cache.crop(argument)`` keeps of a cache holding ``current`` positions.

    A negative argument removes that many positions in every release. A positive one is the length
    to keep (deprecated from 5.17, refused by 5.24's own caches; ours keep reading it so). 0 means
    what the installed caches mean by it (`crop_zero_removes_nothing`): nothing removed in newer
    releases (5.17 on), everything in older ones (4.57, 5.0).
    """
    try:  # integer-like values (numpy and 0-d tensor ints), as transformers' caches take them
        if isinstance(argument, bool) or "bool" in str(getattr(argument, "dtype", "")):
            raise TypeError
        argument = operator.index(argument)
    except TypeError:
        raise ValueError(f"crop takes an int, got {argument!r}") from None
    if argument < 0:
        length = current + argument
    elif argument == 0:
        length = current if crop_zero_removes_nothing() else 0
    else:
        length = min(argument, current)
    if length < 0:
        raise ValueError(f"crop({argument}) would remove more than the {current} positions the cache holds")
    return length


# ---------------------------------------------------------------------- weight names (5.0)


def forget_key_mapping(model, key_mapping: dict[str, str]) -> None:
    """Save a model loaded with ``from_pretrained(key_mapping=...)`` under today's weight names.

    From 5.x on, a model remembers the renamings that loading used (``_weight_conversions``) and
    ``save_pretrained`` reverts them, writing the old names again; 4.57 never reverts.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        patterns = list(key_mapping)
        model._weight_conversions = [c for c in conversions if getattr(c, "source_patterns", None) != patterns]


def saved_weight_names(model, state: dict) -> list[str]:
    """The names ``save_pretrained`` writes for the weights ``state`` of ``model``: from 5.0 on a
    model's weights may be renamed on saving (``revert_weight_conversion``, to the names its
    checkpoints have always had); 4.57 writes them as they are."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # 4.57
        return list(state)
    return list(revert_weight_conversion(model, dict(state)))


# ---------------------------------------------------------------------- generation

_BEAM_SEARCH_LOCK = threading.Lock()


@functools.cache
def beam_search_reads_vocab_size() -> bool:
    """Whether the installed beam search takes the logits' width from the config's ``vocab_size``.

    4.57 to 5.17 do (``vocab_size = self.config.get_text_config().vocab_size``, then
    ``reshape(log_probs, (batch_size, num_beams * vocab_size))``); 5.18 reshapes with ``-1``, reading
    the width from the logits. Asked of the code itself, comments left out: a release that cannot be
    read (no source) is taken to read it, the safe side, since showing it the width changes nothing
    for a search that does not look.
    """
    import io
    import re
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(transformers.GenerationMixin._beam_search))
    except (OSError, TypeError):
        return True
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        code = " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))
    except (tokenize.TokenError, SyntaxError):  # unreadable as code: the comments stay in, still safe
        code = source
    return re.search(r"config\s*(\.\s*get_text_config\s*\(\s*\))?\s*\.\s*vocab_size\b", code) is not None


@contextlib.contextmanager
def beam_search_vocab_size(text_config, width: int):
    """Beam search up to 5.17 reshapes scores with the text config's ``vocab_size``, not with the
    logits' width (`beam_search_reads_vocab_size`; 5.18 on read the width): show it ``width`` for
    the search only. The config is shared by every thread calling the model, so such beam searches
    take turns (nothing else reads ``vocab_size`` during a call)."""
    if not beam_search_reads_vocab_size():
        yield
        return
    with _BEAM_SEARCH_LOCK:
        vocab_size = text_config.vocab_size
        text_config.vocab_size = width
        try:
            yield
        finally:
            text_config.vocab_size = vocab_size


# What the generation code overrides or calls by name: if a release renames one of these, our
# version would silently stop being used (beams would lose their codebooks, stop strings would be
# matched on hyper ids, draft models with more rows than V refused), so it must be an error instead.
_GENERATION_INTERNALS = {
    "GenerationMixin": {
        "_beam_search": (),
        "_get_stopping_criteria": ("generation_config", "tokenizer"),
        "_assisted_decoding": ("generation_config", "streamer", "assistant_model"),
        "_validate_generation_mode": ("generation_mode", "generation_config", "generation_mode_kwargs"),
    },
    "DynamicCache": {
        "reorder_cache": ("beam_idx",),
        "batch_repeat_interleave": ("repeats",),
        "batch_select_indices": ("indices",),
        "crop": (),
        "get_seq_length": (),
    },
}


def check_generation_internals() -> None:
    """Raise RuntimeError, naming the release and what moved, if an internal we rely on is gone."""
    moved = []
    for owner_name, methods in _GENERATION_INTERNALS.items():
        owner = getattr(transformers, owner_name)
        for name, parameters in methods.items():
            method = getattr(owner, name, None)
            if method is None:
                moved.append(f"{owner_name}.{name} is gone")
                continue
            missing = [p for p in parameters if p not in inspect.signature(method).parameters]
            if missing:
                moved.append(f"{owner_name}.{name} no longer takes {', '.join(missing)}")
    # generate looks its decoding loop up by name: ours replaces the one it finds for drafts.
    from transformers.generation.configuration_utils import GenerationMode
    from transformers.generation.utils import GENERATION_MODES_MAPPING

    if GENERATION_MODES_MAPPING.get(GenerationMode.ASSISTED_GENERATION) != "_assisted_decoding":
        moved.append("generate no longer runs assisted generation through GenerationMixin._assisted_decoding")
    if moved:
        raise RuntimeError(
            f"transformers {TRANSFORMERS_VERSION} changed internals zip2zip_hf generation relies on "
            f"({'; '.join(moved)}); supported releases: {SUPPORTED_RELEASES}"
        )


# ---------------------------------------------------------------------- training


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant checkpointing under the name the release uses: ``activation_checkpointing_enable``
    from 5.x on (default non-reentrant), ``gradient_checkpointing_enable`` in 4.57 (default reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpointing_arguments() -> dict:
    """`TrainingArguments` keywords for non-reentrant checkpointing: ``activation_checkpointing*``
    where the release has them (5.x; 5.24 deprecates the ``gradient_*`` names), else ``gradient_*``."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


# ---------------------------------------------------------------------- tokenizers
# Also a 4.57-only difference, kept as a method because transformers calls it: 4.57 batches through
# `Zip2ZipTokenizer._batch_encode_plus`, 5.x sends every call to `_encode_plus`.


def tokenizer_init_kwargs(kwargs: dict, special_token_attributes) -> dict:
    """The keyword arguments of a tokenizer's ``__init__`` as the installed release wants them.

    transformers 5 passes facts about one load (``is_local``, ``local_files_only``), which must not
    be saved as settings, and saves the extra special tokens as a list under ``extra_special_tokens``;
    4.57 reads that key as a dict of named tokens and wants the list as ``additional_special_tokens``.
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in ("is_local", "local_files_only")}
    extra = kwargs.get("extra_special_tokens")
    if isinstance(extra, (list, tuple)) and "additional_special_tokens" in special_token_attributes:
        kwargs["additional_special_tokens"] = list(kwargs.pop("extra_special_tokens"))
    return kwargs


@contextlib.contextmanager
def original_init_errors():
    """transformers 4.57 builds a tokenizer inside ``except import_protobuf_decode_error():``, which
    without protobuf installed turns any error of the tokenizer's ``__init__`` (a bad setting in
    tokenizer_config.json, a corrupt file) into an ImportError about protobuf: raise the original."""
    try:
        yield
    except ImportError as error:
        original = error.__context__
        if "protobuf" in str(error).lower() and isinstance(original, (ValueError, TypeError)):
            raise original from None
        raise
