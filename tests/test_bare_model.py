"""`Zip2ZipModel`, the bare model ``AutoModel`` gives: the causal LM's hidden states without its head,
from the same checkpoint, in-process and as remote code, and through the feature-extraction pipeline."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPast

from utils import compressed, left_pad, run_without_package, tiny_base, wrap
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipModel
from zip2zip_hf._compat import output_cache_field
from zip2zip_hf.modeling_zip2zip import _MODEL_AUTO_MAP


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved_lm(request, tmp_path_factory):
    """A causal LM and its checkpoint folder (GPT-2 names its decoder ``transformer``, Llama ``model``)."""
    model = wrap(tiny_base(request.param))
    folder = tmp_path_factory.mktemp(f"lm-{request.param}")
    model.save_pretrained(folder)
    return model, folder


def last_hidden_states(lm: Zip2ZipForCausalLM, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def test_auto_model_on_a_causal_lm_checkpoint_is_the_bare_model_with_its_weights(saved_lm):
    lm, folder = saved_lm
    bare = AutoModel.from_pretrained(folder)
    assert type(bare) is Zip2ZipModel and type(bare.language_model) is type(lm.language_model.base_model)
    assert not hasattr(bare, "output_hyper_encoder")
    expected = {f"language_model.{k}": v for k, v in lm.language_model.base_model.state_dict().items()}
    expected.update({f"input_hyper_encoder.{k}": v for k, v in lm.input_hyper_encoder.state_dict().items()})
    weights = bare.state_dict()
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_bare_hidden_states_are_the_causal_lms(saved_lm):
    """Batched, left-padded, with hypertokens: the same last hidden states at every real position."""
    lm, folder = saved_lm
    bare = AutoModel.from_pretrained(folder).eval()
    ids, mask = left_pad([compressed(3, 60), compressed(4, 35)])
    with torch.no_grad():
        hidden = bare(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (*ids.shape, lm.config.get_text_config().hidden_size)
    assert int(ids.max()) >= lm.codec.initial_vocab_size  # hypertokens were read
    real = mask.bool()
    torch.testing.assert_close(hidden[real], last_hidden_states(lm, ids, mask)[real], atol=1e-5, rtol=1e-5)


def test_bare_model_cached_steps_equal_one_call(saved_lm):
    _, folder = saved_lm
    bare = AutoModel.from_pretrained(folder).eval()
    ids = torch.tensor([compressed(5, 50)])
    with torch.no_grad():
        whole = bare(input_ids=ids, use_cache=False).last_hidden_state
        out = bare(input_ids=ids[:, :20], use_cache=True)
        steps = [out.last_hidden_state]
        cache = out[output_cache_field(BaseModelOutputWithPast)]
        for t in range(20, ids.shape[1]):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            out = bare(input_ids=ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
            steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_a_bare_checkpoint_round_trips_and_is_not_a_causal_lm(saved_lm, tmp_path):
    _, folder = saved_lm
    bare = AutoModel.from_pretrained(folder)
    bare.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"].items() >= _MODEL_AUTO_MAP.items()
    again = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(bare.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="missing"):  # no head to load: loud, not half-initialised
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bf16_and_device_map(saved_lm):
    lm, folder = saved_lm
    bare = AutoModel.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in bare.parameters()} == {torch.bfloat16}
    ids = torch.tensor([compressed(6, 30)])
    with torch.no_grad():
        hidden = bare(input_ids=ids).last_hidden_state.float()
    torch.testing.assert_close(hidden, last_hidden_states(lm, ids), atol=0.1, rtol=0.1)


def test_a_checkpoint_saved_before_the_bare_model_still_loads(saved_lm, tmp_path):
    """Its config.json lists only AutoConfig and AutoModelForCausalLM: both load in-process."""
    lm, folder = saved_lm
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"].pop("AutoModel")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is Zip2ZipForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is Zip2ZipModel


@pytest.mark.slow
def test_auto_model_and_feature_extraction_without_the_package(text_model, text_tok, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    text_model.save_pretrained(checkpoint)
    text_tok.save_pretrained(checkpoint)
    text = "def area(width, height):\n    return width * height\n" * 2
    ids = text_tok(text, return_tensors="pt")["input_ids"]
    save_file({"hidden": last_hidden_states(text_model, ids).contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, pipeline
        expected = load_file({str(tmp_path / "expected.safetensors")!r})["hidden"][0]
        model = AutoModel.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__name__ == "Zip2ZipModel" and "transformers_modules" in type(model).__module__
        extract = pipeline("feature-extraction", model={str(checkpoint)!r}, trust_remote_code=True)
        features = torch.tensor(extract({text!r})[0])
        assert features.shape == expected.shape, (features.shape, expected.shape)
        torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
        print("ok")
        """
    )
    assert run_without_package(script) == "ok"
    # and in-process: one vector per compressed position
    features = pipeline("feature-extraction", model=str(checkpoint))(text)
    assert len(features[0]) == ids.shape[1] < len(text_tok.base_ids([text])[0])


@pytest.mark.parametrize("on_device", [False, True], ids=["python-streams", "device-codebooks"])
def test_the_bare_models_cache_moves_its_rows_like_the_lms(on_device):
    """Beam search and num_return_sequences select cache rows; the bare model's state has no output
    table to move (and allocates none on the device). Prompt, one step, rows swapped, one more
    step: the same as running the swapped rows from the start."""
    lm = wrap(tiny_base("llama"))
    bare = lm.bare_model().eval()
    bare.codebooks_on_device = on_device
    ids, mask = left_pad([compressed(3, 40), compressed(4, 30)])

    def run(order, swap_before_last=False):
        with torch.no_grad():
            out = bare(input_ids=ids[order, :-2], attention_mask=mask[order, :-2], use_cache=True)
            cache = getattr(out, output_cache_field(type(out)))
            bare(input_ids=ids[order, -2:-1], attention_mask=mask[order, :-1], **{output_cache_field(): cache})
            if swap_before_last:
                cache.reorder_cache(torch.tensor([1, 0]))
                order = order[::-1]
            last = bare(input_ids=ids[order, -1:], attention_mask=mask[order], **{output_cache_field(): cache})
        assert cache.hyper_state.output_table is None
        return last.last_hidden_state

    torch.testing.assert_close(run([0, 1], swap_before_last=True), run([1, 0]))


def test_the_bare_view_of_a_causal_lm_shares_its_weights_and_reads_as_it_does():
    """`bare_model` shares the LM's decoder and input encoder (no fresh encoder): the same parameter
    objects, the LM's hidden states, and a change to one is a change to the other."""
    lm = wrap(tiny_base("llama")).eval()
    bare = lm.bare_model()
    assert type(bare) is Zip2ZipModel and not bare.training
    assert bare.input_hyper_encoder is lm.input_hyper_encoder and bare.language_model is lm.get_decoder()
    lm_parameters = {id(p) for p in lm.parameters()}
    assert all(id(p) in lm_parameters for p in bare.parameters())
    ids, mask = left_pad([compressed(3, 50), compressed(4, 30)])
    real = mask.bool()
    with torch.no_grad():
        hidden = bare(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(hidden[real], last_hidden_states(lm, ids, mask)[real])
        next(lm.input_hyper_encoder.parameters()).add_(1.0)
        moved = bare(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(moved[real], hidden[real])


def test_get_decoder_is_the_base_decoder_and_says_so():
    """transformers' meaning: the base model's decoder, which reads base ids only (`bare_model` reads
    compressed ids)."""
    lm = wrap(tiny_base("llama"))
    assert lm.get_decoder() is lm.language_model.base_model
    assert "bare_model" in type(lm).get_decoder.__doc__
