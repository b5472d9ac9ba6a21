"""lm-evaluation-harness: the ``zip2zip`` model scores canonical continuations, rolls windows over base
tokens, generates through our ``generate``, equals lm-eval's ``hf`` model when nothing is compressed,
and runs from ``python -m zip2zip_hf lm-eval`` on local tasks (JSON in tests/data/lm_eval)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer  # noqa: E402
from zip2zip_hf.evaluation import score_texts  # noqa: E402
from zip2zip_hf.evaluation.lm_eval_harness import Zip2ZipLM  # noqa: E402
from zip2zip_hf.tools.cli import main  # noqa: E402


DATA = Path(__file__).parent / "data" / "lm_eval"


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def task(name: str, data: str, **settings) -> dict:
    """An lm-eval task config over a JSON-lines file of tests/data/lm_eval."""
    files = {"test": str(DATA / f"{data}.jsonl")}
    source = {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}
    return {"task": name, **source, **settings}


TASKS = {
    "choices": task(
        "zip2zip_test_choices",
        "multiple_choice",
        output_type="multiple_choice",
        doc_to_text="{{question}}",
        doc_to_choice="{{choices}}",
        doc_to_target="{{answer}}",
        target_delimiter="",
        metric_list=[{"metric": "acc"}],
    ),
    "documents": task(
        "zip2zip_test_documents",
        "documents",
        output_type="loglikelihood_rolling",
        doc_to_text="",
        doc_to_target="{{text}}",
        metric_list=[{"metric": "bits_per_byte"}],
    ),
    "prompts": task(
        "zip2zip_test_prompts",
        "prompts",
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="{{target}}",
        target_delimiter="",
        generation_kwargs={"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    ),
}
PAIRS = [(row["question"], choice) for row in rows("multiple_choice") for choice in row["choices"]]


def harness(model, tokenizer, name: str = "zip2zip", **settings):
    return get_model(name)(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=3, **settings)


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def log_probs_of(model, codes: list[int], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor([codes]), **kwargs).logits[0].double(), dim=-1)


def hand_loglikelihood(model, codec, context: list[int], continuation: list[int]) -> tuple[float, bool, list[int]]:
    """Score the continuation's canonical ids after the compressed context, by hand: the codes LZW
    writes for context + continuation, minus the context's, when the context ends a phrase."""
    from zip2zip_hf.evaluation.forced_decoding import canonical_continuation

    context_codes = codec.encode(context)[0]
    continuation_codes = canonical_continuation(codec, context_codes, continuation)
    assert codec.decode(context_codes + continuation_codes)[0] == context + continuation
    log_probs = log_probs_of(model, context_codes + continuation_codes, open_phrase_at=len(context_codes) - 1)
    log_probs = log_probs[len(context_codes) - 1 : -1]
    picked = log_probs[torch.arange(len(continuation_codes)), continuation_codes]
    greedy = log_probs.argmax(-1).tolist() == continuation_codes
    return float(picked.sum()), greedy, continuation_codes


def assert_same_responses(mine, theirs) -> None:
    """Equal responses: texts and flags exactly, log-likelihoods to float precision."""
    if isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=1e-5)
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert_same_responses(a, b)
    else:
        assert mine == theirs


@pytest.mark.slow
def test_importing_the_package_registers_the_model_and_keeps_lm_evals_own():
    script = (
        "import zip2zip_hf\n"
        "from lm_eval.api.registry import get_model\n"
        "print(get_model('zip2zip').__name__, get_model('hf').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["Zip2ZipLM", "HFLM"]
    assert get_model("zip2zip") is Zip2ZipLM


@pytest.mark.slow
def test_an_lm_eval_without_the_registry_is_a_warning_not_a_failed_import(tmp_path):
    (tmp_path / "lm_eval").mkdir()
    (tmp_path / "lm_eval" / "__init__.py").write_text("")  # an lm-eval with no models or registry
    script = "import zip2zip_hf; print(zip2zip_hf.Zip2ZipForCausalLM.__name__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "Zip2ZipForCausalLM"
    assert "'zip2zip' model is not registered" in out.stderr


def test_loglikelihood_scores_the_canonical_continuation(text_model, text_tok, tiny_base_tokenizer):
    lm = harness(text_model, text_tok)
    results = lm.loglikelihood(requests("loglikelihood", PAIRS))
    naive_differs = 0
    for (context, continuation), (log_prob, greedy) in zip(PAIRS, results):
        assert math.isfinite(log_prob), "a continuation may go on inside the context's last phrase"
        context_ids = tiny_base_tokenizer(context)["input_ids"]
        continuation_ids = tiny_base_tokenizer(context + continuation)["input_ids"][len(context_ids) :]
        expected, expected_greedy, codes = hand_loglikelihood(
            text_model, text_tok.codec, context_ids, continuation_ids
        )
        assert log_prob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert greedy == expected_greedy
        whole = text_tok(context + continuation)["input_ids"]
        naive_differs += whole[len(text_tok(context)["input_ids"]) :] != codes
    assert naive_differs, "some pair must have a phrase across the boundary, or the test shows nothing"


def test_rolling_windows_score_every_base_token_once(text_model, text_tok, tiny_base_tokenizer):
    """lm-eval's windows (first after the prefix token, later ones after one base token, the last one
    after a full window) with each window's continuation scored canonically."""
    window = 12
    lm = harness(text_model, text_tok, max_length=window)
    texts = [row["text"] for row in rows("documents")]
    scores = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,) for text in texts]))
    for text, score in zip(texts, scores):
        tokens = tiny_base_tokenizer(text)["input_ids"]
        assert len(tokens) > 2 * window
        expected = 0.0
        for start in range(0, len(tokens), window):
            end = min(start + window, len(tokens))
            context = [lm.prefix_token_id] if start == 0 else tokens[max(0, end - window - 1) : start]
            expected += hand_loglikelihood(text_model, text_tok.codec, context, tokens[start:end])[0]
        assert score == pytest.approx(expected, rel=1e-4)


def test_generate_until_writes_what_generate_writes(text_model, text_tok):
    """Greedy text from our generate, at most max_gen_toks *base* tokens of it, cut at the stop string;
    rows of different lengths batched together."""
    max_gen_toks = 16
    prompts = [row["prompt"] for row in rows("prompts")]
    settings = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    texts = harness(text_model, text_tok).generate_until(requests("generate_until", [(p, settings) for p in prompts]))
    for prompt, text in zip(prompts, texts):
        codes = text_tok(prompt, return_tensors="pt")["input_ids"]
        written = text_model.generate(codes, max_new_tokens=max_gen_toks, do_sample=False)[0].tolist()
        base = text_tok.codec.decode(written)[0][len(text_tok.codec.decode(codes[0].tolist())[0]) :]
        expected = text_tok.base_tokenizer.decode(base[:max_gen_toks], skip_special_tokens=True).split("\n")[0]
        assert text == expected


@pytest.mark.slow
def test_with_an_empty_codebook_every_number_equals_the_hf_model(text_model, tiny_base_tokenizer):
    base = text_model.language_model
    uncompressed = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=0, max_subtokens=4)
    wrapper = Zip2ZipForCausalLM.from_base(base, uncompressed).eval()
    runs = [
        lm_eval.simple_evaluate(model=lm, tasks=list(TASKS.values()), log_samples=True)
        for lm in (harness(wrapper, uncompressed), harness(base, tiny_base_tokenizer, name="hf"))
    ]
    ours, plain = ({name: run["results"][config["task"]] for name, config in TASKS.items()} for run in runs)
    assert ours["choices"]["acc,none"] == plain["choices"]["acc,none"]
    assert ours["documents"]["bits_per_byte,none"] == pytest.approx(plain["documents"]["bits_per_byte,none"], rel=1e-6)
    assert ours["prompts"]["exact_match,none"] == plain["prompts"]["exact_match,none"]
    for config in TASKS.values():
        samples = [run["samples"][config["task"]] for run in runs]
        for mine, theirs in zip(*samples, strict=True):
            assert_same_responses(mine["filtered_resps"], theirs["filtered_resps"])


def test_a_plain_tokenizer_is_refused(text_model, tiny_base_tokenizer):
    with pytest.raises(ValueError, match="Zip2ZipTokenizer.*'hf'"):
        Zip2ZipLM(pretrained=text_model, tokenizer=tiny_base_tokenizer, device="cpu")
    with pytest.raises(ValueError, match="causal"):
        Zip2ZipLM(pretrained=text_model, tokenizer=tiny_base_tokenizer, backend="seq2seq")


@pytest.mark.slow
def test_the_command_line_runs_lm_eval_on_a_saved_checkpoint(text_model, text_tok, tmp_path):
    """A bits-per-byte task from a saved checkpoint: one window per document, so lm-eval's number is
    `score_texts`'s."""
    checkpoint, tasks = tmp_path / "model", tmp_path / "tasks"
    text_model.save_pretrained(checkpoint)
    text_tok.save_pretrained(checkpoint)
    tasks.mkdir()
    # lm-eval reads task YAML from --include_path; JSON is YAML.
    (tasks / "documents.yaml").write_text(json.dumps(TASKS["documents"]))
    status = main(
        [
            "lm-eval",
            "run",
            "--model",
            "zip2zip",
            "--model_args",
            f"pretrained={checkpoint},dtype=float32",
            "--tasks",
            TASKS["documents"]["task"],
            "--include_path",
            str(tasks),
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "results"),
        ]
    )
    assert status == 0
    (written,) = (tmp_path / "results").rglob("results_*.json")
    bits = json.loads(written.read_text())["results"][TASKS["documents"]["task"]]["bits_per_byte,none"]
    expected = score_texts(text_model, text_tok, [row["text"] for row in rows("documents")], window=1000)
    assert bits == pytest.approx(expected.bits_per_byte, rel=1e-4)
    assert expected.tokens < expected.base_tokens, "the documents must compress"
