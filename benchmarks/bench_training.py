"""Training throughput, zip2zip LoRA vs plain LoRA, on the real SmolLM2-135M-Instruct (CPU by default).

Both runs see the same texts (CPython standard-library sources) and the same batch shape:
``--batch-size`` rows of exactly ``--max-length`` tokens -- compressed ids for zip2zip (windows cut in
base space by `zip2zip_hf.finetuning.data.compress_dataset`), base ids for plain LoRA (consecutive base-id
windows). A zip2zip row therefore covers more text. Both use the same LoRA config (every linear
layer of the base, r=16); zip2zip also trains its two hyper-encoders fully. One timed step is
forward + backward + AdamW step; throughput is UTF-8 bytes of the rows' text per second. The two
models alternate step by step (after warm-up), so a change in machine load hits both alike; the
table reports medians and the ratio measured in this one run.

zip2zip runs twice: with the codebooks precomputed by the collator (the default: in training they are
made in DataLoader workers while the device runs the previous step) and with the forward computing
them from the ids (``precompute_codebooks=False``, a Python pass over every id inside the step). The
collator's own time per batch is reported beside: it is off the critical path only with workers.

    python benchmarks/bench_training.py [--steps 6] [--batch-size 4] [--max-length 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch
from _common import at_least, markdown_table, smollm2, stdlib_sources, timed


def base_rows(tokenizer, texts: list[str], length: int) -> list[tuple[list[int], int]]:
    """Consecutive full base-id windows of ``length`` ids and the UTF-8 bytes of their text."""
    rows = []
    for ids in tokenizer.base_ids(texts, add_special_tokens=False):
        for start in range(0, len(ids) - length + 1, length):
            window = ids[start : start + length]
            rows.append((window, len(tokenizer.decode(window).encode("utf-8"))))
    return rows


def zip2zip_rows(tokenizer, texts: list[str], length: int) -> list[tuple[list[int], int]]:
    """Full compressed rows of exactly ``length`` ids (windows cut in base space) and their bytes."""
    import datasets

    from zip2zip_hf.finetuning.data import compress_dataset

    data = compress_dataset(datasets.Dataset.from_dict({"text": texts}), tokenizer, max_length=length, add_eos=False)
    rows = []
    for ids in data["input_ids"]:
        if len(ids) == length:
            rows.append((ids, len(tokenizer.decode(ids).encode("utf-8"))))
    return rows


def lora_model(model, r: int):
    from peft import get_peft_model

    from zip2zip_hf.finetuning.training import default_lora_config

    return get_peft_model(model, default_lora_config(model, r=r)).train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="base HF causal LM folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=at_least(1), default=6, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=at_least(0), default=1)
    parser.add_argument("--batch-size", type=at_least(1), default=4)
    parser.add_argument("--max-length", type=at_least(2), default=256)
    parser.add_argument("--lora-r", type=at_least(1), default=16)
    parser.add_argument("--threads", type=at_least(1), default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
    from zip2zip_hf.finetuning.data import Zip2ZipDataCollator

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or smollm2()
    tokenizer = Zip2ZipTokenizer.from_base(path, padding_side="right")
    n_rows = args.batch_size * (args.steps + args.warmup)
    texts = stdlib_sources(400_000)
    z_rows = zip2zip_rows(tokenizer, texts, args.max_length)[:n_rows]
    b_rows = base_rows(tokenizer, texts, args.max_length)[:n_rows]
    if len(z_rows) < n_rows or len(b_rows) < n_rows:
        raise SystemExit("not enough text for that many steps")

    torch.manual_seed(0)
    base_plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    plain = lora_model(base_plain, args.lora_r)
    torch.manual_seed(0)
    base_z = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    zmodel = lora_model(Zip2ZipForCausalLM.from_base(base_z, tokenizer), args.lora_r)

    def batches(rows, collator):
        """Collated batches, their bytes of text, and the seconds collating each took."""
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i : i + args.batch_size]
            seconds, batch = timed(collator, [{"input_ids": ids} for ids, _ in chunk])
            yield batch, sum(n for _, n in chunk), seconds

    arms = (
        ("plain LoRA", plain, b_rows, Zip2ZipDataCollator(tokenizer, "right", precompute_codebooks=False)),
        (
            "zip2zip, codebooks in step",
            zmodel,
            z_rows,
            Zip2ZipDataCollator(tokenizer, "right", precompute_codebooks=False),
        ),
        ("zip2zip LoRA", zmodel, z_rows, Zip2ZipDataCollator(tokenizer, "right")),
    )
    runs = {}
    for name, model, rows, collator in arms:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = dict(model=model, optimizer=optimizer, batches=list(batches(rows, collator)), times=[], bytes=[])

    def train_step(run, batch) -> float:
        loss = run["model"](**batch).loss
        loss.backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        return float(loss)

    def step(run, i):
        batch, n_bytes, _ = run["batches"][i]
        seconds, loss = timed(train_step, run, batch)
        return seconds, n_bytes, loss

    load_before = os.getloadavg()
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():  # alternate, so load changes hit both
            seconds, n_bytes, loss = step(run, i)
            print(
                f"step {i:2d} {name:13s} {seconds:6.2f} s  {n_bytes / seconds:8.0f} B/s  loss {loss:.3f}",
                file=sys.stderr,
            )
            if i >= args.warmup:
                run["times"].append(seconds)
                run["bytes"].append(n_bytes)
    load_after = os.getloadavg()

    print(
        f"\nSmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads, {platform.machine()}), "
        f"torch {torch.__version__}; batch {args.batch_size} x {args.max_length} tokens (compressed for zip2zip, "
        f"base for plain), LoRA r={args.lora_r}, fp32, {args.steps} timed steps each after {args.warmup} warm-up."
    )
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores\n")
    rates = {
        name: statistics.median(b / t for b, t in zip(run["bytes"], run["times"], strict=True))
        for name, run in runs.items()
    }
    rows = [
        (
            name,
            f"{statistics.median(run['times']):.2f}",
            f"{statistics.median(run['bytes']):.0f}",
            f"{rates[name]:.0f}",
            f"{rates[name] / rates['plain LoRA']:.2f}x",
            f"{1000 * statistics.median(seconds for _, _, seconds in run['batches']):.1f}",
        )
        for name, run in runs.items()
    ]
    header = ("run", "median s/step", "bytes/step (median)", "bytes/s (median)", "ratio", "collate ms/batch")
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
