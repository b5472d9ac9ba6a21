"""Prefill and decoding-step cost of Zip2ZipForCausalLM against its base model (SmolLM2-135M, CPU).

Both models read the same text: the base model its base ids, the zip2zip model the compressed ids
(K=2048, M=4, attention hyper-encoder). The zip2zip model runs twice: with its decoding-step
codebooks in Python streams (the CPU default) and on the device as tensors (`DeviceCodebooks`, the
accelerator default). Each variant runs in its own process so peak memory is its own. Times are
medians over repeats; ratios are zip2zip / base from the same run. Per decoding step it also
counts, outside the base model, the CPU proxies of GPU overhead: wall ms, aten operations (kernel
launches on a GPU) and host syncs.

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

from _common import STDLIB, at_least, markdown_table, smollm2, timed, wrapper_cost


def real_text(min_chars: int = 60_000) -> str:
    parts, total = [], 0
    for name in ("argparse.py", "dataclasses.py", "functools.py", "inspect.py"):
        text = (STDLIB / name).read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    return "".join(parts)


VARIANTS = ("base", "zip2zip", "zip2zip-device")


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
        model.codebooks_on_device = variant == "zip2zip-device"
        codes, _ = tokenizer.codec.encode(base_ids)
        n_prompt = len(tokenizer.codec.encode(base_ids[:prompt_tokens])[0])
        prompt, continuation = codes[:n_prompt], codes[n_prompt:]
    continuation = continuation[:steps]

    prefill_times, step_times, costs = [], [], []
    # What the base model runs: all of it, or (zip2zip) its decoder and its head.
    inner = [model] if variant == "base" else [model.get_decoder(), model.get_output_embeddings()]
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
    parser.add_argument("--prompt-tokens", type=at_least(1), default=512)
    parser.add_argument("--steps", type=at_least(1), default=32)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.prompt_tokens, args.steps, args.repeats)))
        return
    results = {}
    for variant in VARIANTS:
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
    base, streams, device = (results[v] for v in VARIANTS)
    print(
        f"SmolLM2-135M, CPU, {args.prompt_tokens}-base-token prompt of Python source, K=2048, M=4, "
        f"median of {args.repeats} repeats ({args.steps} steps each)\n"
    )

    def row(name, key, scale=1.0, digits=1, ratios=True):
        values = [f"{r[key] * scale:.{digits}f}" for r in (base, streams, device)]
        if not ratios:
            return (name, *values, "", "")
        return (name, *values, ratio(base, streams, key), ratio(base, device, key))

    rows = [
        row("prompt positions", "positions", digits=0),
        row("prefill (ms)", "prefill_s", 1e3),
        row("one decoding step (ms)", "step_s", 1e3, 2),
        row("peak RSS (MB)", "peak_rss_mb", digits=0),
        row("step: ms outside the base model", "step_seconds", 1e3, 2, ratios=False),
        row("step: aten ops outside the base model", "step_ops", digits=0, ratios=False),
        row("step: host syncs outside the base model", "step_host_syncs", digits=0, ratios=False),
    ]
    header = ("measure", "base", "zip2zip (streams)", "zip2zip (device codebooks)", "streams / base", "device / base")
    print(markdown_table(header, rows))


def ratio(base: dict, ours: dict, key: str) -> str:
    return f"{ours[key] / base[key]:.2f}"


if __name__ == "__main__":
    main()
