"""Speculative decoding over hypertokens: model calls per byte and bytes per second of an edited file.

The task is what prompt lookup is for: the prompt holds a standard-library module, and the model
writes it again with a small change (a renamed constant). Four ways to write that text with
SmolLM2-135M-Instruct (K=2048, M=4, a fresh attention hyper-encoder for zip2zip):

* base greedy, and base + transformers' own prompt lookup (``prompt_lookup_num_tokens``, with its
  default n-gram size and with ours, so the base gets its best setting);
* zip2zip greedy, and zip2zip + prompt lookup over hypertokens (drafts of the text, written as
  canonical compressed ids).

Forced decoding, not real: a logits processor makes each model write its own canonical ids of the
same edited text (a fresh zip2zip wrap writes hypertokens only when forced; a trained one writes the
canonical ids itself). Prompt lookup is exact, so every arm writes identical text, checked below; the
drafts are real, and so is what verifying them costs. Model calls are forwards of the model that
``generate`` is called on (the zip2zip model's own, not its base model's inside it).

Reported: model calls, calls per byte and bytes per second of the continuation (wall time of the
whole ``generate`` call, prefill included, median of ``--repeats`` runs that alternate the arms),
with ratios against base greedy measured in the same run.

    python benchmarks/bench_speculative.py [--repeats 3] [--module colorsys.py] [--lookup 10]
                                           [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import os

from _common import STDLIB, ForceIds, alternating_medians, at_least, markdown_table, smollm2


RENAME = ("ONE_SIXTH", "SIXTH")
LOOKUP_TOKENS = 10
OUR_NGRAM = 8  # the n-gram size zip2zip's prompt lookup uses by default (DEFAULT_MAX_MATCHING_NGRAM)


def task(module: str, rename: tuple[str, str]) -> tuple[str, str]:
    """The prompt (the module, then a request to rewrite it) and the continuation (the edited module)."""
    source = (STDLIB / module).read_text(encoding="utf-8")
    old, new = rename
    if old not in source:
        raise SystemExit(f"{module} has no {old!r} to rename")
    prompt = f"# {module}\n{source}\n# The same file with {old} renamed to {new}:\n"
    return prompt, source.replace(old, new)


def arms(model, tok, prompt: str, continuation: str, lookup: int) -> dict[str, dict]:
    """Per arm: the model, its prompt ids, the ids it is forced to write, and generate's extra keywords."""
    from transformers import GenerationConfig

    from zip2zip_hf.evaluation.forced_decoding import canonical_continuation

    base_prompt = tok.base_ids([prompt])[0]
    base_text = tok.base_ids([continuation], add_special_tokens=False)[0]
    codes_prompt = tok.codec.encode(base_prompt)[0]
    codes_text = canonical_continuation(tok.codec, codes_prompt, base_text)
    base, zip2zip = (model.language_model, base_prompt, base_text), (model, codes_prompt, codes_text)
    default_ngram = GenerationConfig().max_matching_ngram_size or 2  # what transformers uses when unset
    return {
        "base greedy": (*base, {}),
        f"base + prompt lookup (n-gram {default_ngram})": (*base, {"prompt_lookup_num_tokens": lookup}),
        f"base + prompt lookup (n-gram {OUR_NGRAM})": (
            *base,
            {"prompt_lookup_num_tokens": lookup, "max_matching_ngram_size": OUR_NGRAM},
        ),
        "zip2zip greedy": (*zip2zip, {"return_hypertokens": True}),
        "zip2zip + prompt lookup": (*zip2zip, {"return_hypertokens": True, "prompt_lookup_num_tokens": lookup}),
    }


def generate(model, prompt: list[int], forced: list[int], extra: dict, device):
    import torch
    from transformers import LogitsProcessorList

    input_ids = torch.tensor([prompt], device=device)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=len(forced),
        do_sample=False,
        logits_processor=LogitsProcessorList([ForceIds(forced, len(prompt))]),
        pad_token_id=model.generation_config.pad_token_id or 0,
        **extra,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, len(prompt) :].tolist()


def count_calls(model, function) -> tuple[int, object]:
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = function()
    finally:
        handle.remove()
    return len(calls), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--module", default="colorsys.py", help="the standard-library module to rewrite")
    parser.add_argument("--rename", nargs=2, default=RENAME, metavar=("OLD", "NEW"), help="the edit")
    parser.add_argument("--lookup", type=at_least(1), default=LOOKUP_TOKENS, help="prompt_lookup_num_tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from zip2zip_hf import Zip2ZipForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model, tok = Zip2ZipForCausalLM.from_base_pretrained(smollm2(), max_codebook_size=2048, max_subtokens=4)
    model.to(device=device, dtype=dtype).eval()
    prompt, continuation = task(args.module, tuple(args.rename))
    size = len(continuation.encode("utf-8"))
    cases = arms(model, tok, prompt, continuation, args.lookup)
    load = os.getloadavg()

    runs = {name: functools.partial(generate, *case, device=device) for name, case in cases.items()}
    calls = {}
    for name, run in runs.items():  # a checked run of each, counting its model calls
        calls[name], written = count_calls(cases[name][0], run)
        assert written == cases[name][2], f"{name} did not write the forced ids"
    seconds = dict(zip(runs, alternating_medians(list(runs.values()), args.repeats)))

    print(
        f"SmolLM2-135M-Instruct, {device.type} ({torch.get_num_threads()} torch threads), {dtype}, K=2048, M=4; "
        f"{args.module} ({size} bytes, {len(cases['base greedy'][2])} base tokens) rewritten with "
        f"{args.rename[0]} -> {args.rename[1]} after a {len(cases['base greedy'][1])}-token prompt; forced "
        f"decoding, prompt_lookup_num_tokens={args.lookup}; median of {args.repeats}; "
        f"load average before: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n"
    )
    base_calls, base_rate = calls["base greedy"] / size, size / seconds["base greedy"]
    rows = []
    for name, (_, _, forced, _) in cases.items():
        rate = size / seconds[name]
        rows.append(
            (
                name,
                len(forced),
                calls[name],
                f"{calls[name] / size:.4f}",
                f"{base_calls / (calls[name] / size):.2f}x",
                f"{seconds[name]:.2f}",
                f"{rate:.0f}",
                f"{rate / base_rate:.2f}x",
            )
        )
    headers = ("arm", "ids written", "model calls", "calls / byte", "fewer calls", "wall (s)", "bytes / s", "speed-up")
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
