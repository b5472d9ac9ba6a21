"""Across transformers releases: the cache under either name, loud errors for what we do not read,
and generation modes we cannot follow yet refused before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin

from utils import V, assert_same_logits, compressed, left_pad
from zip2zip_hf import Zip2ZipCache, Zip2ZipTokenizer
from zip2zip_hf._compat import (
    TRANSFORMERS_VERSION,
    beam_search_reads_vocab_size,
    beam_search_vocab_size,
    check_generation_internals,
    output_cache_field,
)


def step_by_step(model, ids, mask, cache_name: str):
    out = model(input_ids=ids[:, :1], attention_mask=mask[:, :1], use_cache=True)
    logits = [out.logits]
    for t in range(1, ids.shape[1]):
        cache = {cache_name: out[output_cache_field()]}
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True, **cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_cache_under_either_name_continues_the_codebooks(model, cache_name):
    ids, mask = left_pad([compressed(1, 40), compressed(2, 30)])
    with torch.no_grad():
        teacher_forced = model(input_ids=ids, attention_mask=mask).logits
        stepped = step_by_step(model, ids, mask, cache_name)
    assert (ids >= V).any(), "the rows must read hypertokens"
    assert_same_logits(teacher_forced, stepped, mask)


def test_output_holds_the_cache_where_generate_reads_it(model):
    out = model(input_ids=torch.tensor([compressed(1, 20)]), use_cache=True)
    assert isinstance(out[output_cache_field()], Zip2ZipCache)
    assert out.past_key_values is out[output_cache_field()]  # the old name stays readable on every release


def test_cache_passed_twice_raises(model):
    cache = model(input_ids=torch.tensor([[5, 6]]), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="passed twice"):
        model(input_ids=torch.tensor([[7]]), cache=cache, past_key_values=cache)


def test_cache_under_an_unknown_keyword_is_an_error_naming_it(model):
    cache = model(input_ids=torch.tensor([[5, 6]]), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=rf"`kv_cache`.*transformers {TRANSFORMERS_VERSION}"):
        model(input_ids=torch.tensor([[7]]), kv_cache=cache)


def test_legacy_tuple_cache_is_an_error(model):
    legacy = ((torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8)),) * 2
    with pytest.raises(ValueError, match="legacy format"):
        model(input_ids=torch.tensor([[7]]), past_key_values=legacy)
    with pytest.raises(ValueError, match="`old_cache`"):
        model(input_ids=torch.tensor([[7]]), old_cache=legacy)


def test_a_cache_class_we_do_not_know_is_refused_even_when_empty(model):
    class OtherCache(DynamicCache):
        pass

    with pytest.raises(NotImplementedError, match="OtherCache is not supported"):
        model(input_ids=torch.tensor([[5, 6]]), cache=OtherCache(), use_cache=True)


def test_a_plain_cache_with_content_is_refused(model):
    base_cache = model.language_model(input_ids=torch.tensor([[5, 6]]), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="carries no zip2zip codebook state"):
        model(input_ids=torch.tensor([[7]]), cache=base_cache)


# ---------------------------------------------------------------------- generate


def forward_calls(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
        ({"cache_implementation": "quantized"}, "cache_implementation='quantized'"),
        ({"generation_config": GenerationConfig(cache_implementation="offloaded", max_new_tokens=4)}, "'offloaded'"),
    ],
)
def test_unsupported_generation_modes_are_refused_before_any_work(model, kwargs, message):
    calls, handle = forward_calls(model)
    try:
        with pytest.raises(NotImplementedError, match=message):
            model.generate(input_ids=torch.tensor([compressed(1, 20)]), max_new_tokens=4, do_sample=False, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_generate_compares_the_tokenizer_it_is_given(model, tiny_base_tokenizer):
    # The tiny BPE tokenizer has 512 ids; this model's V is 300: ids from it mean other things.
    other = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=64, max_subtokens=3)
    ids = torch.tensor([compressed(1, 20)])
    with pytest.raises(ValueError, match="disagree on compression settings"):
        model.generate(input_ids=ids, max_new_tokens=2, tokenizer=other, stop_strings=["x"])
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        model.generate(input_ids=ids, max_new_tokens=2, tokenizer=tiny_base_tokenizer, stop_strings=["x"])


def test_generate_with_a_matching_tokenizer_writes_what_generate_without_one_writes(text_model, text_tok):
    """A matching tokenizer (and a stop string that never appears) changes nothing: the same base ids,
    the prompt's first, then the three steps' expansions."""
    prompt = "def f(x):\n    return x\n"
    batch = text_tok([prompt], return_tensors="pt")
    out = text_model.generate(**batch, max_new_tokens=3, do_sample=False, tokenizer=text_tok, stop_strings=["@@"])
    plain = text_model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, plain)
    prompt_base_ids = text_tok.base_ids([prompt])[0]
    assert out[0, : len(prompt_base_ids)].tolist() == prompt_base_ids
    assert len(prompt_base_ids) + 3 <= out.shape[1] <= len(prompt_base_ids) + 3 * text_tok.codec.max_subtokens


def test_moved_generation_internals_fail_loudly(model, monkeypatch):
    check_generation_internals()  # the installed release has everything
    monkeypatch.delattr(GenerationMixin, "_get_stopping_criteria")
    with pytest.raises(RuntimeError, match=rf"transformers {TRANSFORMERS_VERSION} changed.*_get_stopping_criteria"):
        check_generation_internals()
    with pytest.raises(RuntimeError, match="_get_stopping_criteria is gone"):
        model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=1)


def test_a_moved_assisted_decoding_loop_fails_loudly(model, monkeypatch):
    """Drafts run in our `_assisted_decoding`, which generate finds by name: a rename must not
    silently send them to a loop that cannot rewind the codebooks."""
    from transformers.generation.configuration_utils import GenerationMode
    from transformers.generation.utils import GENERATION_MODES_MAPPING

    monkeypatch.setitem(GENERATION_MODES_MAPPING, GenerationMode.ASSISTED_GENERATION, "_speculate")
    with pytest.raises(RuntimeError, match="_assisted_decoding"):
        model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=1, prompt_lookup_num_tokens=3)


def _beam_search_reading_the_config(self, log_probs, batch_size, num_beams):
    vocab_size = self.config.get_text_config().vocab_size
    return torch.reshape(log_probs, (batch_size, num_beams * vocab_size))


def _beam_search_reading_the_width(self, log_probs, batch_size, num_beams):
    # the -1 dim is `num_beams * config.vocab_size` only for plain models
    return torch.reshape(log_probs, (batch_size, -1))  # "config.vocab_size" in a string is not read either


@pytest.fixture
def fresh_beam_search_answer():
    beam_search_reads_vocab_size.cache_clear()
    yield
    beam_search_reads_vocab_size.cache_clear()


@pytest.mark.parametrize(
    ("beam_search", "reads"), [(_beam_search_reading_the_config, True), (_beam_search_reading_the_width, False)]
)
def test_beam_search_is_shown_the_logits_width_where_it_reads_the_config(
    monkeypatch, fresh_beam_search_answer, beam_search, reads
):
    """Up to 5.17 beam search reshapes scores with the config's vocab_size, 5.18 on with -1: what the
    installed code does decides, whatever its version number (comments and strings do not count)."""
    monkeypatch.setattr(GenerationMixin, "_beam_search", beam_search)
    assert beam_search_reads_vocab_size() is reads
    config = GenerationConfig()  # any object with a vocab_size will do
    config.vocab_size = 100
    with beam_search_vocab_size(config, 132):
        assert config.vocab_size == (132 if reads else 100)
    assert config.vocab_size == 100
