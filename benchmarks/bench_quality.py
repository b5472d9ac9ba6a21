"""Quality at equal wall-clock budget: uptraining recipes for zip2zip against a plain LoRA control.

Every arm starts from the real SmolLM2-135M-Instruct and trains for the same ``--budget`` seconds
(training steps only; evaluations are not counted) on the same windows of text: CPython
standard-library sources cut into windows of ``--window`` base tokens, shuffled once, ``--batch-size``
windows a step. The control reads them as base ids; zip2zip arms read the same windows compressed
(fewer ids, so faster steps and more text within the budget). The learning rate follows the budget:
linear warm-up over the first ``warmup`` share of it, then a cosine to zero at its end. Weights are
float32; on CUDA the steps run under bf16 autocast.

At ``--checkpoints`` evenly spaced times (and before training) every arm is scored on the held-out
files of the demo (argparse, textwrap, difflib, json/encoder, csv; the first ``--eval-bytes`` of them
together) with `zip2zip_hf.evaluation.score_texts`: bits per byte, the one measure that compares
models whose tokens differ. At the end each zip2zip arm writes a greedy continuation of a held-out
file: steps per byte of what it wrote against base tokens per byte of the same text.

With ``--text unseen`` the arms train on the broad corpus of everything installed
(`zip2zip_hf.tools.corpus.build_corpus`) and are scored on the held-out text of other sources, every
kind together (`unseen_held_out`): the comparison that picks a recipe for text nobody trained on.
``--seeds 0 1`` runs every arm once per seed (the seed shuffles the windows and starts the adapter).

Prints one table per checkpoint time (ratios against the control at that time) and saves the curves
as JSON and, with matplotlib, a PNG (``--plot``).

    python benchmarks/bench_quality.py [--budget 150] [--arms lora zip2zip ...] [--device cuda]
    python benchmarks/bench_quality.py --text unseen --arms zip2zip-encoder-lr0.2x distill-span \\
        --budget 1200 --seeds 0 1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from _common import at_least, markdown_table, output_file, positive_number, smollm2


@dataclass(frozen=True)
class Recipe:
    """One arm. ``lora_r=None`` finetunes every weight; ``encoder_lr`` (zip2zip) is the hyper-encoders'
    learning rate (default: ``lr``, the recipe before the library's default became a fifth of it)."""

    compressed: bool
    lr: float = 5e-4
    encoder_lr: float | None = None
    lora_r: int | None = 16
    warmup: float = 0.1
    input_residual: str | None = None  # the fresh input encoder's start (None: from_base's default)
    distillation: dict | None = None  # `DistillationConfig` fields: the base model teaches (None: CE only)


RECIPES = {
    "lora": Recipe(compressed=False),
    "zip2zip": Recipe(compressed=True),
    "zip2zip-encoder-lr4x": Recipe(compressed=True, encoder_lr=2e-3),
    "zip2zip-encoder-lr0.2x": Recipe(compressed=True, encoder_lr=1e-4),
    "zip2zip-frozen-encoders": Recipe(compressed=True, encoder_lr=0.0),
    "zip2zip-lr2x": Recipe(compressed=True, lr=1e-3),
    "zip2zip-r64": Recipe(compressed=True, lora_r=64),
    "zip2zip-r64-encoder-lr0.2x": Recipe(compressed=True, lora_r=64, encoder_lr=1e-4),
    "zip2zip-full": Recipe(compressed=True, lr=5e-5, encoder_lr=5e-4, lora_r=None),
    "zip2zip-mean-start": Recipe(compressed=True, input_residual="mean"),
    # Self-distillation (zip2zip_hf.finetuning.distillation): the LoRA-free base model reads the base ids.
    "distill-span": Recipe(compressed=True, encoder_lr=1e-4, distillation={"span": 1.0}),
    "distill-span-naive": Recipe(compressed=True, encoder_lr=1e-4, distillation={"span": 1.0, "correction": False}),
    "distill-span-marginal": Recipe(compressed=True, encoder_lr=1e-4, distillation={"span": 1.0, "marginal": 1.0}),
    "distill-span-hidden": Recipe(compressed=True, encoder_lr=1e-4, distillation={"span": 1.0, "hidden": 1.0}),
    "distill-all": Recipe(
        compressed=True, encoder_lr=1e-4, distillation={"span": 1.0, "marginal": 1.0, "hidden": 1.0}
    ),
    "distill-only": Recipe(
        compressed=True, encoder_lr=1e-4, distillation={"ce": 0.0, "span": 1.0, "marginal": 1.0, "hidden": 1.0}
    ),
}

# About 15 minutes on 2 CPU cores at the default budget.
DEFAULT_ARMS = ["lora", "zip2zip-encoder-lr0.2x", "distill-span", "distill-span-hidden", "distill-all"]


@dataclass
class Curve:
    name: str
    recipe: Recipe
    seconds: list[float] = field(default_factory=list)
    bits_per_byte: list[float] = field(default_factory=list)
    steps_per_byte: list[float] = field(default_factory=list)
    base_mode_bits_per_byte: float | None = None  # a zip2zip arm's LoRA'd base model on base ids, at the end
    steps: list[int] = field(default_factory=list)
    text_bytes: list[int] = field(default_factory=list)
    generation: dict = field(default_factory=dict)


def load_arm(
    path: str, recipe: Recipe, device: torch.device, max_codebook_size: int, max_subtokens: int, seed: int = 0
):
    """``(model ready to train, tokenizer)`` for one arm, its new weights drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
    from zip2zip_hf.finetuning.training import default_lora_config, prepare_model_for_training

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not recipe.compressed:
        if recipe.lora_r is None:
            return base.to(device).train(), tokenizer
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=recipe.lora_r, lora_alpha=2 * recipe.lora_r, target_modules="all-linear"
        )
        return get_peft_model(base, lora).to(device).train(), tokenizer
    tokenizer = Zip2ZipTokenizer.from_base(tokenizer, max_codebook_size=max_codebook_size, max_subtokens=max_subtokens)
    settings = {} if recipe.input_residual is None else {"input_hyper_encoder_residual": recipe.input_residual}
    model = Zip2ZipForCausalLM.from_base(base, tokenizer, **settings)
    lora = None if recipe.lora_r is None else default_lora_config(model, r=recipe.lora_r)
    return prepare_model_for_training(model, lora).to(device), tokenizer


def optimizer_for(model, recipe: Recipe) -> torch.optim.Optimizer:
    from zip2zip_hf.finetuning.training import zip2zip_optimizer

    encoder_lr = recipe.encoder_lr if recipe.encoder_lr is not None else recipe.lr
    optimizer = zip2zip_optimizer(model, recipe.lr, encoder_lr, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    return optimizer


def set_learning_rate(optimizer, recipe: Recipe, progress: float) -> None:
    """Warm-up then cosine to zero, over the share of the budget spent."""
    if progress < recipe.warmup:
        scale = (progress + 1e-3) / recipe.warmup
    else:
        scale = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - recipe.warmup) / (1 - recipe.warmup))))
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * scale


def batch_of(windows: list[list[int]], tokenizer, collator, device: torch.device) -> dict:
    """A training batch: base ids for the control; for zip2zip arms the collator's batch (compressed
    ids, their codebooks, and what distillation needs), made inside the timed step."""
    if collator is not None:
        batch = collator([{"input_ids": tokenizer.codec.encode(w)[0]} for w in windows])
        return {
            k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()
        }
    rows = windows
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def evaluate(model, tokenizer, texts: list[str], window: int):
    """The `TextScore` of the held-out texts (bits per byte, steps per byte)."""
    from zip2zip_hf.evaluation import score_texts

    model.eval()
    score = score_texts(model, tokenizer, texts, window=window, batch_size=4)
    model.train()
    return score


def base_mode_bits_per_byte(model, path: str, texts: list[str], window: int) -> float:
    """A trained zip2zip arm's base LM (its LoRA on) reading base ids: what the adapter cost, apart
    from what compressed reading costs."""
    from transformers import AutoTokenizer

    language_model = (
        model.get_base_model().language_model if hasattr(model, "get_base_model") else model.language_model
    )
    return evaluate(language_model, AutoTokenizer.from_pretrained(path), texts, window).bits_per_byte


def greedy_steps_per_byte(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    """What one greedy continuation saves: its steps per byte against base tokens per byte of the same text."""
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False)
    written = out[0, encoded["input_ids"].shape[1] :].tolist()
    codes = out[0].tolist()
    base = tokenizer.codec.decode(codes)[0][len(tokenizer.codec.decode(encoded["input_ids"][0].tolist())[0]) :]
    n_bytes = len(tokenizer.base_tokenizer.decode(base).encode("utf-8"))
    return {"steps_per_byte": len(written) / n_bytes, "base_tokens_per_byte": len(base) / n_bytes, "bytes": n_bytes}


def train_arm(name: str, recipe: Recipe, args, windows: list[list[int]], held_out: list[str], prompt: str) -> Curve:
    from zip2zip_hf.finetuning.data import Zip2ZipDataCollator
    from zip2zip_hf.finetuning.distillation import DistillationConfig, Zip2ZipDistiller

    model, tokenizer = load_arm(
        args.model, recipe, args.device, args.max_codebook_size, args.max_subtokens, seed=args.seed
    )
    optimizer = optimizer_for(model, recipe)
    distiller = collator = None
    if recipe.compressed:
        collator = Zip2ZipDataCollator(tokenizer, padding_side="right", distillation=recipe.distillation is not None)
    if recipe.distillation is not None:
        distiller = Zip2ZipDistiller(DistillationConfig(**recipe.distillation))
    curve = Curve(name, recipe)
    marks = [args.budget * k / args.checkpoints for k in range(args.checkpoints + 1)]
    spent, step, text_bytes = 0.0, 0, 0
    decode = (lambda w: tokenizer.base_tokenizer.decode(w)) if recipe.compressed else tokenizer.decode
    while True:
        if spent >= marks[len(curve.seconds)]:
            curve.seconds.append(round(spent, 1))
            score = evaluate(model, tokenizer, held_out, args.window)
            curve.bits_per_byte.append(score.bits_per_byte)
            curve.steps_per_byte.append(score.steps_per_byte)
            curve.steps.append(step)
            curve.text_bytes.append(text_bytes)
            print(
                f"  {name}: {spent:6.0f} s, step {step:4d}, held-out bits/byte {score.bits_per_byte:.4f}, "
                f"steps/byte {score.steps_per_byte:.4f}",
                flush=True,
            )
            if len(curve.seconds) == len(marks):
                break
        chunk = [windows[(step * args.batch_size + i) % len(windows)] for i in range(args.batch_size)]
        start = time.perf_counter()
        set_learning_rate(optimizer, recipe, spent / args.budget)
        with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            batch = batch_of(chunk, tokenizer, collator, args.device)
            loss = distiller(model, batch)[0] if distiller else model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # waits for the device: the step's time is all in `spent`
        spent += time.perf_counter() - start
        text_bytes += sum(len(decode(w).encode("utf-8")) for w in chunk)
        step += 1
    if recipe.compressed:
        curve.base_mode_bits_per_byte = base_mode_bits_per_byte(model, args.model, held_out, args.window)
        curve.generation = greedy_steps_per_byte(model, tokenizer, prompt, args.new_tokens)
    return curve


def training_windows(path: str, window: int, max_chars: int, seed: int, text: str) -> list[list[int]]:
    """Windows of ``window`` base tokens of the training text, shuffled by ``seed``: the standard
    library's (``text="demo"``, ``max_chars`` of each kind), or the broad corpus (``"unseen"``)."""
    from transformers import AutoTokenizer

    from zip2zip_hf.tools.corpus import build_corpus, training_texts

    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = training_texts(max_chars) if text == "demo" else [t for ts in build_corpus().texts.values() for t in ts]
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows += [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]
    random.Random(seed).shuffle(windows)
    return windows


def held_out_texts(max_bytes: int | None, text: str) -> list[str]:
    """The same share of each held-out file, ``max_bytes`` in all: the demo's (``text="demo"``, 12,000
    bytes unless told), or the held-out text of other sources, every installed kind (``"unseen"``, the
    same bytes of each kind, `UNSEEN_BYTES` unless told)."""
    from zip2zip_hf.tools.corpus import UNSEEN_BYTES, UNSEEN_HELD_OUT, held_out_files, unseen_held_out

    if text == "unseen":
        held, absent = unseen_held_out(UNSEEN_BYTES if max_bytes is None else max_bytes // len(UNSEEN_HELD_OUT))
        if absent:
            print(f"held-out kinds absent here: {', '.join(f'{k} ({why})' for k, why in absent.items())}")
        return [part for kind in held.values() for part in kind.texts]
    files = [text for _, text in held_out_files()]
    share = (max_bytes or 12_000) // len(files)
    return [text.encode("utf-8")[:share].decode("utf-8", errors="ignore") for text in files]


def report(curves: list[Curve]) -> None:
    control = next((c for c in curves if not c.recipe.compressed), None)
    for k, seconds in enumerate(curves[0].seconds):
        rows = []
        for curve in curves:
            bits = curve.bits_per_byte[k]
            ratio = f"{bits / control.bits_per_byte[k]:.3f}" if control else "-"
            rows.append(
                [
                    curve.name,
                    curve.steps[k],
                    f"{curve.text_bytes[k] / 1e3:.0f}",
                    f"{bits:.4f}",
                    ratio,
                    f"{curve.steps_per_byte[k]:.4f}",
                    ""
                    if curve.base_mode_bits_per_byte is None or k < len(curve.seconds) - 1
                    else f"{curve.base_mode_bits_per_byte:.4f}",
                ]
            )
        against = control.name if control else "-"
        print(f"\nafter {seconds:.0f} s of training (held-out bits per byte; ratio = arm / {against})")
        headers = ["arm", "steps", "kB of text", "bits/byte", "ratio", "steps/byte", "base-mode bits/byte"]
        print(markdown_table(headers, rows))
    generated = [c for c in curves if c.generation]
    if generated:
        print("\ngreedy continuation of a held-out file after training")
        rows = [
            [
                c.name,
                c.generation["bytes"],
                f"{c.generation['steps_per_byte']:.4f}",
                f"{c.generation['base_tokens_per_byte']:.4f}",
                f"{1 - c.generation['steps_per_byte'] / c.generation['base_tokens_per_byte']:.1%}",
            ]
            for c in generated
        ]
        print(markdown_table(["arm", "bytes", "steps/byte", "base tokens/byte", "fewer steps"], rows))


def plot(curves: list[Curve], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print(f"not writing {path}: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for curve in curves:
        axes.plot(
            curve.seconds,
            curve.bits_per_byte,
            marker="o",
            label=curve.name,
            linestyle="-" if curve.recipe.compressed else "--",
        )
    axes.set_xlabel("training seconds")
    axes.set_ylabel("held-out bits per byte")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=sorted(RECIPES))
    parser.add_argument("--budget", type=positive_number, default=120.0, help="training seconds per arm (default 120)")
    parser.add_argument("--checkpoints", type=at_least(1), default=3, help="evaluations after the start (default 3)")
    parser.add_argument("--window", type=at_least(1), default=256, help="base tokens per training / held-out window")
    parser.add_argument("--batch-size", type=at_least(1), default=2)
    parser.add_argument(
        "--eval-bytes",
        type=at_least(1),
        default=None,
        help="held-out bytes scored (default 12000, or 3000 of each unseen kind)",
    )
    parser.add_argument("--train-chars", type=at_least(1), default=2_000_000)
    parser.add_argument("--new-tokens", type=at_least(1), default=96, help="greedy steps of the final generation")
    parser.add_argument("-K", dest="max_codebook_size", type=at_least(0), default=2048)
    parser.add_argument("-M", dest="max_subtokens", type=at_least(1), default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    parser.add_argument("--model", default=None, help="a base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--json", type=output_file, default="bench_quality.json", help="where to save the curves")
    parser.add_argument("--plot", type=output_file, default="bench_quality.png", help="where to save the PNG plot")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of every arm per seed")
    parser.add_argument(
        "--text",
        choices=["demo", "unseen"],
        default="demo",
        help="train on the standard library and score the demo's held-out files (demo), or train on the broad "
        "corpus and score the held-out text of other sources (unseen)",
    )
    args = parser.parse_args()
    args.device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = args.device.type == "cuda"
    args.model = args.model or smollm2()

    held_out = held_out_texts(args.eval_bytes, args.text)
    prompt = "".join(held_out[1].splitlines(keepends=True)[:30])
    hardware = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "CPU"
    title = (
        f"{args.budget:.0f} s per arm on {hardware} ({torch.get_num_threads()} threads); windows of {args.window} "
        f"base tokens, batch {args.batch_size}; {sum(map(len, held_out))} held-out chars ({args.text} text)"
    )
    print(title)
    curves = []
    for seed in args.seeds:
        args.seed = seed
        windows = training_windows(args.model, args.window, args.train_chars, seed, args.text)
        for name in args.arms:
            label = name if len(args.seeds) == 1 else f"{name} (seed {seed})"
            print(f"arm {label}: {RECIPES[name]}")
            curves.append(train_arm(label, RECIPES[name], args, windows, held_out, prompt))
    report(curves)
    with open(args.json, "w") as f:
        json.dump({"title": title, "curves": [{**asdict(c), "recipe": asdict(c.recipe)} for c in curves]}, f, indent=1)
    print(f"wrote {args.json}")
    plot(curves, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
