"""Quality on text of other sources than training: the shipped zip2zip SmolLM2-135M, kind by kind.

Each kind of held-out text (`zip2zip_hf.tools.corpus.UNSEEN_HELD_OUT`: code by language,
configuration, prose by kind; a few KB each, from sources no training run reads) is scored three ways
with `zip2zip_hf.evaluation.score_kinds`, in windows of the shipped record's ``held_out.window`` base
tokens:

* ``base``: SmolLM2-135M-Instruct reading base ids;
* ``zip2zip``: the shipped model (``smollm2-zip2zip``) reading its canonical compressed ids;
* ``base mode``: the shipped model's own base LM (the LoRA merged) reading base ids, no hypertokens.

zip2zip / base is what the zip2zip model costs; base mode / base is what the adapter did to the base
model (drift); the difference is what reading and writing hypertokens costs. ``--in-domain`` adds
the held-out text of the training domain (the standard-library files and pydoc sections). A kind
whose source is not installed (Go: the ``corpus`` extra; Rust: Debian's ``rust-src``) is reported
absent.

    python benchmarks/bench_unseen.py [--bytes 3000] [--in-domain] [--json bench_unseen.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import at_least, output_file  # (sets the offline environment and this checkout's path)


def main() -> int:
    from zip2zip_hf.evaluation.scoring import kinds_table, score_kinds
    from zip2zip_hf.tools.corpus import UNSEEN_BYTES, held_out_texts, unseen_held_out
    from zip2zip_hf.tools.embedded import load_named_model, shipped_record

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=at_least(1), default=UNSEEN_BYTES, help="held-out bytes of each kind")
    parser.add_argument("--in-domain", action="store_true", help="also the held-out text of the training domain")
    parser.add_argument("--threads", type=at_least(1), default=None)
    parser.add_argument("--json", type=output_file, default=None, help="where to save the scores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    unseen, absent = unseen_held_out(args.bytes)
    groups = {"other sources": {kind: held.texts for kind, held in unseen.items()}}
    if args.in_domain:
        groups["training domain"] = {f"stdlib {kind}": parts for kind, parts in held_out_texts().items()}
    base, base_tokenizer = load_named_model("smollm2")
    model, tokenizer = load_named_model("smollm2-zip2zip")
    window = shipped_record()["held_out"]["window"]
    start = time.perf_counter()
    scores = {}
    for group, texts in groups.items():
        for kind, by_mode in score_kinds(texts, base, base_tokenizer, model, tokenizer, window).items():
            scores[f"all, {group}" if kind == "all" else kind] = by_mode
    seconds = time.perf_counter() - start
    print(f"shipped smollm2-zip2zip on {torch.get_num_threads()} CPU threads, windows of {window} base tokens")
    for kind, held in unseen.items():
        print(f"- {kind}: {held.about} ({', '.join(held.files)})")
    for kind, why in absent.items():
        print(f"- {kind}: absent ({why})")
    print()
    print(kinds_table(scores, markdown=True))
    print(f"\nscored in {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "threads": torch.get_num_threads(),
                    "window": window,
                    "sources": {k: {"source": h.source, "files": h.files} for k, h in unseen.items()},
                    "absent": absent,
                    "scores": {k: {m: s.to_dict() for m, s in v.items()} for k, v in scores.items()},
                },
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
