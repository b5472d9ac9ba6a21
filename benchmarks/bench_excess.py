"""Where the shipped zip2zip model's extra bits go, on the held-out text of other sources, kind by kind.

Each held-out file (`zip2zip_hf.tools.corpus.UNSEEN_HELD_OUT`, as `bench_unseen.py` reads it) is read
in one window of at most the shipped record's ``held_out.window`` base tokens, after a BOS token, by
the base model (base ids) and by the shipped zip2zip model (its canonical compressed ids). Each
compressed position's negative log-likelihood is set against the base's for the same base tokens
(a hypertoken's: the sum over its constituents); the difference, the *excess*, is summed by what the
position predicts (a base token, a hypertoken's first use in the window, a hypertoken used again)
and by what it was read after (a base token or a hypertoken), in bits per byte of the text: the first
three groups add up to zip2zip's bits per byte less the base's; the last overlaps them.

    python benchmarks/bench_excess.py [--bytes 3000] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from _common import at_least  # (sets the offline environment and this checkout's path)


GROUPS = ("base token", "hypertoken, first use", "hypertoken, again", "after a hypertoken")


def token_nats(model, ids: list[int]) -> list[float]:
    """The negative log-likelihood of each id after the first."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()


def excess_by_group(base, model, codec, prefix: int, base_ids: list[int]) -> tuple[Counter, float, float]:
    """``(excess per group, zip2zip nats, base nats)`` of one window of ``base_ids``."""
    base_nats = token_nats(base, [prefix, *base_ids])
    codes, codebook = codec.encode([prefix, *base_ids])
    zip_nats = token_nats(model, codes)
    excess, seen, after_hyper, start = Counter(), set(), False, 0
    for code, nats in zip(codes[1:], zip_nats):
        span = len(codebook.get_subtokens(code))  # an entry never changes once installed
        extra = nats - sum(base_nats[start : start + span])
        start += span
        if span == 1:
            excess["base token"] += extra
        else:
            excess["hypertoken, again" if code in seen else "hypertoken, first use"] += extra
            seen.add(code)
        if after_hyper:
            excess["after a hypertoken"] += extra
        after_hyper = span > 1
    return excess, sum(zip_nats), sum(base_nats)


def main() -> int:
    from zip2zip_hf.tools.corpus import UNSEEN_BYTES, unseen_held_out
    from zip2zip_hf.tools.embedded import load_named_model, shipped_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=at_least(1), default=UNSEEN_BYTES, help="held-out bytes of each kind")
    parser.add_argument("--threads", type=at_least(1), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unseen, absent = unseen_held_out(args.bytes)
    base, _ = load_named_model("smollm2")
    model, tokenizer = load_named_model("smollm2-zip2zip")
    window = shipped_record()["held_out"]["window"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    print(f"shipped smollm2-zip2zip, one window of at most {window} base tokens per held-out file")
    print("\n| kind | zip2zip / base | excess bits/byte | " + " | ".join(GROUPS) + " |")
    print("|---|---:|---:|" + "---:|" * len(GROUPS))
    for kind, held in unseen.items():
        excess, zip_total, base_total = Counter(), 0.0, 0.0
        for base_ids in tokenizer.base_ids(held.texts, add_special_tokens=False):
            part, zip_nats, base_nats = excess_by_group(base, model, tokenizer.codec, prefix, base_ids[:window])
            excess.update(part)
            zip_total, base_total = zip_total + zip_nats, base_total + base_nats
        bits = 1 / math.log(2) / held.bytes  # per nat
        by_group = " | ".join(f"{excess[g] * bits:+.4f}" for g in GROUPS)
        print(f"| {kind} | {zip_total / base_total:.3f} | {(zip_total - base_total) * bits:+.4f} | {by_group} |")
    for kind, why in absent.items():
        print(f"- {kind}: absent ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
