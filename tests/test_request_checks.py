"""The server's request checks without a server (`zip2zip_hf.serving.request_checks`): each field a
handler reads is refused by name when the server cannot honour it, and a good request passes."""

from __future__ import annotations

import pytest

from zip2zip_hf.serving.request_checks import BadRequest, check_messages, check_request, sampling_requested


GOOD = {
    "prompt": "def f(x):\n",
    "max_tokens": 8,
    "seed": 7,
    "temperature": 0.7,
    "top_p": 0.9,
    "frequency_penalty": 0.5,
    "stop": ["\n\n", "def "],
    "logit_bias": {},
    "generation_config": '{"top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 5}',
}


def test_a_good_request_passes():
    check_request(GOOD)
    check_request({"prompt": "x"})  # nothing but the prompt
    check_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    )
    check_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])


@pytest.mark.parametrize(
    "change, named",
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_completion_tokens": True}, "max_completion_tokens must be an int"),
        ({"seed": 2**64}, "seed must be <="),
        ({"seed": "7"}, "seed must be an int"),
        ({"temperature": -0.1}, "temperature must be a finite number in [0.0, inf)"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p must be a finite number in (0.0, 1.0]"),
        ({"frequency_penalty": -1}, "frequency_penalty must be a finite number in (-1.0, 2.0]"),
        ({"stop": ""}, "stop must be a non-empty string or a list of them"),
        ({"stop": ["a", None]}, "stop must be"),
        ({"logit_bias": {"1": 5}}, "logit_bias={'1': 5} is not supported"),
        ({"n": 2}, "n=2 is not supported"),
        ({"generation_config": "{"}, "generation_config is not valid JSON"),
        ({"generation_config": "3"}, "generation_config must hold a JSON object, got int"),
        ({"generation_config": '{"trust_remote_code": true}'}, "generation_config cannot set trust_remote_code"),
        ({"generation_config": '{"warp_speed": 9}'}, "GenerationConfig does not know: ['warp_speed']"),
        ({"generation_config": '{"num_beams": 0}'}, "generation_config.num_beams must be >= 1"),
        ({"generation_config": '{"top_p": 2}'}, "generation_config.top_p"),
        ({"generation_config": '{"stop_strings": [1]}'}, "generation_config.stop_strings"),
        ({"generation_config": '{"num_return_sequences": 3}'}, "num_return_sequences must be 1"),
        ({"prompt": "ok \ud83dx"}, "prompt is not valid UTF-8 text: a lone surrogate at character 3"),
        ({"stop": ["fine", "\udc00"]}, "stop[1] is not valid UTF-8 text"),
    ],
)
def test_each_bad_field_is_refused_by_name(change, named):
    with pytest.raises(BadRequest) as refused:
        check_request({**GOOD, **change})
    assert named in str(refused.value)


@pytest.mark.parametrize(
    "messages, named",
    [
        (None, "messages must be a non-empty list"),
        ({"role": "user"}, "messages must be a non-empty list"),
        (["hi"], "messages[0] must be an object"),
        ([{"role": "", "content": "x"}], "messages[0].role must be a non-empty string"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": {"text": "x"}}], "messages[1].content"),
        ([{"role": "user", "content": None}], "messages[0].content must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0] must be a text part"),
    ],
)
def test_malformed_messages_are_refused_by_where_they_fail(messages, named):
    with pytest.raises(BadRequest) as refused:
        check_messages(messages)
    assert named in str(refused.value)


@pytest.mark.parametrize(
    "body, samples",
    [
        ({}, None),
        ({"temperature": 0}, False),
        ({"temperature": 0.2}, True),
        ({"top_p": 0.5}, True),
        ({"temperature": 0, "top_p": 0.5}, False),
    ],
)
def test_a_temperature_above_zero_samples_and_zero_does_not(body, samples):
    assert sampling_requested(body) is samples
