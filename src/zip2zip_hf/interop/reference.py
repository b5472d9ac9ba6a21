"""Load a checkpoint the reference zip2zip package wrote, as a `Zip2ZipForCausalLM` with the same
logits.

The layouts (the reference's own ``save_pretrained`` and its research exports):

* ``zip2zip_config.json``: ``base_model_name_or_path`` (``"."``: the folder holds the base model
  itself), ``encoder_type`` and ``encoder`` (the hyper-encoders' settings, ``tie_encoders``
  among them), ``compression`` (V, K, M, disabled ids), and from format 2 on ``position_mode``
  (``"compressed"``, the v0.1 convention, or ``"base_token_end"``);
* ``zip2zip_encoders.safetensors`` (or ``encoders.safetensors``): ``input_encoder.*``, and
  ``output_encoder.*`` when the encoders are untied;
* the decoder: a PEFT adapter (``adapter_config.json``, merged into the base weights here), a whole
  ``model.safetensors`` over the base model, or nothing (the base model as it is).

The pad id is not in their config: it is the base tokenizer's pad, else its EOS. Everything that
does not match (a missing or mis-shaped weight, an unknown encoder type, an M other than the
encoders' position tables, a base vocabulary other than V) is an error naming the file and key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..modeling_zip2zip import Zip2ZipForCausalLM
from ..reference_hyper_encoders import REFERENCE_ENCODER_TYPES
from ..tokenization_zip2zip import Zip2ZipTokenizer


__all__ = ["from_reference", "read_reference_config"]

CONFIG_FILE = "zip2zip_config.json"
ENCODER_FILES = ("zip2zip_encoders.safetensors", "encoders.safetensors")
# Their position conventions, by the names of this package's `position_mode`.
POSITION_MODES = {"compressed": "compressed", "base_token_end": "base"}
ENCODER_SIDES = {"input_encoder.": "input_hyper_encoder", "output_encoder.": "output_hyper_encoder"}


def read_reference_config(path: str | os.PathLike) -> dict:
    """The reference's ``zip2zip_config.json`` at ``path``, checked: a ValueError names what is wrong."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}: not a checkpoint of the reference zip2zip package")
    with open(file, encoding="utf-8") as f:
        settings = json.load(f)
    for key in ("encoder_type", "encoder", "compression"):
        if key not in settings:
            raise ValueError(f"{file}: no {key!r}")
    if settings["encoder_type"] not in REFERENCE_ENCODER_TYPES:
        raise ValueError(f"{file}: encoder_type {settings['encoder_type']!r} is not one of {REFERENCE_ENCODER_TYPES}")
    position_mode = settings.get("position_mode", "compressed")
    if position_mode not in POSITION_MODES:
        raise ValueError(f"{file}: position_mode {position_mode!r} is not one of {tuple(POSITION_MODES)}")
    for key in ("initial_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids"):
        if settings["compression"].get(key) is None:
            raise ValueError(f"{file}: compression.{key} is missing")
    return settings


def from_reference(
    path: str | os.PathLike, base_model: str | os.PathLike | PreTrainedModel | None = None, **from_pretrained_kwargs
) -> tuple[Zip2ZipForCausalLM, Zip2ZipTokenizer]:
    """Load the reference checkpoint at ``path``; return ``(model, tokenizer)`` of this package.

    Args:
        path: the folder the reference saved (see the module docstring for what it holds).
        base_model: the base model (a loaded causal LM, or its folder), when not the one its config
            names (``base_model_name_or_path``). A loaded one gets the checkpoint's decoder weights in
            place (its adapter merged, or its ``model.safetensors``).
        from_pretrained_kwargs: for ``AutoModelForCausalLM.from_pretrained`` of the base model
            (``dtype``, ``device_map``, ...).

    ``model.save_pretrained(out)`` and ``tokenizer.save_pretrained(out)`` then write a checkpoint
    of this package (``python -m zip2zip_hf convert`` does both).
    """
    folder = Path(path)
    settings = read_reference_config(folder)
    source = _base_source(folder, settings, base_model)
    base_tokenizer = AutoTokenizer.from_pretrained(folder if _has_tokenizer(folder) else source)
    if isinstance(base_model, PreTrainedModel):
        base = base_model
    else:
        base = AutoModelForCausalLM.from_pretrained(source, **from_pretrained_kwargs)
    if settings.get("base_model_name_or_path") != ".":
        base = _with_decoder_weights(base, folder)
    _check_width(settings, base, folder)
    tokenizer = _tokenizer(base_tokenizer, settings["compression"], folder)
    model = Zip2ZipForCausalLM.from_base(
        base.eval(),
        tokenizer,
        hyper_encoder="reference",
        reference_hyper_encoder={
            **settings["encoder"],
            "encoder_type": settings["encoder_type"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        tie_hyper_encoders=bool(settings["encoder"].get("tie_encoders", False)),
        position_mode=POSITION_MODES[settings.get("position_mode", "compressed")],
        write_provisional_hypertokens=False,  # its generation never writes the provisional id
    )
    _load_encoders(model, folder, settings)
    return model.eval(), tokenizer


def _base_source(folder: Path, settings: dict, base_model) -> str:
    """Where the base model (and, if the folder has none, the tokenizer) is read from."""
    if base_model is not None and not isinstance(base_model, PreTrainedModel):
        return str(base_model)
    named = settings.get("base_model_name_or_path")
    if named is None and base_model is None:
        raise ValueError(f"{folder / CONFIG_FILE} names no base_model_name_or_path: pass base_model=")
    return str(folder) if named in (None, ".") else named


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _with_decoder_weights(base: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """The base model with the checkpoint's decoder weights: its LoRA adapter merged, or its whole
    ``model.safetensors`` loaded (every weight accounted for), or as it is when there are neither."""
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return base
    state, own = load_file(weights, device=str(base.device)), base.state_dict()
    loaded = {own[name].data_ptr() for name in state if name in own}
    problems = [f"unexpected {name}" for name in state if name not in own]
    problems += [
        f"{name} has shape {tuple(state[name].shape)}, the base model {tuple(own[name].shape)}"
        for name in state
        if name in own and state[name].shape != own[name].shape
    ]
    problems += [f"missing {name}" for name in own if name not in state and own[name].data_ptr() not in loaded]
    if problems:  # checked before anything is loaded: the base model is left as it was
        raise ValueError(f"{weights} does not match the base model: " + "; ".join(problems))
    base.load_state_dict(state, strict=False)
    return base


def _check_width(settings: dict, base: PreTrainedModel, folder: Path) -> None:
    """The encoders read the base model's embedding rows: their model width must be the base model's."""
    encoder = settings["encoder"]
    latent = settings["encoder_type"] == "res_latent_attn" and encoder.get("model_hidden_size")
    key = "model_hidden_size" if latent else "hidden_size"
    width = base.get_input_embeddings().weight.shape[1]
    if encoder.get(key) != width:
        raise ValueError(
            f"{folder / CONFIG_FILE}: encoder.{key} is {encoder.get(key)} but the base model's embeddings are "
            f"{width} wide: the base model is not the one this checkpoint was trained on"
        )


def _tokenizer(base_tokenizer, compression: dict, folder: Path) -> Zip2ZipTokenizer:
    V = compression["initial_vocab_size"]
    if len(base_tokenizer) != V:
        raise ValueError(
            f"{folder / CONFIG_FILE}: compression.initial_vocab_size is {V} but the base tokenizer has "
            f"{len(base_tokenizer)} ids: the base model is not the one this checkpoint was trained on"
        )
    pad = base_tokenizer.pad_token_id if base_tokenizer.pad_token_id is not None else base_tokenizer.eos_token_id
    return Zip2ZipTokenizer.from_base(
        base_tokenizer,
        max_codebook_size=compression["max_codebook_size"],
        max_subtokens=compression["max_subtokens"],
        disabled_ids=sorted({*compression["disabled_ids"], pad}),
    )


def _load_encoders(model: Zip2ZipForCausalLM, folder: Path, settings: dict) -> None:
    """The reference's encoder weights into the model's hyper-encoders, every key accounted for."""
    file = next((folder / name for name in ENCODER_FILES if (folder / name).is_file()), None)
    if file is None:
        raise ValueError(f"{folder} has no hyper-encoder weights ({' or '.join(ENCODER_FILES)})")
    state = load_file(file)
    stray = [key for key in state if not key.startswith(tuple(ENCODER_SIDES))]
    if stray:
        raise ValueError(f"{file}: keys outside input_encoder.* and output_encoder.*: {stray}")
    for prefix, attribute in ENCODER_SIDES.items():
        module = getattr(model, attribute)
        side = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if module is None:
            if side:
                raise ValueError(f"{file}: {prefix}* weights, but {CONFIG_FILE} says the encoders are tied")
            continue
        _load_side(module, side, file, prefix, settings)


def _load_side(module: torch.nn.Module, side: dict, file: Path, prefix: str, settings: dict) -> None:
    expected = module.state_dict()
    problems = [f"missing {prefix}{key}" for key in expected if key not in side]
    problems += [f"unexpected {prefix}{key}" for key in side if key not in expected]
    M = settings["compression"]["max_subtokens"]
    for key, value in side.items():
        if key in expected and value.shape != expected[key].shape:
            if key == "pos_embed.weight" and value.shape[1:] == expected[key].shape[1:]:
                problems.append(
                    f"{prefix}{key} has {value.shape[0]} positions but compression.max_subtokens (M) is {M}"
                )
            else:
                shape = tuple(expected[key].shape)
                problems.append(f"{prefix}{key} has shape {tuple(value.shape)}, the config gives {shape}")
    if problems:
        raise ValueError(f"{file} does not match {CONFIG_FILE}: " + "; ".join(problems))
    like = next(iter(expected.values()), None)
    module.load_state_dict({key: value.to(like.dtype) for key, value in side.items()} if like is not None else side)
