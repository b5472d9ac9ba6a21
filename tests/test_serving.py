"""Serving over the OpenAI API: a tiny checkpoint saved here, served on 127.0.0.1 by transformers' own
server with our seams (`zip2zip_hf.serving.server`), called with the real `openai` client."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from zip2zip_hf.serving import RequestCodebook


transformers = pytest.importorskip("transformers")
SERVING = int(transformers.__version__.split(".")[0]) >= 5
openai = pytest.importorskip("openai")

PROMPTS = ["def parse(self, text):\n", "import os\nimport sys\n", "class Loader:\n    def", "for i in range(10):\n"]
CHAT = [{"role": "user", "content": "Write a loop over a list."}]


# ---------------------------------------------------------------------- the codebook of one request


def test_a_request_codebook_expands_and_counts_without_a_model(text_tok):
    text = "x = 1\nx = 1\nx = 1\nx = 1\n"
    ids = text_tok(text)["input_ids"]
    request = RequestCodebook(text_tok.codec)
    prompt_base = request.read_prompt(ids[:3])
    written = request.write(ids[3:])
    assert prompt_base + written == text_tok.codec.decode(ids)[0]
    usage = request.usage()
    assert (usage.prompt_ids, usage.completion_ids) == (3, len(ids) - 3)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_base), len(written))
    assert usage.to_openai()["total_tokens"] == len(prompt_base) + len(written)
    assert usage.to_openai()["compressed"]["completion_tokens"] == len(ids) - 3
    legal = request.legal_hyper_ids()
    with pytest.raises(ValueError, match=str(legal.stop)):
        request.write([legal.stop])
    assert request.usage() == usage  # a refused id changes nothing
    with pytest.raises(ValueError, match="before the model writes"):
        request.read_prompt(ids[:1])


# ---------------------------------------------------------------------- a server on 127.0.0.1


@contextlib.contextmanager
def running_server(checkpoint: str):
    """The app serving ``checkpoint`` on a free port of 127.0.0.1, in a thread; yields its base URL."""
    if not SERVING:
        pytest.skip("serving runs on transformers 5's serving code")
    from zip2zip_hf.serving.server import build_app

    with running_app(build_app(checkpoint, device="cpu")) as url:
        yield url


@contextlib.contextmanager
def running_app(app):
    """``app`` served on a free port of 127.0.0.1, in a thread; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{uvicorn_server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


def openai_client(base_url: str):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_model, text_tok):
    folder = tmp_path_factory.mktemp("served")
    text_model.save_pretrained(folder)
    text_tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    """POST JSON with the standard library; the status and the JSON reply, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            status, text = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read()
    payload = text.decode()
    return status, json.loads(payload) if payload.startswith("{") else {"text": payload}


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return json.loads(reply.read())


def generated(model, tok, inputs, **settings) -> tuple[str, int]:
    """What `generate` writes for ``inputs`` (greedy unless told): the text and the model steps."""
    out = model.generate(**inputs, do_sample=False, return_hypertokens=True, **settings)
    new_ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    request = RequestCodebook(tok.codec)
    request.read_prompt(inputs["input_ids"][0])
    base_ids = request.write(new_ids)
    return tok.base_tokenizer.decode(base_ids, skip_special_tokens=True), len(new_ids)


@pytest.mark.slow  # starts a server
def test_completions_give_what_generate_writes_with_usage_in_base_tokens(client, checkpoint, text_model, text_tok):
    inputs = text_tok(PROMPTS[0], return_tensors="pt")
    text, steps = generated(text_model, text_tok, inputs, max_new_tokens=24)
    answer = client.completions.create(model=checkpoint, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert answer.choices[0].text == text
    usage = answer.usage
    base_prompt = len(text_tok.codec.decode(inputs["input_ids"][0].tolist())[0])
    assert usage.prompt_tokens == base_prompt
    assert usage.completion_tokens == len(text_tok.base_tokenizer.encode(text, add_special_tokens=False).ids)
    assert usage.compressed == {
        "prompt_tokens": inputs["input_ids"].shape[1],
        "completion_tokens": steps,
        "total_tokens": inputs["input_ids"].shape[1] + steps,
    }
    assert answer.choices[0].finish_reason == ("length" if steps == 24 else "stop")


@pytest.mark.slow  # starts a server
def test_streamed_chunks_join_to_the_same_text_and_end_with_the_usage(client, checkpoint):
    settings = dict(model=checkpoint, prompt=PROMPTS[1], max_tokens=30, temperature=0)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(stream=True, **settings))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.compressed == whole.usage.compressed
    # The finish reason ends the text, in the usage's chunk or (5.25 on) in one of its own before it.
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.slow  # starts a server
def test_chat_goes_through_the_chat_template(client, checkpoint, text_model, text_tok):
    inputs = text_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    text, _ = generated(text_model, text_tok, inputs, max_new_tokens=20)
    answer = client.chat.completions.create(model=checkpoint, messages=CHAT, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == text
    streamed = client.chat.completions.create(
        model=checkpoint, messages=CHAT, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == text


@pytest.mark.slow  # starts a server
def test_stop_sequences_are_matched_on_text(client, checkpoint, text_model, text_tok):
    inputs = text_tok(PROMPTS[2], return_tensors="pt")
    free, _ = generated(text_model, text_tok, inputs, max_new_tokens=40)
    stop = free[len(free) // 2 : len(free) // 2 + 2]  # two characters from the middle of the free text
    text, _ = generated(text_model, text_tok, inputs, max_new_tokens=40, stop_strings=[stop], tokenizer=text_tok)
    answer = client.completions.create(model=checkpoint, prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop])
    assert answer.choices[0].text == text
    assert stop in text and len(text) < len(free)


@pytest.mark.slow  # starts a server
def test_prompt_lookup_per_request_writes_the_same_greedy_text(client, checkpoint):
    prompt = "value = compute(value)\n" * 6
    settings = dict(model=checkpoint, prompt=prompt, max_tokens=24, temperature=0)
    plain = client.completions.create(**settings)
    looked_up = client.completions.create(extra_body={"prompt_lookup_num_tokens": 4}, **settings)
    assert looked_up.choices[0].text == plain.choices[0].text
    assert looked_up.usage.compressed == plain.usage.compressed


@pytest.mark.slow  # starts a server
def test_concurrent_clients_each_get_their_own_answer(client, checkpoint, text_model, text_tok):
    expected = [
        generated(text_model, text_tok, text_tok(p, return_tensors="pt"), max_new_tokens=16)[0] for p in PROMPTS
    ]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        reply = client.completions.create(model=checkpoint, prompt=PROMPTS[index], max_tokens=16, temperature=0)
        answers[index] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == dict(enumerate(expected))


@pytest.mark.slow  # starts a server
@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"model": "another-model"}, 400, "pinned"),
        ({"max_tokens": -3}, 400, "max_tokens must be >= 1"),
        ({"max_tokens": 2.5}, 400, "max_tokens must be an int"),
        ({"max_tokens": 10**6}, 400, "does not fit"),
        ({"prompt": "x = 1\n" * 3000}, 400, "positions"),
        ({"logprobs": 2}, 400, "logprobs"),
        ({"n": 3}, 400, "n=3"),
        ({"prompt_lookup_num_tokens": 0}, 400, "prompt_lookup_num_tokens"),
        ({"temperature": -1.0}, 400, "temperature"),
        ({"no_such_field": 1}, 422, "no_such_field"),
    ],
)
def test_a_bad_request_gets_a_4xx_that_says_what_was_wrong(server, checkpoint, change, status, message):
    good = {"model": checkpoint, "prompt": PROMPTS[0], "max_tokens": 4}
    for stream in (False, True):
        status_code, reply = post(f"{server}/v1/completions", {**good, **change, "stream": stream})
        assert status_code == status, reply
        assert message in json.dumps(reply)
    assert post(f"{server}/v1/completions", good)[0] == 200  # and the server serves on


# Each a field of a request the server cannot honour, and a word its 4xx answer must carry.
BAD_FIELDS = [
    ({"seed": "x"}, "seed"),
    ({"seed": [1]}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"generation_config": "{not json"}, "generation_config"),
    ({"generation_config": "[1, 2]"}, "generation_config"),
    ({"generation_config": {"max_new_tokens": 3}}, "generation_config"),
    ({"generation_config": '{"max_new_tokens": -3}'}, "max_new_tokens"),
    ({"generation_config": '{"temperature": "hot"}'}, "temperature"),
    ({"stop": [1]}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"frequency_penalty": -1.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
]


@pytest.mark.slow  # starts a server
@pytest.mark.parametrize("change, message", BAD_FIELDS, ids=lambda case: json.dumps(case)[:40])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_a_bad_setting_is_a_400_naming_it_on_both_endpoints(server, checkpoint, endpoint, change, message):
    good = {"model": checkpoint, "max_tokens": 4}
    good.update({"prompt": PROMPTS[0]} if endpoint == "completions" else {"messages": CHAT})
    status, reply = post(f"{server}/v1/{endpoint}", {**good, **change})
    assert status == 400, reply
    assert message in json.dumps(reply)


@pytest.mark.slow  # starts a server
@pytest.mark.parametrize(
    "messages, message",
    [
        (None, "messages"),
        ([], "messages"),
        ("hello", "messages"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text"),
        ([{"role": "user", "content": "\ud800x"}], "UTF-8"),
    ],
)
def test_malformed_messages_are_a_400_naming_what_is_wrong(server, checkpoint, messages, message):
    body = {"model": checkpoint, "max_tokens": 4}
    if messages is not None:
        body["messages"] = messages
    status, reply = post(f"{server}/v1/chat/completions", body)  # JSON escapes a lone surrogate as \\ud800
    assert status == 400, reply
    assert message in json.dumps(reply)


@pytest.mark.slow  # starts a server
def test_a_prompt_with_a_lone_surrogate_is_a_400(server, checkpoint):
    status, reply = post(f"{server}/v1/completions", {"model": checkpoint, "prompt": "\ud800x", "max_tokens": 4})
    assert status == 400 and "UTF-8" in json.dumps(reply), reply


@pytest.mark.slow  # starts a server
def test_chat_on_a_checkpoint_without_a_chat_template_is_a_400(tmp_path, text_model, text_tok, checkpoint):
    text_model.save_pretrained(tmp_path)
    text_tok.save_pretrained(tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / name).unlink(missing_ok=True)
    config_path = tmp_path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tokenizer_config))
    with running_server(str(tmp_path)) as url:
        status, reply = post(f"{url}/v1/chat/completions", {"model": str(tmp_path), "messages": CHAT})
        assert status == 400 and "chat template" in json.dumps(reply), reply
        assert post(f"{url}/v1/completions", {"model": str(tmp_path), "prompt": PROMPTS[0], "max_tokens": 2})[0] == 200


@pytest.mark.slow  # starts a server
def test_temperature_samples_and_a_seed_makes_it_reproducible(client, checkpoint, text_model, text_tok):
    import torch

    inputs = text_tok(PROMPTS[3], return_tensors="pt")
    greedy, _ = generated(text_model, text_tok, inputs, max_new_tokens=12)
    settings = dict(model=checkpoint, prompt=PROMPTS[3], max_tokens=12, temperature=1.0)
    answers = []
    for seed in (1, 2, 3):
        answer = client.completions.create(seed=seed, **settings).choices[0].text
        assert client.completions.create(seed=seed, **settings).choices[0].text == answer  # same seed, same text
        torch.manual_seed(seed)
        out = text_model.generate(
            **inputs, do_sample=True, temperature=1.0, max_new_tokens=12, return_hypertokens=True
        )
        request = RequestCodebook(text_tok.codec)
        request.read_prompt(inputs["input_ids"][0])
        base_ids = request.write(out[0, inputs["input_ids"].shape[1] :].tolist())
        assert answer == text_tok.base_tokenizer.decode(base_ids, skip_special_tokens=True)  # generate's sample
        answers.append(answer)
    assert any(answer != greedy for answer in answers)
    assert client.completions.create(**{**settings, "temperature": 0}).choices[0].text == greedy


@pytest.mark.slow  # starts a server
def test_malformed_json_is_a_4xx_and_the_server_serves_on(server, client, checkpoint):
    status, reply = post(f"{server}/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 422 and "json" in json.dumps(reply).lower()
    assert client.completions.create(model=checkpoint, prompt=PROMPTS[3], max_tokens=3).choices[0].text is not None
    assert get(f"{server}/health") == {"status": "ok"}
    assert [m["id"] for m in get(f"{server}/v1/models")["data"]] == [checkpoint]
    assert post(f"{server}/v1/responses", {"model": checkpoint, "input": "hi"})[0] == 501


@pytest.mark.slow  # starts a server
def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client, checkpoint, monkeypatch):
    from zip2zip_hf.serving import server as serving

    ended: list[str] = []
    run_request = serving._run_request

    def watched(*args, **kwargs):
        try:
            result = run_request(*args, **kwargs)
        except BaseException as error:
            ended.append(type(error).__name__)
            raise
        ended.append("finished")
        return result

    monkeypatch.setattr(serving, "_run_request", watched)
    body = {"model": checkpoint, "prompt": PROMPTS[0], "max_tokens": 900, "stream": True}
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    connection.close()  # one chunk, then the client goes away
    answer = client.completions.create(model=checkpoint, prompt=PROMPTS[1], max_tokens=2)
    assert answer.choices[0].text is not None
    assert ended == ["_GenerationCancelled", "finished"]


@pytest.mark.real_model
def test_the_real_smollm2_zip2zip_answers_a_chat_like_generate(tmp_path):
    from zip2zip_hf.tools.embedded import load_named_model

    model, tok = load_named_model("smollm2-zip2zip", "cpu")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    inputs = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    text, _ = generated(model, tok, inputs, max_new_tokens=24)
    with running_server(str(tmp_path)) as url:
        answer = openai_client(url).chat.completions.create(
            model=str(tmp_path), messages=CHAT, max_tokens=24, temperature=0
        )
    assert answer.choices[0].message.content == text
    assert answer.usage.compressed["completion_tokens"] <= answer.usage.completion_tokens


@pytest.mark.skipif(SERVING, reason="transformers 5 has the serving code")
def test_serving_on_transformers_4_fails_naming_the_release(checkpoint, capsys):
    from zip2zip_hf.tools.cli import main

    assert main(["serve", checkpoint]) == 2
    assert f"transformers {transformers.__version__}" in capsys.readouterr().err
