"""Folders a command reads, checked before anything heavy loads: an adapter folder ``uptrain`` wrote
(`check_uptrain_export`) and the JSON files of a checkpoint folder (`check_checkpoint_files`).

``export ADAPTER_FOLDER`` loads the adapter's base (540 MB for SmolLM2) before PEFT and the config read
the adapter's files; a damaged or hand-edited file would then fail deep inside them, as a traceback
(PEFT even takes a folder without weights for a Hub repo id). Here each file is read first, and each
problem is one `CLIError` naming the file and the field. A checkpoint's hand-edited JSON files (a
list where an object belongs, a model without positions) would likewise fail inside transformers.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from .report import CLIError, first_line


__all__ = ["check_checkpoint_files", "check_uptrain_export", "json_object"]

# What `uptrain` writes in uptrain.json (`tools.uptrain._record`); "model" and "compression" are read.
_RECORD_KEYS = frozenset(
    {
        "model",
        "compression",
        "recipe",
        "data",
        "steps",
        "commands",
        "training_seconds",
        "hardware",
        "held_out",
        "curve",
        "versions",
    }
)
_COMPRESSION_KEYS = ("max_codebook_size", "max_subtokens")
_WEIGHTS = "adapter_model.safetensors"


def check_uptrain_export(folder: Path) -> None:
    """A `CLIError` naming the file and the field, unless ``folder``'s ``uptrain.json``,
    ``adapter_config.json`` and ``adapter_model.safetensors`` are what `load_uptrain_export` reads."""
    record = json_object(folder / "uptrain.json")
    unknown = sorted(set(record) - _RECORD_KEYS)
    if unknown:
        raise CLIError(f"{folder / 'uptrain.json'}: unknown keys {unknown} (uptrain writes {sorted(_RECORD_KEYS)})")
    for key in ("compression", "model"):
        if not isinstance(record.get(key), dict):
            raise CLIError(f"{folder / 'uptrain.json'}: {key} must be a JSON object, got {record.get(key)!r:.80}")
    _check_settings(folder / "uptrain.json", record["compression"], record["model"])
    config = json_object(folder / "adapter_config.json")
    if not isinstance(config.get("base_model_name_or_path"), str):
        raise CLIError(
            f"{folder / 'adapter_config.json'}: base_model_name_or_path must be a string naming the base, "
            f"got {config.get('base_model_name_or_path')!r:.80}"
        )
    _check_weights(folder / _WEIGHTS)


def json_object(path: Path) -> dict:
    """The JSON object in ``path``, or a `CLIError` naming the file (missing, not JSON, not an object)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CLIError(f"{path}: missing") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise CLIError(f"{path}: cannot read it as JSON ({first_line(error)})") from None
    if not isinstance(content, dict):
        raise CLIError(f"{path}: holds a JSON {type(content).__name__}, not an object")
    return content


# The JSON files of a checkpoint folder that transformers reads as objects, where they exist.
_CHECKPOINT_JSON = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def check_checkpoint_files(folder: str | Path) -> None:
    """A `CLIError` naming the file and the field where a checkpoint's JSON files are not what loading
    it reads: each one an object, and positions for at least a token and the one after it."""
    folder = Path(folder)
    for name in _CHECKPOINT_JSON:
        if (folder / name).exists():
            json_object(folder / name)
    config = json_object(folder / "config.json")
    for where, settings in (("", config), ("text_config.", config.get("text_config"))):
        positions = settings.get("max_position_embeddings") if isinstance(settings, dict) else None
        if positions is not None and (type(positions) is not int or positions < 2):
            raise CLIError(
                f"{folder / 'config.json'}: {where}max_position_embeddings must be an int of at least 2 (a token "
                f"and the one it predicts), got {positions!r}"
            )


def _check_settings(path: Path, compression: dict, model: dict) -> None:
    """The compression and model settings, checked as the config that loads them checks them."""
    from ..configuration_zip2zip import Zip2ZipConfig

    missing = [key for key in _COMPRESSION_KEYS if key not in compression]
    if missing or set(compression) - set(_COMPRESSION_KEYS):
        raise CLIError(f"{path}: compression must hold exactly {list(_COMPRESSION_KEYS)}, got {sorted(compression)}")
    known = set(inspect.signature(Zip2ZipConfig.__init__).parameters) - {"self", "text_config", "kwargs"}
    unknown = sorted(set(model) - known)
    if unknown:
        raise CLIError(f"{path}: model has settings a zip2zip config does not know: {unknown}")
    base = {"model_type": "llama", "vocab_size": 1}  # a stand-in: only the settings themselves are checked
    try:
        Zip2ZipConfig(text_config=base, initial_vocab_size=1, **compression, **model)
    except (TypeError, ValueError) as error:
        raise CLIError(f"{path}: {first_line(error)}") from None


def _check_weights(path: Path) -> None:
    """The weights are there and whole (the header and the size it promises: what a truncation breaks)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CLIError(f"{path}: missing (the adapter's weights)")
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as error:  # safetensors' own error is no OSError
        raise CLIError(f"{path}: damaged ({first_line(error)})") from None
