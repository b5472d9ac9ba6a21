"""Loading a saved checkpoint that does not match itself, or one over a base whose head is not
``lm_head``, and generation settings that contradict each other: an error naming what is wrong, or
the right model, never transformers' generic report or a raw safetensors error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, BioGptConfig, GPTNeoXConfig

from utils import V, compressed, left_pad, wrap
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipModel


def _tiny(config_class, **settings):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,  # the head is saved under its own name
        **settings,
    )
    return AutoModelForCausalLM.from_config(config).eval()


# GPT-NeoX saves its head as ``embed_out`` (the module is ``lm_head`` from transformers 5 on), BioGPT
# as ``output_projection``.
HEADLESS_NAMES = {"gpt_neox": "embed_out", "biogpt": "output_projection"}


@pytest.fixture(scope="module", params=["gpt_neox", "biogpt"])
def saved_lm_with_another_head(request, tmp_path_factory):
    base = _tiny(GPTNeoXConfig) if request.param == "gpt_neox" else _tiny(BioGptConfig)
    model = wrap(base)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    head = HEADLESS_NAMES[request.param]
    assert f"language_model.{head}.weight" in load_file(folder / "model.safetensors")
    return model, folder


def test_auto_model_loads_a_checkpoint_whose_base_head_is_not_lm_head(saved_lm_with_another_head):
    lm, folder = saved_lm_with_another_head
    bare = AutoModel.from_pretrained(folder).eval()
    assert type(bare) is Zip2ZipModel
    ids, mask = left_pad([compressed(3, 50), compressed(4, 30)])
    with torch.no_grad():  # the LM's base logits are its head over the bare model's hidden states
        base_logits = lm.get_output_embeddings()(bare(input_ids=ids, attention_mask=mask).last_hidden_state)
        expected = lm(input_ids=ids, attention_mask=mask).logits[..., :V]
    scored = mask.bool()[..., None] & expected.isfinite()  # the LM rules out the ids that are not canonical
    assert scored.sum() > 0.99 * mask.sum() * V
    torch.testing.assert_close(base_logits[scored], expected[scored], atol=1e-5, rtol=1e-5)


def test_the_bare_model_ignores_only_the_head(saved_lm_with_another_head, tmp_path):
    """A weight that is neither the decoder's nor the head's is still refused by name."""
    _, folder = saved_lm_with_another_head
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    state = load_file(tmp_path / "model.safetensors")
    state["language_model.stray.weight"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected: language_model.stray.weight"):
        AutoModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("lm")
    model.save_pretrained(folder)
    return folder


def _copy(folder, to):
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize("loader", [Zip2ZipForCausalLM, AutoModelForCausalLM, AutoModel])
def test_a_max_subtokens_other_than_the_weights_is_named(saved_lm, tmp_path, loader):
    folder = _copy(saved_lm, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["max_subtokens"] == 3
    config["max_subtokens"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"input_hyper_encoder\.position_embedding.*max_subtokens.* 4 in config\.json"
    ):
        loader.from_pretrained(folder)


@pytest.mark.parametrize("size", ["empty", "header", "half"])
@pytest.mark.parametrize("loader", [Zip2ZipForCausalLM, AutoModelForCausalLM, AutoModel])
def test_a_truncated_weights_file_is_named(saved_lm, tmp_path, size, loader):
    folder = _copy(saved_lm, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "header": data[:20], "half": data[: len(data) // 2]}[size])
    with pytest.raises(OSError, match=r"model\.safetensors is not a complete safetensors file"):
        loader.from_pretrained(folder)


# ---------------------------------------------------------------------- generation settings


@pytest.mark.parametrize(
    "drafts, named",
    [
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3"),
        ("assistant", "assistant_model="),
    ],
)
def test_speculative_decoding_with_beams_is_refused_naming_both(model, drafts, named):
    """transformers would run beam search and drop the drafts, saying so only in a log line."""
    if drafts == "assistant":
        drafts = dict(assistant_model=model.language_model)
    ids = torch.tensor([compressed(3, 20)])
    with pytest.raises(ValueError, match=rf"{named}.*num_beams=2"):
        model.generate(input_ids=ids, max_new_tokens=4, num_beams=2, do_sample=False, **drafts)
