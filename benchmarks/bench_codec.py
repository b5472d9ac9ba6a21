"""Codec throughput on real tokens: our pure-Python LZW against the reference Rust codec.

Data: the SmolLM2-135M tokenizer applied to the CPython standard library's own ``*.py`` files (sorted,
recursive, each file followed by ``<|endoftext|>`` as in a packed pre-training stream) until
``--tokens`` tokens. Settings: K=2048, M=4, V=len(tokenizer), disabled = every special/added id.

Each split is encoded (and its codes decoded) window by window, each window with a fresh codebook:
``stream`` is the whole text as one sequence, ``1024``/``4096`` are non-overlapping windows of that
many base tokens. Throughput is base tokens per second, median of ``--repeats`` runs. When
``zip2zip_compression`` is installed the same windows go through ``LZWCompressor.encode``/``decode``
(Python lists in, Python lists out: its conversions are part of the cost, as they are for a caller).

    python benchmarks/bench_codec.py [--tokens 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zip2zip_hf.lzw import LZWCodec  # noqa: E402


K, M = 2048, 4


def load_tokenizer():
    from transformers import AutoTokenizer

    from zip2zip_hf.tools.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(weights=False))


def special_ids(tokenizer) -> list[int]:
    ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return sorted(i for i in ids if i is not None)


def stdlib_tokens(tokenizer, n_tokens: int, separator: int) -> list[int]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(stdlib.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(separator)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        print(f"note: the standard library only gave {len(ids):,} tokens", file=sys.stderr)
    return ids[:n_tokens]


def each(fn, sequences: list[list[int]]) -> list:
    """One call per window, each with a fresh codebook: what a data pipeline does."""
    return [fn(sequence) for sequence in sequences]


def median_seconds(functions: list, repeats: int) -> list[float]:
    """Median wall time of each function. Runs alternate (a, b, a, b, ...) so that a change in the
    machine's load during the run hits both sides of a comparison alike."""
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, record in zip(functions, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    disabled = special_ids(tokenizer)
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else disabled[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator
    V = len(tokenizer)
    ids = stdlib_tokens(tokenizer, args.tokens, separator)
    n = len(ids)
    codec = LZWCodec(V, K, M, disabled)

    try:
        import zip2zip_compression
    except ImportError:
        reference = None
    else:
        reference = zip2zip_compression.LZWCompressor(V, K, M, pad, sorted(set(disabled) | {pad}))

    print(
        f"{n:,} tokens of CPython {sys.version.split()[0]} stdlib source, SmolLM2 tokenizer (V={V}), "
        f"K={K}, M={M}, {len(disabled)} disabled ids; median of {args.repeats} runs, M tokens/s\n"
    )
    print(
        "| data | split | base tokens per code | ours encode | ref encode | ours/ref "
        "| ours decode | ref decode | ours/ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for split in ("stream", 4096, 1024):
        size = n if split == "stream" else split
        windows = [ids[i : i + size] for i in range(0, n, size)]
        encoded = [codec.encode(w) for w in windows]
        codes = [c for c, _ in encoded]
        n_codes = sum(len(c) for c in codes)
        # Correctness first: both directions must agree before timing means anything.
        for window, (c, cb) in zip(windows, encoded):
            base, decoded_cb = codec.decode(c)
            assert base == window and decoded_cb == cb
        ref_enc = ref_dec = None
        if reference is None:
            encode_times = median_seconds([partial(each, codec.encode, windows)], args.repeats)
            decode_times = median_seconds([partial(each, codec.decode, codes)], args.repeats)
        else:
            for window, (c, cb) in zip(windows, encoded):
                ref_codes, _, ref_cb = reference.encode(window)
                assert ref_codes == c and ref_cb.to_dict() == cb.to_dict(), "disagrees with the reference codec"
            encode_times = median_seconds(
                [partial(each, codec.encode, windows), partial(each, reference.encode, windows)], args.repeats
            )
            decode_times = median_seconds(
                [partial(each, codec.decode, codes), partial(each, reference.decode, codes)], args.repeats
            )
            ref_enc, ref_dec = n / encode_times[1] / 1e6, n / decode_times[1] / 1e6
        ours_enc, ours_dec = n / encode_times[0] / 1e6, n / decode_times[0] / 1e6

        def cell(x):
            return "n/a" if x is None else f"{x:.2f}"

        def ratio(a, b):
            return "n/a" if b is None else f"{a / b:.2f}x"

        label = "one stream" if split == "stream" else f"{split}-token windows"
        print(
            f"| stdlib .py | {label} | {n / n_codes:.3f} "
            f"| {cell(ours_enc)} | {cell(ref_enc)} | {ratio(ours_enc, ref_enc)} "
            f"| {cell(ours_dec)} | {cell(ref_dec)} | {ratio(ours_dec, ref_dec)} |"
        )


if __name__ == "__main__":
    main()
