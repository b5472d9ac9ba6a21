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
encoders' position tables, a base vocabulary other than V), a config section of the wrong type, a
truncated or damaged safetensors file, a weight that is NaN or infinite (or, for the encoders, not
floating-point) and a base model folder that is not there is a ValueError naming the file and key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
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
# The encoder settings the reference encoders read, by type (`reference_hyper_encoders`).
ENCODER_INTS = ("hidden_size", "model_hidden_size", "num_heads", "num_hidden_layers", "intermediate_size")
ENCODER_FLAGS = ("tie_encoders", "causal", "residual")


def read_reference_config(path: str | os.PathLike) -> dict:
    """The reference's ``zip2zip_config.json`` at ``path``, checked: a ValueError names what is wrong."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}: not a checkpoint of the reference zip2zip package")
    try:
        with open(file, encoding="utf-8") as f:
            settings = json.load(f)
    except ValueError as error:  # not JSON, not UTF-8
        raise ValueError(f"{file}: not a JSON file ({error})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{file}: a JSON object expected, not {type(settings).__name__}")
    for key in ("encoder_type", "encoder", "compression"):
        if key not in settings:
            raise ValueError(f"{file}: no {key!r}")
    for key in ("encoder", "compression"):
        if not isinstance(settings[key], dict):
            raise ValueError(f"{file}: {key} must be an object of settings, not {settings[key]!r}")
    if settings["encoder_type"] not in REFERENCE_ENCODER_TYPES:
        raise ValueError(f"{file}: encoder_type {settings['encoder_type']!r} is not one of {REFERENCE_ENCODER_TYPES}")
    position_mode = settings.get("position_mode", "compressed")
    if not isinstance(position_mode, str) or position_mode not in POSITION_MODES:
        raise ValueError(f"{file}: position_mode {position_mode!r} is not one of {tuple(POSITION_MODES)}")
    named = settings.get("base_model_name_or_path")
    if named is not None and not isinstance(named, str):
        raise ValueError(f"{file}: base_model_name_or_path must be a string, not {named!r}")
    compression = settings["compression"]
    for key in ("initial_vocab_size", "max_codebook_size", "max_subtokens", "disabled_ids"):
        if compression.get(key) is None:
            raise ValueError(f"{file}: compression.{key} is missing")
    for key in ("initial_vocab_size", "max_codebook_size", "max_subtokens"):
        least = 0 if key == "max_codebook_size" else 1
        if not _is_int(compression[key]) or compression[key] < least:
            raise ValueError(
                f"{file}: compression.{key} must be an integer of at least {least}, not {compression[key]!r}"
            )
    disabled = compression["disabled_ids"]
    if not isinstance(disabled, list) or not all(_is_int(i) and i >= 0 for i in disabled):
        raise ValueError(f"{file}: compression.disabled_ids must be a list of ids, not {disabled!r}")
    for key, value in settings["encoder"].items():
        if key in ENCODER_INTS and value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{file}: encoder.{key} must be a positive integer, not {value!r}")
        if key in ENCODER_FLAGS and not isinstance(value, bool):
            raise ValueError(f"{file}: encoder.{key} must be true or false, not {value!r}")
    return settings


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    base_tokenizer = _load(AutoTokenizer, folder if _has_tokenizer(folder) else source, "tokenizer")
    if isinstance(base_model, PreTrainedModel):
        base = base_model
    else:
        base = _load(AutoModelForCausalLM, source, "base model", **from_pretrained_kwargs)
    if settings.get("base_model_name_or_path") != ".":
        base = _with_decoder_weights(base, folder)
    _check_finite(
        base, "the base model given" if isinstance(base_model, PreTrainedModel) else f"the base model {source}"
    )
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
        # Its logits and generation exactly: it keeps the mass of ids that are not canonical (True
        # makes bits per byte exact and generation canonical; the model is otherwise the same).
        canonical_ids_only=False,
    )
    _load_encoders(model, folder, settings)
    return model.eval(), tokenizer


def _base_source(folder: Path, settings: dict, base_model) -> str:
    """Where the base model (and, if the folder has none, the tokenizer) is read from: a local
    folder that is not there is said so, not looked up on the Hub as a repo id."""
    if base_model is not None and not isinstance(base_model, PreTrainedModel):
        if looks_like_a_path(str(base_model)) and not os.path.isdir(base_model):
            raise ValueError(f"base_model {base_model}: no such folder")
        return str(base_model)
    named = settings.get("base_model_name_or_path")
    if named is None and base_model is None:
        raise ValueError(f"{folder / CONFIG_FILE} names no base_model_name_or_path: pass base_model=")
    if named not in (None, ".") and base_model is None and looks_like_a_path(named) and not os.path.isdir(named):
        raise ValueError(
            f"{folder / CONFIG_FILE} names the base model {named}, which is not here: pass base_model= "
            "(--base) with its folder"
        )
    return str(folder) if named in (None, ".") else named


def looks_like_a_path(name: str) -> bool:
    """Whether a model name is a path rather than a Hub repo id (``name`` or ``owner/name``)."""
    windows_separator = os.sep != "/" and os.sep in name
    relative = name in (".", "..") or name.startswith(("./", "../", "~"))
    return os.path.isabs(name) or relative or windows_separator or name.count("/") > 1 or os.path.lexists(name)


def _load(auto_class, source, what: str, **kwargs):
    """``auto_class.from_pretrained(source)``; a damaged file is a ValueError naming ``source``."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError):
        raise
    except SafetensorError as error:
        raise ValueError(f"{source}: its {what} weights are not a complete safetensors file ({error})") from None
    except Exception as error:  # the tokenizers library reports a damaged tokenizer.json as Exception
        if what != "tokenizer" or type(error) is not Exception:
            raise
        raise ValueError(f"{source}: cannot read its tokenizer ({error})") from None


def _read_weights(file: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or damaged file is a ValueError naming it."""
    try:
        return load_file(file, device=device)
    except SafetensorError as error:
        raise ValueError(f"{file} is not a complete safetensors file ({error}): it was cut short or damaged") from None


def _check_values(state: dict[str, torch.Tensor], file: Path, floating_only: bool = False) -> None:
    """Weights must be finite (a NaN would only show up later, as wrong logits), and with
    ``floating_only`` floating-point (the hyper-encoders': an integer table would be cast silently)."""
    for key, value in state.items():
        if not value.is_floating_point():
            if floating_only:
                raise ValueError(f"{file}: {key} holds {value.dtype} values, not floating-point weights")
            continue  # a decoder's integer buffers (position ids, masks)
        if not torch.isfinite(value).all():
            raise ValueError(f"{file}: {key} has non-finite values (NaN or infinity)")


def _check_finite(base: PreTrainedModel, what: str) -> None:
    """The decoder the encoders will run on: a NaN in it is said so (from_base would only find that
    the head no longer gives the base model's logits)."""
    for name, parameter in base.named_parameters():
        if parameter.is_floating_point() and parameter.device.type != "meta":
            if not torch.isfinite(parameter).all():
                raise ValueError(f"{what}: {name} has non-finite values (NaN or infinity)")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _with_decoder_weights(base: PreTrainedModel, folder: Path) -> PreTrainedModel:
    """The base model with the checkpoint's decoder weights: its LoRA adapter merged, or its whole
    ``model.safetensors`` loaded (every weight accounted for), or as it is when there are neither."""
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        adapter = folder / "adapter_model.safetensors"
        if adapter.is_file():  # checked before anything is merged: the base model is left as it was
            _check_values(_read_weights(adapter), adapter)
        try:
            return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        except SafetensorError as error:
            raise ValueError(f"{folder}: its adapter is not a complete safetensors file ({error})") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return base
    state, own = _read_weights(weights, device=str(base.device)), base.state_dict()
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
    _check_values(state, weights)
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
    state = _read_weights(file)
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
    _check_values({prefix + key: value for key, value in side.items()}, file, floating_only=True)
    like = next(iter(expected.values()), None)
    module.load_state_dict({key: value.to(like.dtype) for key, value in side.items()} if like is not None else side)
