"""Speculative decoding (prompt lookup, a draft model) writes exactly what one step at a time writes.

The oracle is plain decoding of the same model: the same compressed ids, codebooks, scores, streamed
text and stopping point, in fewer forward calls when the drafts are right. Forced decoding makes the
model write a known text that repeats its prompt, so that drafts are right and get accepted.
"""

from __future__ import annotations

import pytest
import torch

from utils import CODE_CONTINUATION, CODE_PROMPT, PAD, V, compressed, forced_text_generation, tiny_base


# The continuation copies most of its prompt, with a change in the middle: what editing a file is.
PROMPT = CODE_PROMPT + CODE_CONTINUATION
EDIT = CODE_PROMPT + CODE_CONTINUATION.replace("volume", "cuboid_volume")


@pytest.fixture(scope="module")
def assistant():
    return tiny_base("qwen2")


def forward_calls(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda *_: calls.append(1))


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 24)
    return model.generate(
        input_ids=ids, do_sample=False, pad_token_id=PAD, eos_token_id=None, return_hypertokens=True, **kwargs
    )


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("seed", [3, 4])
def test_prompt_lookup_writes_what_greedy_writes(model, on_device, cache_implementation, seed, monkeypatch):
    monkeypatch.setattr(model, "codebooks_on_device", on_device)
    ids = torch.tensor([compressed(seed, 90)])
    expected = generate(model, ids, cache_implementation=cache_implementation)
    got = generate(model, ids, cache_implementation=cache_implementation, prompt_lookup_num_tokens=5)
    assert torch.equal(got, expected)


def test_a_draft_model_writes_what_greedy_writes(model, assistant):
    ids = torch.tensor([compressed(5, 70)])
    expected = generate(model, ids, return_dict_in_generate=True, output_scores=True)
    got = generate(model, ids, return_dict_in_generate=True, output_scores=True, assistant_model=assistant)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.codebooks == expected.codebooks
    assert len(got.scores) == len(expected.scores) == 24
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def forced(text_model, text_tok, **kwargs):
    return forced_text_generation(text_model, text_tok, PROMPT, EDIT, **kwargs)


@pytest.mark.parametrize("drafts", [{"prompt_lookup_num_tokens": 8}, {"assistant_model": "knows the text"}])
def test_right_drafts_are_accepted_and_save_forward_calls(text_model, text_tok, drafts):
    if "assistant_model" in drafts:
        drafts = {"assistant_model": KnowsTheText(text_model, text_tok)}
    calls, handle = forward_calls(text_model)
    try:
        inputs, plain, _ = forced(text_model, text_tok, return_hypertokens=True)
        steps = len(calls)
        calls.clear()
        _, fast, _ = forced(text_model, text_tok, return_hypertokens=True, **drafts)
    finally:
        handle.remove()
    assert torch.equal(fast, plain)
    assert text_tok.decode(fast[0]) == PROMPT + EDIT
    assert len(calls) < steps / 3, f"{len(calls)} forward calls for {steps} steps"


class KnowsTheText(torch.nn.Module):
    """A stand-in draft model over base ids that always proposes the next base id of the known text."""

    def __init__(self, text_model, text_tok):
        super().__init__()
        self.embed = torch.nn.Embedding(text_tok.initial_vocab_size, 1)
        self.text = text_tok.base_ids([PROMPT + EDIT])[0]
        self.config = text_model.config.get_text_config()

    def get_input_embeddings(self):
        return self.embed

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, cache=None, past_key_values=None, use_cache=True):
        cache = cache if cache is not None else past_key_values
        length = int(cache.get_seq_length()) + input_ids.shape[1]
        # Grow the cache by the ids read, as a real model's would.
        for layer in range(len(cache.layers)):
            kv = torch.zeros(1, 1, input_ids.shape[1], 2)
            cache.update(kv, kv, layer)
        next_id = self.text[length] if length < len(self.text) else 0
        logits = torch.full((1, input_ids.shape[1], self.embed.num_embeddings), -1.0)
        logits[0, -1, next_id] = 1.0
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("drafts", [{}, {"prompt_lookup_num_tokens": 8}])
def test_stop_strings_and_eos_end_the_text_where_one_step_at_a_time_does(text_model, text_tok, drafts):
    for kwargs in ({"stop_strings": ["cuboid"], "tokenizer": text_tok}, {"eos": True}):
        plain = forced(text_model, text_tok, **kwargs)[1]
        fast = forced(text_model, text_tok, **kwargs, **drafts)[1]
        assert torch.equal(fast, plain)
    stopped = text_tok.decode(
        forced(text_model, text_tok, stop_strings=["cuboid"], tokenizer=text_tok, **drafts)[1][0]
    )
    assert "cuboid" in stopped and len(stopped) < len(PROMPT + EDIT)


def test_streamers_receive_the_text(text_model, text_tok, capsys):
    from transformers import TextStreamer

    capsys.readouterr()
    streamer = TextStreamer(text_tok, skip_prompt=True, skip_special_tokens=True)
    forced(text_model, text_tok, streamer=streamer, prompt_lookup_num_tokens=8)
    assert capsys.readouterr().out == EDIT + "\n"


def test_sampling_accepts_what_the_model_samples(text_model, text_tok):
    """Forced scores leave one id possible, so sampling must write the forced text too."""
    plain = forced(text_model, text_tok, return_hypertokens=True)[1]
    torch.manual_seed(0)
    sampled = forced(text_model, text_tok, return_hypertokens=True, prompt_lookup_num_tokens=8, do_sample=True)[1]
    assert torch.equal(sampled, plain)


def test_a_draft_model_with_another_tokenizer_is_refused(model, assistant, tiny_base_tokenizer):
    ids = torch.tensor([compressed(1, 20)])
    with pytest.raises(NotImplementedError, match="share the base tokenizer"):
        generate(model, ids, assistant_model=assistant, assistant_tokenizer=tiny_base_tokenizer, tokenizer=None)


def test_a_draft_model_needs_rows_for_the_base_ids_only(model):
    """Any model over the same tokenizer drafts, whatever rows it has past V; one with fewer rows is
    refused, naming what is required."""
    ids = torch.tensor([compressed(1, 20)])
    with pytest.raises(ValueError, match=f"the assistant model reads {V - 10} ids but the base vocabulary V is {V}"):
        generate(model, ids, assistant_model=tiny_base("llama", rows=V - 10))
    assert torch.equal(generate(model, ids, assistant_model=tiny_base("qwen2", rows=V + 100)), generate(model, ids))


def test_several_rows_are_refused_as_transformers_does(model):
    ids = torch.tensor([compressed(1, 20), compressed(1, 20)])
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, ids, prompt_lookup_num_tokens=4)


def test_prompt_lookup_continues_a_cache_handed_to_generate(model):
    from zip2zip_hf._compat import output_cache_field

    ids = torch.tensor([compressed(6, 80)])

    def prefilled():
        with torch.no_grad():
            return model(input_ids=ids[:, :-1], use_cache=True).past_key_values

    expected = generate(model, ids, **{output_cache_field(): prefilled()})
    got = generate(model, ids, prompt_lookup_num_tokens=5, **{output_cache_field(): prefilled()})
    assert torch.equal(got, expected)
    assert torch.equal(expected, generate(model, ids))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"prompt_lookup_num_tokens": 2.5}, "prompt_lookup_num_tokens"),
        ({"prompt_lookup_num_tokens": -1}, "prompt_lookup_num_tokens"),
        ({"prompt_lookup_num_tokens": 4, "max_matching_ngram_size": 0}, "max_matching_ngram_size"),
        ({"assistant_model": "tiny", "num_assistant_tokens": 1.5}, "num_assistant_tokens"),
    ],
)
def test_bad_draft_settings_are_errors_naming_them_before_any_forward(model, assistant, kwargs, name):
    kwargs = {**kwargs, **({"assistant_model": assistant} if "assistant_model" in kwargs else {})}
    calls, handle = forward_calls(model)
    try:
        with pytest.raises(ValueError, match=name):
            generate(model, torch.tensor([compressed(1, 20)]), **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_a_draft_model_drafts_within_the_budget_and_its_positions(model):
    """As transformers' assisted decoding: never more drafted ids than the budget has codes left, and
    never past the draft model's positions (then no draft: plain steps)."""
    from transformers import AutoModelForCausalLM

    from utils import tiny_causal_lm_config

    ids = torch.tensor([compressed(6, 60)])
    base_length = len(model.codec.decode(ids[0].tolist())[0])
    for positions, max_new_tokens in ((512, 3), (base_length + 30, 40)):
        torch.manual_seed(0)
        draft = AutoModelForCausalLM.from_config(tiny_causal_lm_config("gpt2", V, positions=positions)).eval()
        calls, handle = forward_calls(draft)
        try:
            got = generate(model, ids, assistant_model=draft, num_assistant_tokens=100, max_new_tokens=max_new_tokens)
        finally:
            handle.remove()
        assert torch.equal(got, generate(model, ids, max_new_tokens=max_new_tokens))
        if max_new_tokens == 3:
            assert len(calls) <= 3 + 2 + 1  # at most the codes left, per iteration


@pytest.mark.parametrize("drafter", ["prompt_lookup", "assistant"])
def test_an_error_while_verifying_drafts_leaves_the_cache_as_it_was(model, assistant, drafter):
    """Verification is accepted or rolled back, as a forward is: a logits processor that raises
    leaves the caller's cache without the drafts, and the cache then continues as plain decoding."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from zip2zip_hf._compat import output_cache_field

    class RaiseOnThirdCall(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("processor failed")
            return scores

    ids = torch.tensor([compressed(6, 80)])
    drafts = {"prompt_lookup_num_tokens": 5} if drafter == "prompt_lookup" else {"assistant_model": assistant}
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
    held = cache.get_seq_length()
    with pytest.raises(RuntimeError, match="processor failed"):
        generate(
            model,
            ids,
            logits_processor=LogitsProcessorList([RaiseOnThirdCall()]),
            **drafts,
            **{output_cache_field(): cache},
        )
    assert cache.get_seq_length() == cache.hyper_state.num_positions == held
    assert torch.equal(generate(model, ids, **drafts, **{output_cache_field(): cache}), generate(model, ids))


@pytest.mark.parametrize("drafts", [{"prompt_lookup_num_tokens": 4}, {"assistant_model": "tiny"}])
def test_a_prompt_without_text_is_treated_as_plain_decoding_treats_it(model, assistant, drafts):
    """No text to draft from: an all-padding prompt is continued as plain decoding continues it, and
    an empty one is the same clear error."""
    drafts = {key: assistant if value == "tiny" else value for key, value in drafts.items()}
    padding = torch.full((1, 4), PAD)
    plain = generate(model, padding, attention_mask=torch.zeros_like(padding))
    assert torch.equal(generate(model, padding, attention_mask=torch.zeros_like(padding), **drafts), plain)
    empty = torch.zeros(1, 0, dtype=torch.long)
    for kwargs in ({}, drafts):
        with pytest.raises(ValueError, match=r"input_ids must be a non-empty \(batch, length\) tensor"):
            generate(model, empty, **kwargs)


@pytest.mark.parametrize("drafts", [{"prompt_lookup_num_tokens": 8}, {"assistant_model": "knows the text"}])
def test_drafts_near_the_last_position_write_what_plain_decoding_writes(text_model, text_tok, drafts, monkeypatch):
    """Where the model's positions end inside the text the drafts get right, speculative decoding
    stops exactly where plain decoding stops (`PositionLimit`), never asking for a position past the
    last: each draft is cut to what the positions left hold."""
    if "assistant_model" in drafts:
        drafts = {"assistant_model": KnowsTheText(text_model, text_tok)}
    prompt_positions = len(text_tok.base_ids([PROMPT])[0])
    text_config = text_model.config.get_text_config()
    for room in (3, 17, 40, 41, 42, 43, 61):
        monkeypatch.setattr(text_config, "max_position_embeddings", prompt_positions + room)
        plain = forced(text_model, text_tok)[1]
        fast = forced(text_model, text_tok, **drafts)[1]
        assert torch.equal(fast, plain), room
        # generate returns base ids: the text ends within the positions (its last id, never fed, aside)
        assert plain.shape[1] <= prompt_positions + room + text_tok.codec.max_subtokens
