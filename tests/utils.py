"""Helpers shared by the tests: tiny models and tokenizers built in code, stdlib text, left padding,
logits comparison, and running a script where zip2zip_hf cannot be imported."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LogitsProcessorList

from zip2zip_hf import LZWCodec, Zip2ZipConfig, Zip2ZipForCausalLM
from zip2zip_hf.evaluation.forced_decoding import ForcedContinuationLogitsProcessor, canonical_continuation


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
    """Config of a tiny random Llama, Qwen2, Gemma-2, Phi-3 or GPT-2 (2 layers, 4 heads)."""
    from transformers import Gemma2Config, GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **kw)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=positions, **common)
    if arch == "gemma2":
        common["head_dim"] = hidden // 4
    if arch == "phi3":
        common.setdefault("pad_token_id", None)  # Phi-3's default (32000) is past a tiny vocabulary
    decoders = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma2": Gemma2Config, "phi3": Phi3Config}
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


# `python -m zip2zip_hf uptrain --recipe` for a `save_tiny_base_model` base: a few seconds per step count.
TINY_UPTRAIN_RECIPE = {
    "max_codebook_size": 64,
    "max_subtokens": 3,
    "window": 48,
    "eval_window": 48,
    "lora_r": 4,
    "max_chars": 20000,
}


def save_tiny_base_model(folder, seed: int = 0, arch: str = "llama"):
    """A tiny random causal LM (Llama unless told) and the tiny tokenizer saved as a plain HF folder
    (a stand-in base model)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_base_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = tiny_causal_lm_config(arch, len(tokenizer), positions=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


V = 300  # tokenizer length; the base models below have V (or more) embedding rows
K, M = 64, 3
PAD = 0
DISABLED = [0, 1]


def tiny_base(arch: str, tie: bool = False, rows: int = V):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_causal_lm_config(arch, rows, tie=tie)).eval()


def wrap(
    base, position_mode="base", hyper_encoder="attention", tie_encoders=False, max_codebook_size=K, on_device=True
):
    """A zip2zip model around ``base`` with the tests' settings. Decoding steps keep the codebooks
    on the device (`DeviceCodebooks`) unless ``on_device=False`` (the CPU default: Python streams),
    so the tests run the accelerator path on a CPU."""
    config = Zip2ZipConfig(
        text_config=base.config,
        initial_vocab_size=V,
        max_codebook_size=max_codebook_size,
        max_subtokens=M,
        disabled_ids=DISABLED,
        pad_token_id=PAD,
        hyper_encoder=hyper_encoder,
        hyper_encoder_num_heads=2,
        tie_hyper_encoders=tie_encoders,
        position_mode=position_mode,
    )
    model = Zip2ZipForCausalLM(config, base_model=base).eval()
    model.codebooks_on_device = on_device
    return perturb_hyper_encoders(model, seed=1)


@contextlib.contextmanager
def codebooks_on_device(model, on_device: bool | None):
    """Where ``model`` keeps its decoding codebooks, for a block of a test (``monkeypatch`` where
    a test can take it; hypothesis tests cannot)."""
    saved = model.codebooks_on_device
    model.codebooks_on_device = on_device
    try:
        yield model
    finally:
        model.codebooks_on_device = saved


def perturb_hyper_encoders(model, seed: int | None = None, scale: float = 0.2):
    """Add noise to the encoders' weights: a fresh encoder is an exact average, so entries such as
    ``[a, a]`` and ``[a, a, a]`` would tie exactly and hide mix-ups between them."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hyper_encoder" in name:
                param.add_(torch.randn_like(param) * scale)
    return model


def repetitive_ids(seed: int, length: int) -> list[int]:
    """Base ids with many repeats, so LZW installs and reuses plenty of hypertokens."""
    g = torch.Generator().manual_seed(seed)
    motifs = [
        torch.randint(2, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(4)
    ]
    ids = []
    while len(ids) < length:
        ids += motifs[int(torch.randint(0, 4, (1,), generator=g))]
        if torch.rand(1, generator=g) < 0.1:
            ids.append(1)  # a disabled id in the middle
    return ids[:length]


def compressed(seed: int, length: int) -> list[int]:
    return LZWCodec(V, K, M, DISABLED).encode(repetitive_ids(seed, length))[0]


def left_pad(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def padded_batch():
    """Three left-padded rows of compressed ids that write hypertokens when decoded further."""
    return left_pad([compressed(24, 70), compressed(25, 35), compressed(26, 52)])


def generate_ids(model, ids, mask, max_new_tokens: int = 12, **kwargs):
    """Greedy unless told otherwise, no end of sequence, the raw compressed ids returned."""
    kwargs.setdefault("do_sample", False)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=None,
        return_hypertokens=True,
        **kwargs,
    )


def step_by_step_logits(model, ids, mask, first: int = 1):
    """Feed ``first`` ids, then one id per call with the KV cache; return the logits of every position."""
    out = model(input_ids=ids[:, :first], attention_mask=mask[:, :first], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(first, ids.shape[1]):
        out = model(
            input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True
        )
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


def assert_same_logits(a, b, mask=None, atol=1e-4):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different legal sets"
    finite = torch.isfinite(a)
    torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=1e-4)


CODE_PROMPT = "def area(width, height):\n    return width * height\n\n"
CODE_CONTINUATION = (
    "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
    "def volume(width, height, depth):\n    return width * height * depth\n\n"
    "def surface(width, height, depth):\n    return 2 * (width * height + width * depth + height * depth)\n"
)


def forced_text_generation(model, tok, prompt: str, continuation: str, eos: bool = False, **kwargs):
    """Generate ``continuation`` after ``prompt`` by forced decoding; return (inputs, output, processor)."""
    inputs = tok(prompt, return_tensors="pt")
    base_ids = tok.base_ids([continuation], add_special_tokens=False)[0]
    processor = ForcedContinuationLogitsProcessor(tok.codec, base_ids, eos_token_id=tok.eos_token_id if eos else None)
    steps = len(canonical_continuation(tok.codec, inputs["input_ids"][0].tolist(), base_ids)) + eos
    kwargs.setdefault("max_new_tokens", steps + 5 if eos else steps)
    kwargs.setdefault("do_sample", False)
    out = model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), **kwargs)
    return inputs, out, processor


# Prepended to every script `run_without_package` runs: the checkpoint's own code must do everything.
_BLOCK_PACKAGE = "import sys\nsys.modules['zip2zip_hf'] = None  # importing zip2zip_hf now fails\n"


def run_without_package(script: str, *args: str, timeout: int = 300) -> str:
    """Run ``script`` (with ``args``) in a fresh interpreter where zip2zip_hf cannot be imported, with
    its own empty remote-code cache; return the last line it printed (a failure fails the test)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="zip2zip-remote-")
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGE + script, *args],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return done.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------- hypothesis strategies


@st.composite
def codecs(draw) -> LZWCodec:
    V = draw(st.integers(2, 8))
    K = draw(st.sampled_from([0, 1, 3, 6, 40]))
    M = draw(st.sampled_from([1, 2, 3, 4]))
    disabled = draw(st.sets(st.integers(0, V - 1), max_size=min(2, V - 1)))
    return LZWCodec(V, K, M, disabled)


def legal_ids(stream) -> list[int]:
    V = stream.codec.initial_vocab_size
    return list(range(V + stream.num_legal_hyper))


# ---------------------------------------------------------------------- reference checkpoints

# What the reference zip2zip package's checkpoints in the interop tests compress with, and where
# their LoRA adapters go (the package and peft are imported where used: both are optional).
REFERENCE_K, REFERENCE_M = 48, 3
REFERENCE_LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "phi3": ["qkv_proj", "o_proj", "gate_up_proj"]}


def reference_encoder_settings(encoder_type: str, width: int, tie: bool, **changes) -> dict:
    if encoder_type == "transformer":
        settings = dict(hidden_size=width, num_heads=4, num_hidden_layers=2, intermediate_size=2 * width)
        settings["position_encoding"] = "learnable"
    elif encoder_type == "attention":
        settings = dict(hidden_size=width, num_heads=4)
    else:
        settings = dict(
            hidden_size=16, model_hidden_size=width, num_heads=2, num_hidden_layers=2, intermediate_size=32
        )
    return {**settings, "tie_encoders": tie, **changes}


def reference_checkpoint(
    folder, base_dir, arch, encoder_type, tie=False, layout="adapter", position_mode="compressed", **changes
):
    """A tiny reference model, its weights perturbed so that every one of them matters, saved by the
    reference package in its layout; returns the reference model (in eval mode)."""
    import peft
    import zip2zip
    from transformers import AutoTokenizer
    from zip2zip.nn.encoders.config import ENCODER_CONFIG_MAPPING

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_tokenizer = AutoTokenizer.from_pretrained(base_dir)
    width = base.config.hidden_size
    config = zip2zip.Zip2ZipConfig(
        format_version=2 if position_mode == "base_token_end" else 1,
        base_model_name_or_path=str(base_dir),
        position_mode=position_mode,
        encoder_type=encoder_type,
        encoder=ENCODER_CONFIG_MAPPING[encoder_type](
            **reference_encoder_settings(encoder_type, width, tie, **changes)
        ),
        compression=zip2zip.CompressionConfig.from_tokenizer(
            base_tokenizer, max_codebook_size=REFERENCE_K, max_subtokens=REFERENCE_M
        ),
    )
    lora = (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=REFERENCE_LORA_TARGETS[arch])
        if layout == "adapter"
        else None
    )
    reference = zip2zip.Zip2ZipModel(config, base_model=base, peft_config=lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            touched = "encoder" in name or "lora_" in name or (layout != "adapter" and "layers.1." in name)
            if touched:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    reference.save_pretrained(folder)
    if layout == "self-contained":  # zip2zip++'s hf export: the decoder, its config and tokenizer inside
        reference.base_model.save_pretrained(folder)
        base_tokenizer.save_pretrained(folder)
        (folder / "zip2zip_encoders.safetensors").rename(folder / "encoders.safetensors")
        edit_reference_config(folder, base_model_name_or_path=".")
    if layout == "full":  # the research layout: the whole decoder beside the encoders
        save_file(
            {k: v.contiguous() for k, v in reference.base_model.state_dict().items()}, folder / "model.safetensors"
        )
    return reference.eval()


def edit_reference_config(folder, **changes):
    """Change settings in a reference checkpoint's ``zip2zip_config.json``: a dict is merged into its
    section, and ``"section.name"`` sets one field of a section."""
    path = folder / "zip2zip_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            config[section][name] = value
        else:
            config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(config))
