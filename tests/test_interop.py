"""Checkpoints of the reference zip2zip package: the package itself (0.2.0, installed without its
dependencies) builds tiny models of every encoder type on tiny Llama and Phi-3 bases, saves them in
its layouts, and is the oracle: the converted model gives the same logits for the same ids, with and
without a cache, and the same greedy ids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils import REFERENCE_K as K
from utils import REFERENCE_M as M
from utils import edit_reference_config, reference_checkpoint, run_without_package, save_tiny_base_model
from zip2zip_hf import Zip2ZipForCausalLM
from zip2zip_hf.interop import from_reference
from zip2zip_hf.tools.cli import main


zip2zip = pytest.importorskip("zip2zip", reason="the reference zip2zip package (make setup installs it)")
peft = pytest.importorskip("peft")

TEXT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n" * 2


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    return {arch: save_tiny_base_model(tmp_path_factory.mktemp(arch), arch=arch) for arch in ("llama", "phi3")}


def logits_of(model, ids: torch.Tensor, step_by_step: bool = False) -> torch.Tensor:
    """A model's logits for ``ids``: in one forward, or one id at a time through the cache."""
    reference = hasattr(model, "codebook_manager")  # it keeps one sequence's codebooks on the model
    if reference:
        model.codebook_manager.reset()
    with torch.no_grad():
        if not step_by_step:  # (the reference's base_token_end positions go wrong with use_cache=False)
            return model(input_ids=ids).logits if reference else model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :1], use_cache=True)
        logits = [out.logits]
        for t in range(1, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, dim=1)


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, installed: torch.Tensor, V: int):
    """Base logits equal everywhere, hyper logits equal for every entry ``installed`` by then.

    Ours are finite exactly for the entries installed so far plus, at some positions, the provisional
    one (the entry the next id would create, scored from its contents). Theirs, in one forward over
    a block, are finite for every entry the block installs, later ones too, and score the slot of
    the provisional entry with what the next id actually installs there; step by step, for the
    entries installed so far.
    """
    theirs = theirs[..., : ours.shape[-1]]
    torch.testing.assert_close(ours[..., :V], theirs[..., :V], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[..., V:][installed], theirs[..., V:][installed], atol=1e-5, rtol=1e-5)
    legal = torch.isfinite(ours[..., V:])
    assert not (installed & ~legal).any() and (legal & ~installed).sum(-1).max() <= 1


CASES = [
    ("llama", "transformer", False, "adapter", "compressed", {}),
    ("llama", "transformer", True, "full", "compressed", {"position_encoding": None}),
    ("phi3", "transformer", False, "adapter", "base_token_end", {}),
    ("llama", "res_latent_attn", False, "adapter", "base_token_end", {}),
    ("phi3", "res_latent_attn", True, "full", "compressed", {"causal": True}),
    ("llama", "res_latent_attn", True, "adapter", "compressed", {"residual": False, "hidden_size": 32}),
    ("llama", "res_latent_attn", True, "self-contained", "base_token_end", {}),
]


@pytest.mark.parametrize("arch, encoder_type, tie, layout, position_mode, changes", CASES)
def test_a_converted_checkpoint_gives_the_reference_logits(
    tmp_path, base_dirs, arch, encoder_type, tie, layout, position_mode, changes
):
    reference = reference_checkpoint(
        tmp_path / "ref", base_dirs[arch], arch, encoder_type, tie, layout, position_mode, **changes
    )
    model, tokenizer = from_reference(tmp_path / "ref")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    V = tokenizer.initial_vocab_size
    assert (ids >= V).sum() >= 5  # the text compresses: hypertokens are read and scored
    theirs_step_by_step = logits_of(reference, ids, step_by_step=True)
    installed = torch.isfinite(theirs_step_by_step[..., V : V + K])
    assert installed.sum() >= 20  # hypertokens are scored, not only read
    assert_same_logits(logits_of(model, ids), logits_of(reference, ids), installed, V)
    assert_same_logits(logits_of(model, ids, step_by_step=True), theirs_step_by_step, installed, V)

    prompt = ids[:, :12]
    reference.codebook_manager.reset()
    theirs = reference.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )
    ours = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, return_hypertokens=True)
    assert ours.tolist() == theirs.tolist()


def test_the_attention_encoder_computes_what_the_reference_module_computes(base_dirs):
    """The reference's own model cannot run its attention encoder (0.2.0 unpacks a (B, H, S) codebook
    as (H, S)); its module, called as it expects, is the oracle."""
    from zip2zip.nn.encoders.attention import AttentionEncoder
    from zip2zip.nn.encoders.config import AttentionEncoderConfig

    from zip2zip_hf.reference_hyper_encoders import build_reference_encoder

    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_heads=4)
    compression = zip2zip.CompressionConfig(
        initial_vocab_size=100, max_codebook_size=K, max_subtokens=M, disabled_ids=[0]
    )
    theirs = AttentionEncoder(AttentionEncoderConfig(**settings), compression)
    ours = build_reference_encoder({**settings, "encoder_type": "attention", "pad_token_id": 0}, M)
    ours.load_state_dict(theirs.state_dict())
    embeddings = torch.randn(100, 32)
    subtokens = torch.tensor([[5, 6, 7], [8, 9, 0], [3, 4, 0]])
    lengths = torch.tensor([3, 2, 2])
    torch.testing.assert_close(
        ours(subtokens, lengths, embeddings), theirs(subtokens, embeddings, 0), atol=1e-6, rtol=1e-6
    )


def test_a_converted_checkpoint_loads_anywhere_and_generates(tmp_path, base_dirs):
    reference_checkpoint(tmp_path / "ref", base_dirs["llama"], "llama", "transformer")
    assert main(["convert", str(tmp_path / "ref"), str(tmp_path / "ours")]) == 0
    assert main(["convert", str(tmp_path / "ref"), str(tmp_path / "ours")]) == 2  # nothing is overwritten
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "again")]) == 2  # ours is not theirs
    model, tokenizer = from_reference(tmp_path / "ref")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    expected = logits_of(model, ids)
    loaded = Zip2ZipForCausalLM.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(logits_of(loaded, ids), expected)
    prompt = ids[:, :20]
    greedy = loaded.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, return_hypertokens=True)
    for mode in (dict(prompt_lookup_num_tokens=3), dict(num_beams=1, cache_implementation="static")):
        again = loaded.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, return_hypertokens=True, **mode)
        assert again.tolist() == greedy.tolist(), mode
    beams = loaded.generate(input_ids=prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    sampled = loaded.generate(input_ids=prompt, max_new_tokens=6, do_sample=True, top_k=5)
    assert beams.shape[0] == 2 and sampled.shape[0] == 1
    script = f"""
import json
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline
tok = AutoTokenizer.from_pretrained({str(tmp_path / "ours")!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ours")!r}, trust_remote_code=True)
bare = AutoModel.from_pretrained({str(tmp_path / "ours")!r}, trust_remote_code=True)
generator = pipeline("text-generation", model=model, tokenizer=tok)
print(json.dumps(dict(
    logits=model(input_ids=torch.tensor({ids.tolist()})).logits[0, -1, :5].tolist(),
    bare=type(bare).__name__,
    text=generator("def add(", max_new_tokens=4)[0]["generated_text"],
)))
"""
    loaded_elsewhere = json.loads(run_without_package(script))
    torch.testing.assert_close(torch.tensor(loaded_elsewhere["logits"]), expected[0, -1, :5], atol=1e-5, rtol=1e-5)
    assert loaded_elsewhere["bare"] == "Zip2ZipModel" and loaded_elsewhere["text"].startswith("def add(")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda folder: (folder / "zip2zip_config.json").unlink(), "no zip2zip_config.json"),
        (lambda folder: edit_reference_config(folder, encoder_type="lstm"), "encoder_type 'lstm'"),
        (lambda folder: edit_reference_config(folder, compression={"max_subtokens": 4}), "has 3 positions but"),
        (
            lambda folder: edit_reference_config(folder, compression={"initial_vocab_size": 600}),
            "initial_vocab_size is 600",
        ),
        (
            lambda folder: _drop_encoder_key(folder, "input_encoder.layers.1.mlp.fc1.weight"),
            "missing input_encoder.layers.1.mlp.fc1.weight",
        ),
        (lambda folder: _drop_encoder_key(folder, None), "no hyper-encoder weights"),
        (lambda folder: edit_reference_config(folder, encoder={"tie_encoders": True}), "says the encoders are tied"),
        (lambda folder: edit_reference_config(folder, encoder={"hidden_size": 48}), "encoder.hidden_size is 48"),
        (
            lambda folder: _edit_decoder(folder, "model.norm.weight", torch.ones(7)),
            r"model.norm.weight has shape \(7,\)",
        ),
        (
            lambda folder: _edit_decoder(folder, "model.layers.9.mlp.up_proj.weight", torch.ones(2)),
            "unexpected model.layers.9",
        ),
        (
            lambda folder: _edit_decoder(folder, "model.layers.1.mlp.up_proj.weight", None),
            "missing model.layers.1.mlp.up",
        ),
    ],
)
def test_what_does_not_match_is_an_error_naming_the_file_and_key(tmp_path, base_dirs, breakage, message):
    reference_checkpoint(tmp_path, base_dirs["llama"], "llama", "transformer", layout="full")
    breakage(tmp_path)
    with pytest.raises(ValueError, match=message):
        from_reference(tmp_path)


def _edit_decoder(folder, key, value):
    path = folder / "model.safetensors"
    state = load_file(path)
    if value is None:
        del state[key]
    else:
        state[key] = value
    save_file(state, path)


def _drop_encoder_key(folder, key):
    path = folder / "zip2zip_encoders.safetensors"
    if key is None:
        path.unlink()
        return
    state = load_file(path)
    del state[key]
    save_file(state, path)
