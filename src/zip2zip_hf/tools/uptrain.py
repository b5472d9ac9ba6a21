"""``python -m zip2zip_hf uptrain``: train the shipped SmolLM2-135M zip2zip adapter, offline, resumable.

The recipe (`zip2zip_hf.tools.uptrain_recipe.UptrainRecipe`, saved with the model): LoRA on every linear
layer of the base model plus both hyper-encoders, trained with
`zip2zip_hf.finetuning.distillation.Zip2ZipDistillationTrainer`, whose terms say how much the base model
itself (its LoRA disabled, reading the base ids) teaches. By default the loss is cross-entropy on
canonical ids alone: on 2 CPU cores no teacher term has yet paid for the teacher's forward
(``benchmarks/bench_quality.py``); ``--recipe`` switches them on. The data is what every Python ships:
the standard library's sources (code) and the language reference that ``pydoc`` carries (English
prose); with ``"corpus": "broad"`` in the recipe it is code and prose of everything installed, by kind
(`zip2zip_hf.tools.corpus.build_corpus`). Either is cut into windows of ``--window`` base tokens, each
read after one BOS token as `zip2zip_hf.evaluation` reads held-out text; the record lists its sources
and their bytes. Held out from training: the demo's five standard-library files and eight reference
sections, and the held-out text of other sources (`zip2zip_hf.tools.corpus.UNSEEN_HELD_OUT`), scored
at the end three ways: the base model, the zip2zip model, and the zip2zip model's own base LM reading
base ids (`zip2zip_hf.evaluation.score_kinds`).

The run is a ``transformers.Trainer`` run in ``--output-dir`` (checkpoints every ``--save-steps``,
whole or not at all; started again, it resumes from the newest intact one, never with another recipe:
`zip2zip_hf.tools.uptrain_folders`), on one process or, under ``torchrun`` / ``accelerate launch``,
several, with DDP or with FSDP2 (``--fsdp``; `zip2zip_hf.tools.uptrain_processes`). The held-out bits
per byte and steps per byte are logged every ``--eval-steps`` (`HeldOutLogger`). At the end the
adapter is written to ``--export`` (default: ``OUTPUT_DIR/adapter``) in bfloat16 safetensors with
``uptrain.json``, how it was made; ``--replace-shipped-adapter`` (what ``make uptrain`` passes) is the
one way to write the shipped adapter. Every argument is checked, and every folder tried for writing,
before any training (`zip2zip_hf.tools.uptrain_checks`).

This module is the command, step by step (`run_uptrain`), and the held-out scoring it records. The
tests replace ``export``, ``held_out_texts``, ``unseen_held_out`` and ``EMBEDDED_ZIP2ZIP`` on this
module, so each is looked up here where it is used.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from tqdm.auto import tqdm
from transformers import TrainerCallback

from .corpus import HELD_OUT, HELD_OUT_CODE_BYTES, HELD_OUT_PROSE_BYTES, held_out_texts, unseen_held_out
from .embedded import EMBEDDED_BASE_NAME, EMBEDDED_ZIP2ZIP
from .report import PROSE_TOPICS, CLIError
from .uptrain_arguments import add_uptrain_arguments
from .uptrain_checks import CheckedRun, checked_run, load_base
from .uptrain_data import training_rows
from .uptrain_folders import (
    KEEP_CHECKPOINTS,
    atomic_checkpoint_trainer,
    check_fits,
    checkpoint_damage,
    export,
    set_aside,
)
from .uptrain_processes import fsdp_arguments, gathered_adapter_weights, sharding_trainer
from .uptrain_recipe import UptrainRecipe, parse_recipe, recipe_differences


__all__ = [
    "UptrainRecipe",
    "add_uptrain_arguments",
    "checkpoint_damage",
    "export",
    "parse_recipe",
    "recipe_differences",
    "run_uptrain",
    "score_held_out",
    "score_unseen",
]


def score_held_out(model, tokenizer, window: int) -> dict:
    """Bits per byte and steps per byte on each held-out kind and on both together."""
    from ..evaluation.scoring import combined_score, score_texts

    texts = held_out_texts()
    was_training = model.training
    model.eval()
    scores = {kind: score_texts(model, tokenizer, parts, window=window) for kind, parts in texts.items()}
    model.train(was_training)
    out = {kind: _rounded(s.to_dict()) for kind, s in scores.items()}
    together = combined_score(list(scores.values())).to_dict()
    out["all"] = _rounded({name: together[name] for name in ("bits_per_byte", "steps_per_byte", "bytes")})
    return out


def score_unseen(base, base_tokenizer, model, tokenizer, window: int, modes=("base", "zip2zip", "base_mode")) -> dict:
    """The held-out text of other sources (`unseen_held_out`), each kind scored three ways
    (`zip2zip_hf.evaluation.score_kinds`: base, zip2zip, base mode; or those of ``modes``), as
    ``uptrain.json`` keeps it."""
    from ..evaluation.scoring import score_kinds

    texts, absent = unseen_held_out()
    parts = {kind: t.texts for kind, t in texts.items()}
    scores = score_kinds(parts, base, base_tokenizer, model, tokenizer, window, modes=modes)
    return {
        "window": window,
        "texts": {kind: {"source": t.source, "about": t.about, "files": t.files} for kind, t in texts.items()},
        "absent": absent,
        "scores": {
            kind: {mode: _rounded(s.to_dict()) for mode, s in by_mode.items()} for kind, by_mode in scores.items()
        },
    }


def _merged(first: dict, second: dict) -> dict:
    """Two `score_unseen` records of the same texts and other modes as one."""
    scores = {kind: {**first["scores"][kind], **second["scores"][kind]} for kind in first["scores"]}
    return {**first, "scores": scores}


def _rounded(numbers: dict) -> dict:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in numbers.items()}


# ---------------------------------------------------------------------- the run


def run_uptrain(args) -> int:
    """The command: everything checked, the data built, the model wrapped and trained (or resumed), its
    record written with the adapter by process 0."""
    run = checked_run(args, EMBEDDED_ZIP2ZIP)  # looked up here: the tests replace it
    _report_start(run, args.fsdp)
    base_tokenizer, tokenizer, rows, data = _training_data(run, args.threads)
    base = _base_model(run)
    before = _score_base(run, base, base_tokenizer)
    model = _model_to_train(run, base, tokenizer)
    held_out = HeldOutLogger(tokenizer, run.recipe.eval_window, args.eval_steps)
    trainer = _trainer(args, run, base, model, tokenizer, rows, held_out)
    steps, weights = _train(args, run, trainer, model, held_out)
    record = _record(
        run, data, steps, held_out, before, model=model, tokenizer=tokenizer, base_tokenizer=base_tokenizer
    )
    if run.rank != 0:  # process 0 writes the export
        return 0
    return _export(args, run, model, record, weights)


def _report_start(run: CheckedRun, fsdp: bool) -> None:
    """Set the damaged checkpoints aside (process 0), and say where the run starts and on what."""
    for checkpoint, why in run.damaged if run.rank == 0 else ():
        aside = set_aside(checkpoint)
        print(f"zip2zip_hf uptrain: warning: skipped {checkpoint}: {why}; moved it to {aside.name}", file=sys.stderr)
    if run.resume is not None:
        run.say(f"resuming from {run.resume} (step {run.resumed_step})", flush=True)
    elif run.damaged:
        run.say(f"no intact checkpoint in {run.output_dir}: starting from step 0", flush=True)
    if run.world > 1:
        run.say(
            f"{run.world} processes ({'FSDP2' if fsdp else 'DDP'}): {run.per_device} rows each per forward, "
            f"{run.accumulation} forward(s) per step, {run.recipe.batch_size} rows per step",
            flush=True,
        )


def _training_data(run: CheckedRun, threads: int | None):
    """``(base tokenizer, zip2zip tokenizer, training rows, what they hold)``."""
    import torch
    from transformers import AutoTokenizer

    from ..tokenization_zip2zip import Zip2ZipTokenizer

    recipe = run.recipe
    if threads:
        torch.set_num_threads(threads)
    base_tokenizer = load_base(run.base_path, "a tokenizer", AutoTokenizer.from_pretrained)
    tokenizer = Zip2ZipTokenizer.from_base(
        base_tokenizer, max_codebook_size=recipe.max_codebook_size, max_subtokens=recipe.max_subtokens
    )
    tokenizer.padding_side = "right"
    rows, data = training_rows(tokenizer, recipe)
    if not rows:
        raise CLIError(
            f"--recipe: no training windows (max_chars {recipe.max_chars} holds no window of {recipe.window} "
            "base tokens)"
        )
    run.say(f"training rows: {data['rows']} ({data['windows']} windows of {recipe.window} base tokens)", flush=True)
    run.say(f"training text ({data['corpus']} corpus), bytes: {json.dumps(data['bytes'])}", flush=True)
    return base_tokenizer, tokenizer, rows, data


def _base_model(run: CheckedRun):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(run.recipe.seed)  # before the load: the wrap's new weights follow from the seed
    return load_base(
        run.base_path, "a causal LM", lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    )


def _score_base(run: CheckedRun, base, base_tokenizer) -> dict:
    """The base model's held-out scores (``base``) and its scores on the text of other sources
    (``unseen``), taken before the wrap: LoRA goes into these very modules."""
    window = run.recipe.eval_window
    base_scores = score_held_out(base, base_tokenizer, window)
    run.say(f"base model, held-out: {json.dumps(base_scores['all'])}", flush=True)
    return {"base": base_scores, "unseen": score_unseen(base, base_tokenizer, None, None, window, modes=("base",))}


def _model_to_train(run: CheckedRun, base, tokenizer):
    """``base`` wrapped as a zip2zip model with the recipe's LoRA, checked against the checkpoint it resumes."""
    from ..finetuning.training import default_lora_config, prepare_model_for_training
    from ..modeling_zip2zip import Zip2ZipForCausalLM

    model = Zip2ZipForCausalLM.from_base(base, tokenizer, **run.recipe.model)
    model = prepare_model_for_training(model, default_lora_config(model, r=run.recipe.lora_r))
    if run.resume is not None:
        check_fits(model, run.resume)
    return model


def _trainer_class(recipe: UptrainRecipe, base_id: str, commands: list[str], fsdp: bool):
    """The distillation trainer, its checkpoints atomic and recording the recipe, the base and the commands
    that trained the run, sharding with ``--fsdp``."""
    from ..finetuning.distillation import Zip2ZipDistillationTrainer
    from ..finetuning.training import zip2zip_optimizer

    atomic = atomic_checkpoint_trainer(
        Zip2ZipDistillationTrainer, {"recipe": asdict(recipe), "base": base_id, "commands": commands}
    )

    class UptrainTrainer(sharding_trainer(atomic, fsdp)):
        def create_optimizer(self, *args, **kwargs):
            # Made here, not passed in: under FSDP the Trainer builds it over the sharded parameters.
            if self.optimizer is None:
                self.optimizer = zip2zip_optimizer(
                    self.model, recipe.learning_rate, recipe.encoder_learning_rate, weight_decay=0.0
                )
            return self.optimizer

    return UptrainTrainer


def _trainer(args, run: CheckedRun, base, model, tokenizer, rows: list[dict], held_out: HeldOutLogger):
    import torch

    from ..finetuning.data import Zip2ZipDataCollator
    from ..finetuning.distillation import DistillationConfig
    from ..finetuning.training import FSDPSharedWeightsCallback, training_arguments

    recipe, on_cpu = run.recipe, not torch.cuda.is_available()
    trainer = _trainer_class(recipe, run.base_id, run.commands, args.fsdp)(
        model=model,
        args=training_arguments(
            str(run.output_dir),
            per_device_train_batch_size=run.per_device,
            gradient_accumulation_steps=run.accumulation,
            max_steps=args.steps,
            learning_rate=recipe.learning_rate,
            warmup_steps=max(1, round(recipe.warmup_ratio * args.steps)),
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            logging_steps=args.logging_steps,
            save_steps=args.save_steps,
            save_total_limit=KEEP_CHECKPOINTS,
            seed=recipe.seed,
            use_cpu=on_cpu,
            disable_tqdm=False,
            # Several processes: DDP (gloo on CPUs, NCCL on GPUs), or FSDP2 with --fsdp. The model uses
            # every trainable parameter every step (both hyper-encoders included), so DDP looks for no
            # unused ones.
            ddp_backend="gloo" if run.world > 1 and on_cpu else None,
            ddp_find_unused_parameters=False,
            **(fsdp_arguments(base) if args.fsdp else {}),
        ),
        train_dataset=rows,
        data_collator=Zip2ZipDataCollator(tokenizer, distillation=True),
        callbacks=[FSDPSharedWeightsCallback(), held_out],
        distillation=DistillationConfig(**recipe.distillation),
    )
    held_out.trainer = trainer
    return trainer


def _train(args, run: CheckedRun, trainer, model, held_out: HeldOutLogger) -> tuple[int, dict | None]:
    """``(the step trained to, the adapter's weights gathered on process 0 under FSDP, else None)``."""
    if run.resume is not None and run.resumed_step == args.steps:
        # The Trainer would train one more step; the run is done, so only its export is (re)written.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        run.say(f"{run.resume} is at step {args.steps} already: nothing to train, exporting it", flush=True)
        set_peft_model_state_dict(model, load_file(str(run.resume / "adapter_model.safetensors")))
        state = json.loads((run.resume / "trainer_state.json").read_text(encoding="utf-8"))
        held_out.restore(state.get("log_history", []))
        return run.resumed_step, None
    trainer.train(resume_from_checkpoint=str(run.resume) if run.resume is not None else None)
    weights = gathered_adapter_weights(trainer)  # every process takes part; process 0 gets them
    return trainer.state.global_step, weights


def _record(
    run: CheckedRun, data: dict, steps: int, held_out: HeldOutLogger, before: dict, *, model, tokenizer, base_tokenizer
) -> dict:
    """``uptrain.json``: how the adapter was made, and its held-out scores beside the base model's (``before``)."""
    import torch

    recipe = run.recipe
    return {
        "model": recipe.model,
        "compression": {"max_codebook_size": recipe.max_codebook_size, "max_subtokens": recipe.max_subtokens},
        "recipe": asdict(recipe),
        "data": data,
        "steps": steps,
        "commands": run.commands,
        "training_seconds": round(held_out.seconds, 3),
        "hardware": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{torch.get_num_threads()} CPU threads",
        "held_out": {
            "window": recipe.eval_window,
            "texts": f"the first {HELD_OUT_CODE_BYTES} bytes of each of {', '.join(HELD_OUT)}; the first "
            f"{HELD_OUT_PROSE_BYTES} bytes of the pydoc sections {', '.join(PROSE_TOPICS)}",
            "base": before["base"],
            "zip2zip": held_out.scores_at(steps) or score_held_out(model, tokenizer, recipe.eval_window),
            "unseen": _merged(
                before["unseen"],
                score_unseen(None, base_tokenizer, model, tokenizer, recipe.eval_window, ("zip2zip", "base_mode")),
            ),
        },
        "curve": held_out.curve,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }


def _export(args, run: CheckedRun, model, record: dict, weights: dict | None) -> int:
    base_name = EMBEDDED_BASE_NAME if args.model in (None, "smollm2") else args.model
    folder = run.export_folder
    try:
        export(model, folder, record, base_name, weights)
    except OSError as error:
        raise CLIError(
            f"{folder}: cannot write the adapter ({error.strerror or error}); the trained run is safe in "
            f"{run.output_dir}: run the same command again to export it without training"
        ) from None
    print(f"make it a checkpoint with: python -m zip2zip_hf export {folder} OUT_DIR")
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

    def restore(self, log_history: list[dict]) -> None:
        """The curve and the training seconds so far, from a checkpoint's log history."""
        earlier = [entry for entry in log_history if "held_out_bits_per_byte" in entry]
        self.seconds = earlier[-1]["training_seconds"] if earlier else 0.0
        self.curve = [dict(entry) for entry in earlier]

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state.log_history)
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
        if state.is_world_process_zero:  # every process scores (FSDP needs them all), one prints
            tqdm.write(json.dumps(entry))
