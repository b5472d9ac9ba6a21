"""Plot the held-out curve of an ``uptrain`` run from its ``uptrain.json`` (default: the shipped one).

    python benchmarks/plot_uptrain.py [--record PATH] [--out docs/uptrain_curve.png]

Held-out bits per byte of the zip2zip model against training seconds, with the base model's as a
line, and steps per byte on a second axis: the two numbers to read together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import output_file  # (puts this checkout's src/ on the path, offline)


def main() -> int:
    from zip2zip_hf.tools.embedded import EMBEDDED_ZIP2ZIP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", default=str(EMBEDDED_ZIP2ZIP / "uptrain.json"))
    parser.add_argument("--out", type=output_file, default="docs/uptrain_curve.png")
    args = parser.parse_args()
    record = json.loads(Path(args.record).read_text(encoding="utf-8"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, base = record["curve"], record["held_out"]["base"]["all"]
    minutes = [entry["training_seconds"] / 60 for entry in curve]
    figure, bits = plt.subplots(figsize=(7, 4.5))
    bits.plot(minutes, [e["held_out_bits_per_byte"] for e in curve], marker="o", label="zip2zip, bits/byte")
    bits.axhline(base["bits_per_byte"], linestyle="--", color="gray", label="base model, bits/byte")
    bits.set_xlabel(f"training minutes ({record['hardware']})")
    bits.set_ylabel("held-out bits per byte")
    steps = bits.twinx()
    steps.plot(minutes, [e["held_out_steps_per_byte"] for e in curve], color="tab:green", marker="s", label="zip2zip")
    steps.axhline(base["steps_per_byte"], linestyle=":", color="tab:green", label="base model")
    steps.set_ylabel("steps (tokens) per byte", color="tab:green")
    bits.set_title(
        f"uptrain: {record['steps']} steps, windows of {record['recipe']['window']}; held-out code and prose "
        f"({record['held_out']['window']}-token windows)",
        fontsize=9,
    )
    bits.grid(alpha=0.3)
    bits.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
