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
import sys
from functools import partial

from _common import STDLIB, alternating_medians, at_least, markdown_table, smollm2

from zip2zip_hf.lzw import LZWCodec


K, M = 2048, 4


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2(weights=False))


def special_ids(tokenizer) -> list[int]:
    ids = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return sorted(i for i in ids if i is not None)


def stdlib_tokens(tokenizer, n_tokens: int, separator: int) -> list[int]:
    ids: list[int] = []
    for path in sorted(STDLIB.rglob("*.py")):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=at_least(1), default=1_000_000)
    parser.add_argument("--repeats", type=at_least(1), default=5)
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
    headers = ("data", "split", "base tokens per code", "ours encode", "ref encode", "ours/ref")
    headers += ("ours decode", "ref decode", "ours/ref")
    rows = []
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
        encoders, decoders = [partial(each, codec.encode, windows)], [partial(each, codec.decode, codes)]
        if reference is not None:
            for window, (c, cb) in zip(windows, encoded):
                ref_codes, _, ref_cb = reference.encode(window)
                assert ref_codes == c and ref_cb.to_dict() == cb.to_dict(), "disagrees with the reference codec"
            encoders.append(partial(each, reference.encode, windows))
            decoders.append(partial(each, reference.decode, codes))
        # Tokens per second in millions; None where the reference is not installed.
        encode = [n / t / 1e6 for t in alternating_medians(encoders, args.repeats)] + [None]
        decode = [n / t / 1e6 for t in alternating_medians(decoders, args.repeats)] + [None]
        label = "one stream" if split == "stream" else f"{split}-token windows"
        rows.append(
            ("stdlib .py", label, f"{n / n_codes:.3f}", *cells(encode[0], encode[1]), *cells(decode[0], decode[1]))
        )
    print(markdown_table(headers, rows, numeric_from=2))


def cells(ours: float, reference: float | None) -> tuple[str, str, str]:
    """Ours, the reference and their ratio, as table cells."""
    if reference is None:
        return f"{ours:.2f}", "n/a", "n/a"
    return f"{ours:.2f}", f"{reference:.2f}", f"{ours / reference:.2f}x"


if __name__ == "__main__":
    main()
