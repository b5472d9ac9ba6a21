"""Generation never runs past the base model's positions: a step counts one, but in
``position_mode="base"`` it may take up to M positions, so `generate` stops a row before its next id
could need a position the base model does not have."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from utils import PAD, V, compressed, left_pad, tiny_causal_lm_config, wrap


POSITIONS = 64


class PrefersHypertokens(LogitsProcessor):
    """Pushes every legal hyper id up, so rows write hypertokens (several positions a step)."""

    def __call__(self, input_ids, scores):
        hyper = scores[:, V:]
        return torch.cat([scores[:, :V], torch.where(torch.isfinite(hyper), hyper + 50.0, hyper)], dim=1)


def positions_model(position_mode: str, on_device: bool):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_causal_lm_config("gpt2", V, positions=POSITIONS)).eval()
    return wrap(base, position_mode=position_mode, on_device=on_device)


def base_length(model, prompt: list[int], written: list[int]) -> int:
    stream = model.codec.stream()
    stream.feed(prompt)
    stream.feed(written)
    return stream.num_base_ids


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_stops_before_the_positions_run_out(on_device, cache_implementation):
    """A 64-position GPT-2 base (an absolute position table: one position too many is an
    IndexError), a 30-position prompt and 40 steps that write hypertokens."""
    model = positions_model("base", on_device)
    ids, mask = left_pad([compressed(3, 30), compressed(4, 22)])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=40,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([PrefersHypertokens()]),
        return_hypertokens=True,
        cache_implementation=cache_implementation,
    )
    written = out[:, ids.shape[1] :]
    assert (written >= V).any(), "the rows must write hypertokens"
    assert written.shape[1] < 40, "generation should stop on positions, before max_new_tokens"
    for row, (prompt_ids, prompt_mask) in enumerate(zip(ids.tolist(), mask.tolist())):
        prompt = [i for i, keep in zip(prompt_ids, prompt_mask) if keep]
        fed = [i for i in written[row].tolist()[:-1] if i != PAD]  # the last id written is never fed
        assert base_length(model, prompt, fed) <= POSITIONS


def test_compressed_positions_count_one_per_id():
    model = positions_model("compressed", on_device=False)
    ids = torch.tensor([compressed(3, 60)])
    out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert out.shape[1] > ids.shape[1]
    written = model.generate(
        input_ids=ids, max_new_tokens=40, do_sample=False, pad_token_id=PAD, eos_token_id=None, return_hypertokens=True
    )
    assert written.shape[1] == POSITIONS + 1  # every position fed, and the last id written


def test_a_prompt_past_the_positions_is_an_error_naming_them():
    model = positions_model("base", on_device=False)
    prompt = compressed(5, 80)  # more base ids than the model has positions
    with pytest.raises(ValueError, match=f"input_ids\\[0, \\d+\\]: it needs a position .* has {POSITIONS} positions"):
        model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, pad_token_id=PAD)


def test_a_decoding_step_past_the_positions_is_an_error_that_changes_nothing():
    """On the device the step records the overflow (no host sync, and the position it reads is
    clamped into the table) and a user's forward raises it before returning, rolled back."""
    model = positions_model("base", on_device=True)
    prompt = compressed(6, 40)
    stream = model.codec.stream()
    stream.feed(prompt)
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values
        for _ in range(POSITIONS - stream.num_base_ids):  # one base id, one position each
            cache = model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True).past_key_values
        held = int(cache.get_seq_length())
        with pytest.raises(ValueError, match=r"input_ids\[0, 0\]: it needs a position past the base model's last"):
            model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    assert int(cache.get_seq_length()) == held
    assert int(cache.hyper_state.positions_held("base")[0]) == POSITIONS


@pytest.mark.slow  # starts a server
def test_a_served_request_that_fills_the_positions_ends_with_length(text_tok):
    """The server admits ``max_tokens`` up to the positions the prompt leaves, counting one per step;
    a request whose steps write hypertokens (several positions each) then ends on positions: no
    error, and the finish reason is ``length``."""
    pytest.importorskip("fastapi")
    # Serving runs on transformers 5.24 and newer (tests/test_serving.py checks it loads there).
    pytest.importorskip("zip2zip_hf.serving.server", reason="no serving on this release", exc_type=ImportError)
    from transformers import GenerationConfig

    from zip2zip_hf import Zip2ZipForCausalLM
    from zip2zip_hf.serving.server import _fit_to_context, _run_request

    torch.manual_seed(0)
    config = tiny_causal_lm_config("gpt2", len(text_tok), positions=POSITIONS, eos_token_id=text_tok.eos_token_id)
    model = Zip2ZipForCausalLM.from_base(AutoModelForCausalLM.from_config(config).eval(), text_tok).eval()
    inputs = text_tok(["abc abc abc abc abc abc abc abc "], return_tensors="pt")
    hyper = range(model.codec.initial_vocab_size, model.codec.total_vocab_size)
    gen_config = GenerationConfig(
        do_sample=False,
        eos_token_id=None,
        pad_token_id=text_tok.pad_token_id,
        sequence_bias={(code,): 50.0 for code in hyper},  # write hypertokens wherever one is legal
    )
    request = _fit_to_context(model.config, model.codec, inputs, gen_config)  # max_new_tokens: all that fit
    base_ids, outcome = _run_request(model, text_tok, inputs, gen_config, request)
    assert outcome.usage.completion_ids < gen_config.max_new_tokens, "the positions should end it first"
    assert outcome.usage.completion_tokens > outcome.usage.completion_ids, "it must write hypertokens"
    assert outcome.finish_reason == "length"
