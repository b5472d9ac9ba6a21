"""Reading a checkpoint into a zip2zip model loudly: the renamings between its weight names and
the model's, the weights a bare model leaves out (the base's head), and errors that name what does
not match (a missing, mis-shaped or unexpected weight, a damaged file, a tokenizer saved with other
compression settings). `Zip2ZipPreTrainedModel.from_pretrained` uses all of it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ._compat import saved_weight_names
from .configuration_zip2zip import COMPRESSION_KEYS, Zip2ZipConfig


__all__ = [
    "FORMAT_1_KEY_MAPPING",
    "HUB_KEYWORDS",
    "base_head_patterns",
    "check_saved_tokenizer",
    "damaged_weights_message",
    "decoder_key_mapping",
    "loading_problems",
]

# Checkpoints of format 1 named the wrapped model's weights ``model.*``; a regex no format-2 name
# matches, so it is safe to apply to every checkpoint.
FORMAT_1_KEY_MAPPING = {r"^model\.": "language_model."}
# `from_pretrained` arguments that say where a checkpoint is (its config is read with the same ones).
HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def decoder_key_mapping(text_config: PretrainedConfig) -> dict[str, str]:
    """A causal-LM checkpoint names the base model's decoder ``language_model.<prefix>.*`` (``model``
    for Llama, ``transformer`` for GPT-2); the bare model names it ``language_model.*``."""
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_config), None)
    prefix = getattr(causal_lm, "base_model_prefix", "")
    return {rf"^language_model\.{re.escape(prefix)}\.": "language_model."} if prefix else {}


def loading_problems(model: PreTrainedModel, info: dict) -> list[str]:
    """What ``from_pretrained``'s loading info says does not match, one named weight each."""
    problems = [f"missing: {k}" for k in info.get("missing_keys", ())]
    problems += [mismatch_message(m, model) for m in info.get("mismatched_keys", ())]
    # transformers has already left out what the class ignores (`_keys_to_ignore_on_load_unexpected`);
    # 4.57 does not apply the base model's own list, so it is applied here too.
    ignored = [re.compile(p) for p in getattr(model.language_model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not any(p.search(k) for p in ignored)]
    return problems + [f"unexpected: {k}" for k in unexpected]


def base_head_patterns(text_config: PretrainedConfig) -> list[str]:
    """Patterns for the weights a causal-LM checkpoint holds beside the base model's decoder: the base
    causal LM's head, under its module name and under the name ``save_pretrained`` writes for it
    (GPT-NeoX's head is the module ``lm_head`` from transformers 5 on, saved as ``embed_out`` as
    4.57 names it; BioGPT's is ``output_projection``). Found by building that causal LM on the meta
    device (no memory, no weights); ``lm_head`` alone when the base is not a registered causal LM."""
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(text_config), None)
    if causal_lm is None:
        return [r"^language_model\.lm_head\."]
    try:
        with torch.device("meta"):
            lm = causal_lm(copy.deepcopy(text_config))
    except Exception:  # a base that cannot be built on the meta device: its head is likely lm_head
        return [r"^language_model\.lm_head\."]
    decoder = f"{lm.base_model_prefix}."
    head = {key: value for key, value in lm.state_dict().items() if not key.startswith(decoder)}
    names = {key.split(".")[0] for key in (*head, *_saved_names(lm, head))}
    return [rf"^language_model\.{re.escape(name)}(\.|$)" for name in sorted(names)]


def _saved_names(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> list[str]:
    """`_compat.saved_weight_names`, or the module names where the conversion cannot run."""
    try:
        return saved_weight_names(model, state)
    except Exception:  # a conversion that cannot run on meta tensors: the module names only
        return list(state)


def mismatch_message(mismatch, model: PreTrainedModel) -> str:
    """One mis-shaped weight, named: ``(name, checkpoint shape, model shape)`` (transformers 5), or its
    name alone (4.57). A hyper-encoder's position table is M rows long, so a checkpoint whose table
    is not is one whose config.json gives another ``max_subtokens`` than it was trained with."""
    M = model.config.max_subtokens
    key = mismatch[0] if isinstance(mismatch, tuple) else mismatch
    parameter = model.state_dict().get(key)
    expected = tuple(mismatch[2]) if isinstance(mismatch, tuple) else tuple(getattr(parameter, "shape", ()))
    position_table = "hyper_encoder." in key and expected[:1] == (M,) and len(expected) == 2
    if not isinstance(mismatch, tuple):
        if position_table:
            return (
                f"mis-shaped: {key} (one row per position up to max_subtokens: M is {M} in config.json, "
                "not the M it was trained with)"
            )
        return f"mis-shaped: {key}"
    saved = tuple(mismatch[1])
    if position_table and saved[1:] == expected[1:]:
        return f"mis-shaped: {key} has {saved[0]} positions but max_subtokens (M) is {M} in config.json"
    return f"mis-shaped: {key} is {saved} in the checkpoint but {expected} in the model"


def damaged_weights_message(path, error: Exception) -> str:
    """What a safetensors error while loading ``path`` means, naming the damaged file when ``path`` is
    a local folder (the error itself names none)."""
    damaged = None
    if path is not None and os.path.isdir(str(path)):
        for name in sorted(os.listdir(str(path))):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(str(path), name), framework="pt"):
                        pass
                except (SafetensorError, OSError):
                    damaged = os.path.join(str(path), name)
                    break
    where = damaged or f"{path}: a weights file"
    return f"{where} is not a complete safetensors file ({error}): it was cut short or damaged; save it again"


def check_saved_tokenizer(config: Zip2ZipConfig, path) -> None:
    """A tokenizer saved beside the weights must compress exactly as the config says."""
    tokenizer_config = os.path.join(str(path), "tokenizer_config.json")
    if not os.path.isfile(tokenizer_config):
        return
    with open(tokenizer_config, encoding="utf-8") as f:
        saved = json.load(f)
    if "max_codebook_size" in saved:  # a Zip2ZipTokenizer (a plain one is not ours to judge)
        config.check_tokenizer(SimpleNamespace(**{key: saved.get(key) for key in COMPRESSION_KEYS}))
