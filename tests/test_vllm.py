"""zip2zip on vLLM (`zip2zip_hf.engines`), end to end on the CPU runner (Model Runner V1).

Runs where vLLM is installed (``make test-vllm``: its own virtualenv, pinned in
``constraints/vllm.txt``); elsewhere every test here is skipped. One engine serves the module, set
up so that each step exercises what an engine does to a request: several requests at once with
slots reused as they finish (continuous batching), prompts cut into chunks (a small token budget
per step), a shared prefix read from the prefix cache, and a KV cache so small that requests are
preempted and resumed by recomputation. Its greedy ids must equal `generate`'s for each request
alone, and its text the base text of those ids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch


vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

NEW_TOKENS = 40
# A header of more than one KV block (32 ids) that two prompts share: the second reads it from the
# prefix cache.
HEADER = "import os\nimport sys\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n\n"
PROMPTS = [
    HEADER + "def size(path):\n",
    "hello hello hello world, hello",
    "import os\nimport sys\nimport os\n",
    "x = 1\ny = 2\nx = 1\n",
    HEADER + "def lines(path):\n",
    "the cat sat on the mat, the cat sat on the hat, the cat",
]

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama zip2zip checkpoint whose CPU attention vLLM runs (head size 32), its
    logits scaled up so that no greedy step is a near tie that float rounding could flip."""
    from transformers import AutoModelForCausalLM

    from utils import build_tiny_base_tokenizer, perturb_hyper_encoders, tiny_causal_lm_config
    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer

    tokenizer = Zip2ZipTokenizer.from_base(build_tiny_base_tokenizer(), max_codebook_size=256, max_subtokens=4)
    torch.manual_seed(0)
    config = tiny_causal_lm_config(
        "llama",
        len(tokenizer),
        hidden=128,
        positions=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        base.model.norm.weight.mul_(30.0)
    model = perturb_hyper_encoders(Zip2ZipForCausalLM.from_base(base, tokenizer).eval())
    folder = tmp_path_factory.mktemp("zip2zip-vllm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Per prompt: `generate`'s greedy compressed ids, alone, and the text of their base ids."""
    _, model, tokenizer = checkpoint
    results = []
    for prompt in PROMPTS:
        inputs = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_hypertokens=True)
        prompt_ids = inputs["input_ids"][0].tolist()
        ids = out[0, len(prompt_ids) :].tolist()
        stream = tokenizer.codec.stream()
        stream.feed(prompt_ids)
        base_ids: list[int] = []
        stream.feed(ids, out=base_ids)
        results.append((ids, tokenizer.base_tokenizer.decode(base_ids, skip_special_tokens=True)))
    return results


@pytest.fixture(scope="module")
def engine(checkpoint):
    from vllm import LLM

    folder, _, _ = checkpoint
    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        seed=0,
        max_num_seqs=3,  # six prompts: slots are reused as requests finish
        max_model_len=128,
        max_num_batched_tokens=24,  # prompts longer than that are chunked
        enable_prefix_caching=True,
        block_size=32,
        num_gpu_blocks_override=5,  # 160 tokens of KV for three requests of up to 80: preemption
        disable_log_stats=False,
    )
    yield llm
    del llm


def test_greedy_ids_and_text_equal_generate_under_batching_chunking_caching_and_preemption(engine, expected):
    from vllm import SamplingParams

    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    for prompt, output, (ids, text) in zip(PROMPTS, outputs, expected):
        assert list(output.outputs[0].token_ids) == ids, prompt
        assert output.outputs[0].text == text, prompt
    assert any(i >= 512 for ids, _ in expected for i in ids), "hypertokens are written"
    assert _metric(engine, "vllm:num_preemptions") > 0, "the small KV cache preempted requests"


def _metric(engine, name: str) -> float:
    return next(metric.value for metric in engine.get_metrics() if metric.name == name)


def test_a_prompt_whose_header_is_in_the_prefix_cache_equals_generate(engine, expected):
    """The second of two prompts with the same header (two KV blocks) starts from the first's KV:
    its slot is rebuilt from the ids the cache holds, the rest fed as the engine schedules them."""
    from vllm import SamplingParams

    (first,) = engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    hits = _metric(engine, "vllm:prefix_cache_hits")
    (second,) = engine.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    assert _metric(engine, "vllm:prefix_cache_hits") > hits, "the header came from the cache"
    assert list(first.outputs[0].token_ids) == expected[0][0]
    assert list(second.outputs[0].token_ids) == expected[4][0]


def test_a_stop_string_ending_inside_a_hypertoken_cuts_the_text_there(engine, expected, checkpoint):
    from vllm import SamplingParams

    _, _, tokenizer = checkpoint
    index, cut = _cut_inside_a_hypertoken(expected, tokenizer)
    text = expected[index][1]
    stop = text[max(0, cut - 5) : cut]
    (output,) = engine.generate([PROMPTS[index]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=[stop]))
    assert output.outputs[0].text == text[: text.find(stop)]
    assert output.outputs[0].finish_reason == "stop"


def _cut_inside_a_hypertoken(expected, tokenizer) -> tuple[int, int]:
    """A prompt and a character offset of its expected text that falls inside the text of a
    hypertoken of several base tokens (not at its end)."""
    V = tokenizer.codec.initial_vocab_size
    for index, (ids, text) in enumerate(expected):
        stream = tokenizer.codec.stream()
        stream.feed(tokenizer(PROMPTS[index])["input_ids"])
        written: list[int] = []
        for code in ids:
            before = len(tokenizer.base_tokenizer.decode(written, skip_special_tokens=True))
            stream.feed([code], out=written)
            after = tokenizer.base_tokenizer.decode(written, skip_special_tokens=True)
            if code >= V and len(after) - before >= 3 and text.startswith(after) and before >= 5:
                return index, before + 2
    pytest.fail("no hypertoken of three characters or more in the expected texts")


def test_a_prompt_with_a_hyper_id_it_did_not_install_is_refused_and_the_engine_goes_on(engine, expected):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="hyper id 700 .* not installed"):
        engine.generate([{"prompt_token_ids": [5, 6, 700]}], SamplingParams(temperature=0, max_tokens=4))
    (output,) = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    assert list(output.outputs[0].token_ids) == expected[1][0]


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"logprobs": 2}, "logprobs"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"bad_words": ["cat"]}, "bad_words"),
        ({"logit_bias": {5: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [5, 6]}, "allowed_token_ids"),
    ],
)
def test_settings_without_a_zip2zip_meaning_are_refused_by_name(engine, settings, field):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=f"{field} is not supported by zip2zip models"):
        engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=4, **settings))


def test_serve_with_the_vllm_engine_hands_the_process_to_vllms_server(checkpoint, monkeypatch):
    from zip2zip_hf.tools.cli import main

    folder, _, _ = checkpoint
    calls = []

    def execv(path, argv):
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    with pytest.raises(SystemExit):
        main(["serve", str(folder), "--engine", "vllm", "--port", str(_free_port()), "--dtype", "float32"])
    (argv,) = calls
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(folder) and argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--served-model-name") + 1] == str(folder)


# ---------------------------------------------------------------------- over the OpenAI server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_openai_server_serves_a_zip2zip_checkpoint_without_flags(checkpoint, expected, tmp_path):
    folder, _, _ = checkpoint
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "256", "--max-num-seqs", "4"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        body = {"model": str(folder), "prompt": PROMPTS[2], "max_tokens": NEW_TOKENS, "temperature": 0}
        status, answer = _post(base + "/v1/completions", body)
        assert status == 200, answer
        assert answer["choices"][0]["text"] == expected[2][1]
        status, answer = _post(base + "/v1/completions", {**body, "prompt": [5, 6, 700]})
        assert status == 400 and "hyper id 700" in json.dumps(answer), answer
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
