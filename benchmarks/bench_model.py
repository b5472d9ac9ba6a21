"""Prefill and decoding-step cost of Zip2ZipForCausalLM against its base model (SmolLM2-135M, CPU).

Both models read the same text: the base model its base ids, the zip2zip model the compressed ids
(K=2048, M=4, attention hyper-encoder). Each variant runs in its own process so peak memory is
its own. Times are medians over repeats; ratios are zip2zip / base from the same run.

    python benchmarks/bench_model.py [--prompt-tokens 512] [--steps 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys

from _common import STDLIB, markdown_table, smollm2, timed, wrapper_cost


def real_text(min_chars: int = 60_000) -> str:
    parts, total = [], 0
    for name in ("argparse.py", "dataclasses.py", "functools.py", "inspect.py"):
        text = (STDLIB / name).read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return "".join(parts)


def worker(variant: str, prompt_tokens: int, steps: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer

    torch.manual_seed(0)
    path = smollm2()
    base_tokenizer = AutoTokenizer.from_pretrained(path)
    base_ids = base_tokenizer(real_text(), add_special_tokens=False)["input_ids"][: prompt_tokens + 4 * steps]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if variant == "base":
        prompt, continuation = base_ids[:prompt_tokens], base_ids[prompt_tokens:]
    else:
        tokenizer = Zip2ZipTokenizer.from_base(base_tokenizer, max_codebook_size=2048, max_subtokens=4)
        model = Zip2ZipForCausalLM.from_base(model, tokenizer, hyper_encoder="attention").eval()
        codes, _ = tokenizer.codec.encode(base_ids)
        n_prompt = len(tokenizer.codec.encode(base_ids[:prompt_tokens])[0])
        prompt, continuation = codes[:n_prompt], codes[n_prompt:]
    continuation = continuation[:steps]

    prefill_times, step_times, costs = [], [], []
    inner = model if variant == "base" else model.language_model
    with torch.inference_mode():
        for _ in range(repeats):
            seconds, out = timed(model, input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            prefill_times.append(seconds)
            for next_id in continuation:
                seconds, out = timed(
                    model, input_ids=torch.tensor([[next_id]]), past_key_values=out.past_key_values, use_cache=True
                )
                step_times.append(seconds)
            # Two more steps for the CPU proxies of GPU overhead, feeding the prompt's first id: a
            # base id, legal anywhere.
            step = functools.partial(model, input_ids=torch.tensor([prompt[:1]]), past_key_values=out.past_key_values)
            costs.append(wrapper_cost(step, step, inner))
    return {
        "positions": len(prompt),
        "prefill_s": statistics.median(prefill_times),
        "step_s": statistics.median(step_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"step_{key}": statistics.median(c[key] for c in costs) for key in costs[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=["base", "zip2zip"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt_tokens, args.steps, args.repeats)))
        return
    results = {}
    for variant in ("base", "zip2zip"):
        command = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--steps",
            str(args.steps),
            "--repeats",
            str(args.repeats),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base, ours = results["base"], results["zip2zip"]
    print(
        f"SmolLM2-135M, CPU, {args.prompt_tokens}-base-token prompt of Python source, K=2048, M=4, "
        f"median of {args.repeats} repeats ({args.steps} steps each)\n"
    )
    positions = (base["positions"], ours["positions"])
    rows = [
        ("prompt positions", *positions, f"{positions[1] / positions[0]:.2f}"),
        ("prefill (ms)", *(f"{r['prefill_s'] * 1e3:.1f}" for r in (base, ours)), ratio(base, ours, "prefill_s")),
        ("one decoding step (ms)", *(f"{r['step_s'] * 1e3:.2f}" for r in (base, ours)), ratio(base, ours, "step_s")),
        ("peak RSS (MB)", *(f"{r['peak_rss_mb']:.0f}" for r in (base, ours)), ratio(base, ours, "peak_rss_mb")),
        ("step: ms outside the base model", "0", f"{ours['step_seconds'] * 1e3:.2f}", ""),
        ("step: aten ops outside the base model", "0", f"{ours['step_ops']:.0f}", ""),
        ("step: host syncs outside the base model", "0", f"{ours['step_host_syncs']:.0f}", ""),
    ]
    print(markdown_table(("measure", "base", "zip2zip", "zip2zip / base"), rows))


def ratio(base: dict, ours: dict, key: str) -> str:
    return f"{ours[key] / base[key]:.2f}"


if __name__ == "__main__":
    main()
