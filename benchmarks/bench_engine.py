"""Serving throughput: the base SmolLM2-135M and the shipped zip2zip model on vLLM, against zip2zip's
and the base's `generate` one request at a time (what ``python -m zip2zip_hf serve`` runs per request).

``make bench-engine`` runs it in vLLM's virtualenv (``make test-vllm`` builds it) on the folders of the
embedded models. Each arm writes ``--new-tokens`` greedy steps (end of text ignored: every request
runs its steps) for ``--requests`` concurrent prompts, half of them code and half prose from the
held-out standard library text; the table gives output bytes per second of base text (zip2zip writes
more bytes per step), the median time to the first token over requests, and ratios against the base
on vLLM, each the median of ``--repeats`` runs. `generate` runs ``--generate-requests`` of the prompts
one after the other (its bytes per second do not depend on how many wait). All arms in one process,
one after the other: vLLM's engines start once per arm (``--enforce-eager``: the CPU has no graphs).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

from _common import at_least, markdown_table, output_file


def prompts(count: int, n_bytes: int) -> list[str]:
    """``count`` prompts of about ``n_bytes``, alternately code and prose, from the held-out text."""
    from zip2zip_hf.tools.corpus import held_out_files, held_out_texts

    code = "".join(text for _, text in held_out_files())
    prose = "\n\n".join(held_out_texts()["prose"])
    texts = []
    for i in range(count):
        source = code if i % 2 == 0 else prose
        start = (i // 2) * n_bytes % max(1, len(source) - n_bytes)
        texts.append(source[start : start + n_bytes])
    return texts


def on_vllm(folder: str, texts: list[str], new_tokens: int, repeats: int, dtype: str) -> dict:
    """Median bytes/s and time to first token of one engine over ``repeats`` runs of all ``texts``."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=folder,
        dtype=dtype,
        enforce_eager=True,
        seed=0,
        max_num_seqs=len(texts),
        max_model_len=2048,
        disable_log_stats=False,
    )
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(texts[:2], params, use_tqdm=False)  # warm-up
    rates, firsts, steps = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(texts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].text.encode()) for o in outputs) / seconds)
        firsts.append(statistics.median(o.metrics.first_token_latency for o in outputs))
        steps = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return {"bytes_per_s": statistics.median(rates), "first_token_s": statistics.median(firsts), "steps": steps}


def on_generate(folder: str, texts: list[str], new_tokens: int, dtype: str) -> dict:
    """Bytes/s and median time to the first token of `generate`, one request after the other."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zip2zip_hf  # noqa: F401  (the Auto classes know zip2zip checkpoints)

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    zip2zip = hasattr(tokenizer, "codec")
    decode = tokenizer.base_tokenizer.decode if zip2zip else tokenizer.decode
    total_bytes, seconds, firsts = 0, 0.0, []
    for text in texts:
        inputs = tokenizer([text], return_tensors="pt")
        settings = dict(do_sample=False, eos_token_id=None, min_new_tokens=new_tokens)
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, **{**settings, "min_new_tokens": 1})
            firsts.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, **settings)
            seconds += time.perf_counter() - start
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        total_bytes += len(decode(new, skip_special_tokens=True).encode())
    return {"bytes_per_s": total_bytes / seconds, "first_token_s": statistics.median(firsts)}


def parity(folder: str, texts: list[str], new_tokens: int, concurrency: list[int]) -> list[list]:
    """Float32 greedy ids of each request on vLLM, at each concurrency, against `generate`'s alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = []
    for text in texts:
        inputs = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_hypertokens=True)
        expected.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    del model
    rows = []
    for count in concurrency:
        llm = LLM(model=folder, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=count, max_model_len=2048)
        outputs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
        equal = sum(list(o.outputs[0].token_ids) == ids for o, ids in zip(outputs, expected))
        rows.append([count, len(texts), equal])
        del llm
        gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model's folder (make bench-engine: smollm2's)")
    parser.add_argument("--zip2zip", required=True, help="the zip2zip checkpoint's folder (smollm2-zip2zip's)")
    parser.add_argument("--requests", type=at_least(1), nargs="+", default=[16], help="concurrent requests (16)")
    parser.add_argument("--new-tokens", type=at_least(1), default=128, help="greedy steps per request (128)")
    parser.add_argument("--prompt-bytes", type=at_least(16), default=1000, help="bytes of each prompt (1000)")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="runs of each engine (3)")
    parser.add_argument("--generate-requests", type=at_least(0), default=4, help="prompts through generate (4)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="(bfloat16)")
    parser.add_argument("--json", type=output_file, help="also write the results here")
    parser.add_argument(
        "--parity", action="store_true", help="instead: float32 greedy ids on vLLM at 1, 4 and 16 concurrent vs generate"
    )
    args = parser.parse_args()
    if args.parity:
        rows = parity(args.zip2zip, prompts(16, args.prompt_bytes), args.new_tokens, [1, 4, 16])
        print(markdown_table(["concurrent", "requests", "greedy ids equal to generate's"], rows))
        return

    results = {}
    for count in args.requests:
        texts = prompts(count, args.prompt_bytes)
        for name, folder in (("base", args.base), ("zip2zip", args.zip2zip)):
            results[f"{name} on vLLM, {count} concurrent"] = on_vllm(
                folder, texts, args.new_tokens, args.repeats, args.dtype
            )
    if args.generate_requests:
        texts = prompts(args.generate_requests, args.prompt_bytes)
        for name, folder in (("base", args.base), ("zip2zip", args.zip2zip)):
            results[f"{name} generate, one at a time"] = on_generate(folder, texts, args.new_tokens, args.dtype)

    reference = {count: results[f"base on vLLM, {count} concurrent"]["bytes_per_s"] for count in args.requests}
    rows = []
    for name, measured in results.items():
        count = int(name.split(", ")[1].split()[0]) if "concurrent" in name else args.requests[0]
        ratio = measured["bytes_per_s"] / reference[count]
        rows.append([name, f"{measured['bytes_per_s']:.0f}", f"{measured['first_token_s']:.3f}", f"{ratio:.2f}"])
    print(f"{platform.processor() or platform.machine()}, {args.dtype}, {args.new_tokens} greedy steps a request")
    print(markdown_table(["arm", "bytes/s", "first token (s)", "vs base on vLLM"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
