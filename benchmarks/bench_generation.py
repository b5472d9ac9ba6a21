"""End-to-end generation speed: zip2zip vs its base model writing the same known text (forced decoding).

SmolLM2-135M-Instruct on CPU, K=2048, M=4, attention hyper-encoder (fresh). For each text, both models
read the same prompt and then `generate` the same continuation, each forced to its own canonical ids
by a logits processor: the base model the base ids, the zip2zip model the canonical compressed
continuation given its prompt (`canonical_continuation`). So both do exactly the work of writing that
text with HF ``generate`` (prefill, cache, logits processors, stopping criteria, base-id output), and
the zip2zip model needs fewer steps where the text repeats itself.

Reported per text: steps, wall time of the whole ``generate`` call (prefill included), UTF-8 bytes of
continuation per second, and the ratio zip2zip / base of bytes per second, each the median of
``--repeats`` runs that alternate the two models (so both see the same machine load).

    python benchmarks/bench_generation.py [--repeats 3] [--threads N] [--prompt-tokens 256]
                                          [--continuation-tokens 320] [--profile]

``--profile`` then runs cProfile over one forced generation of the code text per model and prints
where a decoding step's time goes (ms per step, by function).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from pathlib import Path

from _common import STDLIB, ForceIds, at_least, markdown_table, smollm2, timed


PROMPT_TOKENS = 256
CONTINUATION_TOKENS = 320


def texts() -> dict[str, str]:
    """Real text every Python ships: stdlib source (code) and the language reference (English prose)."""
    import pydoc_data.topics

    code = (STDLIB / "argparse.py").read_text(encoding="utf-8")
    start = code.index("class HelpFormatter(")
    prose = pydoc_data.topics.topics["assignment"] + pydoc_data.topics.topics["execmodel"]
    return {"code (argparse.py)": code[start:], "prose (language reference)": prose}


def make_cases(tok, prompt_tokens: int = PROMPT_TOKENS, continuation_tokens: int = CONTINUATION_TOKENS):
    """Per text: prompt and forced ids for each model, and the continuation's size in bytes."""
    from zip2zip_hf.evaluation.forced_decoding import canonical_continuation

    cases = {}
    for name, text in texts().items():
        base_ids = tok.base_ids([text], add_special_tokens=False)[0]
        prompt_base = base_ids[:prompt_tokens]
        continuation_base = base_ids[prompt_tokens : prompt_tokens + continuation_tokens]
        prompt_codes = tok.codec.encode(prompt_base)[0]
        codes = canonical_continuation(tok.codec, prompt_codes, continuation_base)
        continuation_text = tok.base_tokenizer.decode(continuation_base)
        cases[name] = {
            "base": (prompt_base, continuation_base),
            "zip2zip": (prompt_codes, codes),
            "bytes": len(continuation_text.encode("utf-8")),
            "base_tokens": len(continuation_base),
            "text": continuation_text,
        }
    return cases


def run(model, prompt: list[int], forced: list[int], zip2zip: bool):
    import torch
    from transformers import LogitsProcessorList

    input_ids = torch.tensor([prompt])
    processor = ForceIds(forced, len(prompt))
    kwargs = dict(
        max_new_tokens=len(forced),
        do_sample=False,
        logits_processor=LogitsProcessorList([processor]),
        attention_mask=torch.ones_like(input_ids),
        pad_token_id=model.generation_config.pad_token_id or 0,
    )
    if zip2zip:
        kwargs["return_hypertokens"] = True
    elapsed, out = timed(model.generate, input_ids, **kwargs)
    assert out[0, len(prompt) :].tolist() == forced, "the model did not write the forced ids"
    return elapsed


def profile(model, prompt, forced, zip2zip: bool, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run(model, prompt, forced, zip2zip)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    steps = len(forced)
    # Per-step milliseconds of the functions that matter, from cumulative times.
    rows = []
    for (filename, line, function), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        rows.append((cumtime, tottime, calls, f"{Path(filename).name}:{line}({function})"))
    rows.sort(reverse=True)
    lines = [f"{'cum ms/step':>11} {'own ms/step':>11} {'calls':>7}  function"]
    for cumtime, tottime, calls, name in rows[:top]:
        lines.append(f"{cumtime / steps * 1e3:11.2f} {tottime / steps * 1e3:11.2f} {calls:7d}  {name}")
    lines.append("")
    lines.append("by own time:")
    rows.sort(key=lambda r: r[1], reverse=True)
    for cumtime, tottime, calls, name in rows[:top]:
        lines.append(f"{cumtime / steps * 1e3:11.2f} {tottime / steps * 1e3:11.2f} {calls:7d}  {name}")
    return "\n".join(lines)


def breakdown(model, prompt, forced) -> str:
    """Wall ms per decoding step inside the zip2zip forward, by part (timers around each piece)."""
    import torch

    from zip2zip_hf import modeling_zip2zip
    from zip2zip_hf.hyper_state import HyperState

    totals: dict[str, float] = {}

    def with_timer(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    patches = [
        (model, "forward", "Zip2ZipForCausalLM.forward (all)"),
        (model, "_embed_block", "  _embed_block (consume, input side, embeddings)"),
        (HyperState, "consume", "    HyperState.consume (codebooks, legal sets, positions)"),
        (model.input_hyper_encoder, "forward", "    input hyper-encoder"),
        (model._decoder(), "forward", "  base model's decoder"),
        (model, "_output_vectors", "  _output_vectors (new entries and provisional contents)"),
        (model._output_hyper_encoder(), "forward", "    output hyper-encoder"),
        (modeling_zip2zip, "widen_logits", "  widen_logits (hyper logits, masks, concat to V+K)"),
    ]
    saved = [(owner, attr, owner.__dict__.get(attr)) for owner, attr, _ in patches]
    for owner, attr, name in patches:
        setattr(owner, attr, with_timer(name, getattr(owner, attr)))
    original_generate = model.generate
    try:
        start = time.perf_counter()
        with torch.no_grad():
            run(model, prompt, forced, zip2zip=True)
        totals["generate (all)"] = time.perf_counter() - start
    finally:
        for owner, attr, value in saved:
            if value is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
    assert model.generate == original_generate
    steps = len(forced)
    lines = [f"{'ms/step':>8}  part ({steps} steps, prefill included)"]
    for name in ["generate (all)"] + [name for _, _, name in patches]:
        lines.append(f"{totals.get(name, 0.0) / steps * 1e3:8.2f}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--prompt-tokens", type=at_least(1), default=PROMPT_TOKENS, help="base tokens of prompt")
    parser.add_argument(
        "--continuation-tokens", type=at_least(1), default=CONTINUATION_TOKENS, help="base tokens to write"
    )
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also profile one generation per model")
    parser.add_argument("--top", type=at_least(1), default=30, help="functions listed by --profile")
    args = parser.parse_args()

    import torch

    from zip2zip_hf import Zip2ZipForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = Zip2ZipForCausalLM.from_base_pretrained(smollm2(), max_codebook_size=2048, max_subtokens=4)
    model.eval()
    base = model.language_model  # the very same weights, as a plain HF model
    cases = make_cases(tok, args.prompt_tokens, args.continuation_tokens)
    load = os.getloadavg()

    first = cases[next(iter(cases))]
    for variant, target in (("zip2zip", model), ("base", base)):  # warm up
        prompt, forced = first[variant]
        run(target, prompt, forced[:8], zip2zip=variant == "zip2zip")

    results = {}
    for name, case in cases.items():
        times = {"base": [], "zip2zip": []}
        for _ in range(args.repeats):
            times["zip2zip"].append(run(model, *case["zip2zip"], zip2zip=True))
            times["base"].append(run(base, *case["base"], zip2zip=False))
        # Sanity: the zip2zip model's forced ids decode to exactly the continuation.
        prompt, codes = case["zip2zip"]
        decoded = tok.codec.decode(prompt + codes)[0][len(tok.codec.decode(prompt)[0]) :]
        assert decoded == case["base"][1], "the canonical continuation does not decode to the text"
        results[name] = {variant: statistics.median(t) for variant, t in times.items()}

    print(
        f"SmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} torch threads), K=2048, M=4, "
        f"{args.prompt_tokens}-token prompt, {args.continuation_tokens}-token forced continuation, "
        f"median of {args.repeats}; load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n"
    )
    rows = []
    for name, case in cases.items():
        for variant in ("base", "zip2zip"):
            steps = len(case[variant][1])
            wall = results[name][variant]
            ratio = results[name]["base"] / results[name]["zip2zip"]
            rows.append(
                (
                    name,
                    variant,
                    steps,
                    f"{wall:.2f}",
                    f"{wall / steps * 1e3:.1f}",
                    f"{case['bytes'] / wall:.0f}",
                    f"{ratio:.2f}x" if variant == "zip2zip" else "",
                )
            )
    headers = ("text", "model", "steps", "wall (s)", "ms / step", "bytes / s", "zip2zip / base (bytes/s)")
    print(markdown_table(headers, rows, numeric_from=2))
    sizes = [f"{n}: {c['bytes']} bytes, {c['base_tokens']} base tokens" for n, c in cases.items()]
    print(f"\n({'; '.join(sizes)})")

    if args.profile:
        name = next(iter(cases))
        for variant, target in (("base", base), ("zip2zip", model)):
            print(f"\n### cProfile, {variant}, {name} ({len(cases[name][variant][1])} steps)\n")
            print(profile(target, *cases[name][variant], zip2zip=variant == "zip2zip", top=args.top))
        print(f"\n### Timers inside the zip2zip forward, {name}\n")
        print(breakdown(model, *cases[name]["zip2zip"]))


if __name__ == "__main__":
    main()
