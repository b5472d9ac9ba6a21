"""Bad input, round 5 (issue 42), against a running server: the routes of transformers serve this
server does not offer change nothing, ``/health`` tells the truth, and a sampling setting the
arithmetic cannot take is a 400 naming it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

# The tiny checkpoint and the server on it, as test_serving has them (a server of this module's own).
from test_serving import SERVING, PROMPTS, checkpoint, get, post, running_app, server  # noqa: F401  (fixtures)


pytestmark = [
    pytest.mark.slow,  # starts a server
    pytest.mark.skipif(not SERVING, reason="serving runs on transformers 5's serving code"),
]


def post_raw(url: str, data: bytes = b"", content_type: str | None = None) -> tuple[int, str]:
    """POST ``data`` as a web page could without asking first (a CORS "simple request")."""
    headers = {} if content_type is None else {"content-type": content_type}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def answers(server: str, checkpoint: str) -> str:
    status, reply = post(f"{server}/v1/completions", {"model": checkpoint, "prompt": PROMPTS[0], "max_tokens": 3})
    assert status == 200, reply
    return reply["choices"][0]["text"]


def test_reset_changes_nothing_and_the_server_serves_on(server, checkpoint):
    before = answers(server, checkpoint)
    for content_type in (None, "text/plain", "application/json"):
        status, text = post_raw(f"{server}/reset", b"" if content_type != "application/json" else b"{}", content_type)
        assert 400 <= status < 600 and status != 500, (status, text)
        assert "/reset" in text
    assert get(f"{server}/health") == {"status": "ok"}
    assert answers(server, checkpoint) == before


def test_load_model_answers_for_the_served_model_and_refuses_others(server, checkpoint):
    status, reply = post(f"{server}/load_model", {"model": checkpoint})
    assert status == 200
    event = json.loads(reply["text"].removeprefix("data: "))
    assert event["status"] == "ready" and event["cached"] is True
    status, reply = post(f"{server}/load_model", {"model": "gpt2"})
    assert status == 400 and "gpt2" in json.dumps(reply)
    assert post(f"{server}/load_model", {})[0] == 422
    assert answers(server, checkpoint)


def test_health_is_503_once_the_engine_cannot_serve(checkpoint):
    from zip2zip_hf.serving.server import build_app

    app = build_app(checkpoint, device="cpu")
    with running_app(app) as url:
        assert get(f"{url}/health") == {"status": "ok"}
        app.state.model_manager.shutdown()  # what the server's own ending does
        try:
            urllib.request.urlopen(f"{url}/health", timeout=30)
            status = 200
        except urllib.error.HTTPError as error:
            status = error.code
        assert status == 503
        status, reply = post(f"{url}/v1/completions", {"model": checkpoint, "prompt": "x", "max_tokens": 2})
        assert status == 503, reply  # not a request that waits for ever


@pytest.mark.parametrize("where", ["temperature", "generation_config"])
@pytest.mark.parametrize("temperature", [3.5e38, 1e300, 1e-300, 1e-45])
def test_a_temperature_float32_cannot_take_is_a_400_naming_it(server, checkpoint, where, temperature):
    body = {"model": checkpoint, "prompt": PROMPTS[1], "max_tokens": 3, "seed": 1}
    if where == "temperature":
        body["temperature"] = temperature
    else:
        body["generation_config"] = json.dumps({"temperature": temperature, "do_sample": True})
    status, reply = post(f"{server}/v1/completions", body)
    assert status == 400, reply
    assert "temperature" in json.dumps(reply)
    assert answers(server, checkpoint)


def test_a_generation_config_without_a_length_gets_as_many_steps_as_fit(server, checkpoint):
    """As a request without generation_config: not the default 1024, which this prompt leaves no room for."""
    body = {"model": checkpoint, "prompt": PROMPTS[2] * 40, "generation_config": json.dumps({"do_sample": False})}
    status, reply = post(f"{server}/v1/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")
