"""`transformers.pipeline("text-generation")` over a zip2zip model: in-process, and from a saved
checkpoint via remote code."""

import json
import textwrap

import pytest
from transformers import LogitsProcessorList, pipeline

from utils import CODE_CONTINUATION, CODE_PROMPT, run_without_package
from zip2zip_hf.evaluation.forced_decoding import ForcedContinuationLogitsProcessor


CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def area(w, h): return w * h\ndef area(w, h): return w * h"},
]
GREEDY = dict(do_sample=False, max_new_tokens=24)


@pytest.fixture(scope="module")
def pipe(text_model, text_tok):
    return pipeline("text-generation", model=text_model, tokenizer=text_tok)


def generated_by_hand(model, tok, inputs) -> str:
    """`generate` + decode of the generated part: what the pipeline must print."""
    out = model.generate(**inputs, **GREEDY)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_pipeline_equals_generate_and_decode(pipe, text_model, text_tok):
    expected = generated_by_hand(text_model, text_tok, text_tok(CODE_PROMPT, return_tensors="pt"))
    assert expected  # the random model writes something
    assert pipe(CODE_PROMPT, **GREEDY)[0]["generated_text"] == CODE_PROMPT + expected
    assert pipe(CODE_PROMPT, return_full_text=False, **GREEDY)[0]["generated_text"] == expected


def test_pipeline_with_forced_decoding_gives_the_exact_text(pipe, text_tok):
    base_ids = text_tok.base_ids([CODE_CONTINUATION], add_special_tokens=False)[0]
    processor = ForcedContinuationLogitsProcessor(text_tok.codec, base_ids, eos_token_id=text_tok.eos_token_id)
    out = pipe(CODE_PROMPT, logits_processor=LogitsProcessorList([processor]), do_sample=False, max_new_tokens=300)
    assert out[0]["generated_text"] == CODE_PROMPT + CODE_CONTINUATION
    assert max(max(codes) for codes in processor.codes) >= text_tok.initial_vocab_size  # hypertokens were written


def test_pipeline_chat_goes_through_the_chat_template(pipe, text_model, text_tok):
    inputs = text_tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert text_tok.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    assert inputs["input_ids"].max() >= text_tok.initial_vocab_size  # the repeated line is compressed
    expected = generated_by_hand(text_model, text_tok, inputs)
    full = pipe(CHAT, **GREEDY)[0]["generated_text"]
    assert full == CHAT + [{"role": "assistant", "content": expected}]
    assert pipe(CHAT, return_full_text=False, **GREEDY)[0]["generated_text"] == expected


def test_pipeline_batch_of_prompts(pipe, text_model, text_tok):
    prompts = [CODE_PROMPT, "x = 1\nx = 1\n", "class A:\n    pass\n" * 3]
    outs = pipe(prompts, batch_size=3, return_full_text=False, **GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = generated_by_hand(text_model, text_tok, text_tok(prompt, return_tensors="pt"))
        assert out[0]["generated_text"] == expected


REMOTE_CHILD = textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    checkpoint, prompt, chat, greedy = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    pipe = pipeline("text-generation", model=checkpoint, trust_remote_code=True)
    print(json.dumps({
        "model": type(pipe.model).__module__ + "." + type(pipe.model).__name__,
        "tokenizer": type(pipe.tokenizer).__module__ + "." + type(pipe.tokenizer).__name__,
        "text": pipe(prompt, **greedy)[0]["generated_text"],
        "new": pipe(prompt, return_full_text=False, **greedy)[0]["generated_text"],
        "chat": pipe(chat, **greedy)[0]["generated_text"],
    }))
    """
)


@pytest.mark.slow
def test_pipeline_from_a_saved_checkpoint_without_the_package(pipe, text_model, text_tok, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    text_model.save_pretrained(checkpoint)
    text_tok.save_pretrained(checkpoint)
    args = [str(checkpoint), CODE_PROMPT, json.dumps(CHAT), json.dumps(GREEDY)]
    out = json.loads(run_without_package(REMOTE_CHILD, *args))
    assert out["model"].startswith("transformers_modules.") and out["model"].endswith(".Zip2ZipForCausalLM")
    assert out["tokenizer"].startswith("transformers_modules.") and out["tokenizer"].endswith(".Zip2ZipTokenizer")
    assert out["text"] == pipe(CODE_PROMPT, **GREEDY)[0]["generated_text"]
    assert out["new"] == pipe(CODE_PROMPT, return_full_text=False, **GREEDY)[0]["generated_text"]
    assert out["chat"] == pipe(CHAT, **GREEDY)[0]["generated_text"]
