"""``python -m zip2zip_hf uptrain``: train the shipped SmolLM2-135M zip2zip adapter, offline, resumable.

The recipe (`UptrainRecipe`, saved with the model): LoRA on every linear layer of the base model plus
both hyper-encoders, trained with `zip2zip_hf.finetuning.distillation.Zip2ZipDistillationTrainer`, whose terms
say how much the base model itself (its LoRA disabled, reading the base ids) teaches. By default the
loss is cross-entropy on canonical ids alone: on 2 CPU cores no teacher term has yet paid for the
teacher's forward (``benchmarks/bench_quality.py``); ``--recipe`` switches them on. The data is what
every Python ships: the standard library's sources (code) and the
language reference that ``pydoc`` carries (English prose); with ``"corpus": "broad"`` in the recipe it
is code and prose of everything installed, by kind (`zip2zip_hf.tools.corpus.build_corpus`). Either is
cut into windows of ``--window`` base tokens, each read after one BOS token as `zip2zip_hf.evaluation`
reads held-out text; the record lists its sources and their bytes. Held out from training: the demo's
five standard-library files and eight reference sections, and the held-out text of other sources
(`zip2zip_hf.tools.corpus.UNSEEN_HELD_OUT`), scored at the end three ways: the base model, the
zip2zip model, and the zip2zip model's own base LM reading base ids (`zip2zip_hf.evaluation.score_kinds`).

The run is a ``transformers.Trainer`` run in ``--output-dir``: it saves a checkpoint every
``--save-steps`` and, started again with the same folder, resumes from the newest intact one (a long
CPU run may be cut off). Each checkpoint is written into a staging folder and renamed into place, so a
run killed mid-save leaves no half checkpoint; one that is damaged anyway (a truncated file, a missing
one) is skipped with a warning and moved aside to ``damaged-checkpoint-N``. Every checkpoint records the
recipe and the base model it was trained with (``uptrain_recipe.json``), and a resume with another
recipe is refused, naming what differs. A progress bar shows the steps; the held-out bits per byte and
steps per byte are logged every ``--eval-steps``.

Under ``torchrun`` / ``accelerate launch`` it trains on several processes: replicated (DDP) by default,
sharded with FSDP2 (transformers' Trainer FSDP support) with ``--fsdp``. The recipe's ``batch_size`` is
the rows per optimizer step over all processes, so the loss curve is the one-process one; every
process writes its part of a checkpoint into the staging folder, one renames it; process 0 writes the
export, the adapter gathered whole.

At the end the adapter is written to ``--export`` (default: ``OUTPUT_DIR/adapter``) in bfloat16
safetensors with ``uptrain.json``: written into a staging folder first, never into the installed
package (``--replace-shipped-adapter``, what ``make uptrain`` passes, is the one way to replace the
shipped adapter), and never over an earlier export without ``--overwrite``. Every argument is checked,
and every folder tried for writing, before any training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

from .corpus import (
    HELD_OUT,
    HELD_OUT_CODE_BYTES,
    HELD_OUT_PROSE_BYTES,
    build_corpus,
    held_out_texts,
    training_corpus,
    unseen_held_out,
)
from .embedded import EMBEDDED_BASE_NAME, EMBEDDED_ZIP2ZIP, NAMED_MODELS, checkpoint_folder
from .report import PROSE_TOPICS, CLIError


__all__ = ["UptrainRecipe", "checkpoint_damage", "parse_recipe", "run_uptrain", "score_held_out", "score_unseen"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = "adapter"  # inside --output-dir
EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", "uptrain.json")  # uptrain.json last
RECIPE_FILE = "uptrain_recipe.json"  # in every checkpoint: the recipe and the base model it was trained with
STAGING = ".checkpoint-staging"  # inside --output-dir: where a checkpoint is written before its rename
DAMAGED = "damaged-"  # a damaged checkpoint is moved aside to damaged-checkpoint-N (not a checkpoint-* name)
KEEP_CHECKPOINTS = 2
# What a checkpoint needs for the Trainer to resume from it (rng_state*.pth and scaler.pt are optional).
CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
)
# An FSDP run's checkpoint (--fsdp) holds the whole adapter and optimizer state in the Trainer's FSDP
# files instead of optimizer.pt: it resumes on any number of processes, but only with --fsdp.
FSDP_CHECKPOINT_FILES = ("pytorch_model_fsdp.bin", "optimizer.bin")
# The `Zip2ZipConfig` settings a recipe's "model" may hold (the compression ones come from K and M).
MODEL_KEYS = (
    "hyper_encoder",
    "hyper_encoder_hidden_size",
    "hyper_encoder_num_layers",
    "hyper_encoder_num_heads",
    "tie_hyper_encoders",
    "input_hyper_encoder_residual",
    "position_mode",
    "write_provisional_hypertokens",
)
CORPORA = ("stdlib", "broad")  # `zip2zip_hf.tools.corpus`: the standard library and pydoc, or everything installed
UPTRAIN_ENCODERS = ("attention", "mean")  # "reference" describes a converted checkpoint, not a fresh wrap
SHIPPED_BASE = "smollm2 (the embedded SmolLM2-135M-Instruct)"


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
    prose_repeats: int = 2  # the prose windows are seen this many times per pass over the code (both corpora)
    max_chars: int | None = None  # of each kind of training text (None: all of it); the stdlib corpus
    corpus: str = "stdlib"  # or "broad": code and prose of everything installed (`build_corpus`)
    corpus_budgets: dict | None = None  # the broad corpus: bytes of the kinds it names (None: `DEFAULT_BUDGETS`)
    # The loss terms (`DistillationConfig`). Cross-entropy alone: at equal wall-clock on 2 CPU cores
    # (benchmarks/bench_quality.py) no teacher term has yet paid for the teacher's forward.
    distillation: dict = field(default_factory=lambda: {"ce": 1.0, "span": 0.0, "marginal": 0.0, "hidden": 0.0})
    seed: int = 0


def training_rows(tokenizer, recipe: UptrainRecipe) -> tuple[list[dict], dict]:
    """Compressed training rows (``[prefix] + window`` each, compressed from an empty codebook),
    shuffled, and what they hold."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    code, prose, record = training_texts_of(recipe)
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
        **record,
        "windows": {kind: len(w) for kind, w in windows.items()},
        "base_tokens": {kind: sum(map(len, w)) for kind, w in windows.items()},
        "rows": len(rows),
    }
    return rows, about


def _text_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


def training_texts_of(recipe: UptrainRecipe) -> tuple[list[str], list[str], dict]:
    """``(code, prose, record)``: the recipe's training texts, and what ``uptrain.json`` says of them
    (the corpus, its bytes, and every source with its files and bytes)."""
    if recipe.corpus == "broad":
        corpus = build_corpus(recipe.corpus_budgets, seed=recipe.seed)
        code, prose = corpus.split()
        return (
            code,
            prose,
            {
                "corpus": "broad",
                "code": f"{len(code)} files of code and configuration, {_text_bytes(code)} bytes",
                "prose": f"{len(prose)} files of prose (Markdown, documentation), {_text_bytes(prose)} bytes",
                **corpus.record(),
            },
        )
    code, prose = training_corpus(recipe.max_chars)
    return (
        code,
        prose,
        {
            "corpus": "stdlib",
            "code": f"{len(code)} top-level standard-library modules of Python {platform.python_version()}",
            "prose": f"{len(prose)} pydoc language-reference sections",
            "bytes": {"python": _text_bytes(code), "docs": _text_bytes(prose)},
            "sources": [
                {"source": "python-stdlib", "kind": "python", "files": len(code), "bytes": _text_bytes(code)},
                {"source": "python-stdlib:pydoc", "kind": "docs", "files": len(prose), "bytes": _text_bytes(prose)},
            ],
        },
    )


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


def _json(value) -> str:
    return json.dumps(value)


def _int_field(name: str, value, least: int, most: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CLIError(f"--recipe: {name} must be an integer, got {_json(value)}")
    if value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise CLIError(f"--recipe: {name} must be {bound}, got {value}")


def _number_field(name: str, value, least: float = 0.0, most: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CLIError(f"--recipe: {name} must be a finite number, got {_json(value)}")
    if value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise CLIError(f"--recipe: {name} must be {bound}, got {value}")


def parse_recipe(text: str | None) -> UptrainRecipe:
    """The `UptrainRecipe` that ``--recipe`` (a JSON object of its fields) describes, every field checked:
    a `CLIError` naming the field otherwise (nothing is converted: ``"64"`` is not 64)."""
    from ..finetuning.distillation import DistillationConfig
    from ..lzw_codebook import MAX_CODEBOOK_SIZE, MAX_SUBTOKENS

    if text is None:
        return UptrainRecipe()
    try:
        given = json.loads(text)
    except json.JSONDecodeError as error:
        raise CLIError(f"--recipe: not valid JSON ({error})") from None
    if not isinstance(given, dict):
        raise CLIError(f"--recipe: a JSON object of recipe fields, e.g. '{{\"lora_r\": 16}}', got {_json(given)}")
    names = [f.name for f in dataclasses.fields(UptrainRecipe)]
    unknown = [key for key in given if key not in names]
    if unknown:
        raise CLIError(f"--recipe: unknown field {', '.join(map(repr, unknown))} (the fields: {', '.join(names)})")
    recipe = UptrainRecipe(**given)
    _int_field("max_codebook_size", recipe.max_codebook_size, 0, MAX_CODEBOOK_SIZE)
    _int_field("max_subtokens", recipe.max_subtokens, 1, MAX_SUBTOKENS)
    _int_field("lora_r", recipe.lora_r, 1)
    _number_field("learning_rate", recipe.learning_rate)
    _number_field("encoder_learning_rate", recipe.encoder_learning_rate)
    _number_field("warmup_ratio", recipe.warmup_ratio, 0.0, 1.0)
    _int_field("window", recipe.window, 1)
    _int_field("eval_window", recipe.eval_window, 1)
    _int_field("batch_size", recipe.batch_size, 1)
    _int_field("prose_repeats", recipe.prose_repeats, 0)
    if recipe.max_chars is not None:
        _int_field("max_chars", recipe.max_chars, 1)
    _int_field("seed", recipe.seed, 0, 2**32 - 1)  # the Trainer seeds numpy too, which takes 32 bits
    if recipe.corpus not in CORPORA:
        raise CLIError(f"--recipe: corpus must be one of {', '.join(map(repr, CORPORA))}, got {_json(recipe.corpus)}")
    if recipe.corpus_budgets is not None:
        from .sources import KINDS

        if not isinstance(recipe.corpus_budgets, dict):
            raise CLIError(
                f"--recipe: corpus_budgets must be an object of bytes per kind, got {_json(recipe.corpus_budgets)}"
            )
        unknown = [key for key in recipe.corpus_budgets if key not in KINDS]
        if unknown:
            raise CLIError(
                f"--recipe: corpus_budgets: unknown kind {', '.join(map(repr, unknown))} "
                f"(the kinds: {', '.join(KINDS)})"
            )
        for key, value in recipe.corpus_budgets.items():
            _int_field(f"corpus_budgets.{key}", value, 0)
    if not isinstance(recipe.model, dict):
        raise CLIError(f"--recipe: model must be an object of model settings, got {_json(recipe.model)}")
    unknown = [key for key in recipe.model if key not in MODEL_KEYS]
    if unknown:
        raise CLIError(
            f"--recipe: model: unknown setting {', '.join(map(repr, unknown))} (the settings: {', '.join(MODEL_KEYS)})"
        )
    encoder = recipe.model.get("hyper_encoder", "attention")
    if encoder not in UPTRAIN_ENCODERS:
        raise CLIError(
            f"--recipe: model: hyper_encoder must be one of {', '.join(map(repr, UPTRAIN_ENCODERS))}, "
            f"got {_json(encoder)}"
        )
    # The other model settings are checked by `Zip2ZipConfig` once the base model's config is read.
    if not isinstance(recipe.distillation, dict):
        raise CLIError(f"--recipe: distillation must be an object of loss terms, got {_json(recipe.distillation)}")
    terms = [f.name for f in dataclasses.fields(DistillationConfig)]
    unknown = [key for key in recipe.distillation if key not in terms]
    if unknown:
        raise CLIError(
            f"--recipe: distillation: unknown term {', '.join(map(repr, unknown))} (the terms: {', '.join(terms)})"
        )
    for key, value in recipe.distillation.items():
        if key == "correction":
            if not isinstance(value, bool):
                raise CLIError(f"--recipe: distillation.correction must be true or false, got {_json(value)}")
        else:
            _number_field(f"distillation.{key}", value)
    # A term the recipe leaves out keeps the recipe's default weight (not `DistillationConfig`'s, whose
    # span term is on): '{"distillation": {"span": 0.5}}' adds the span term to cross-entropy.
    recipe.distillation = {**UptrainRecipe().distillation, **recipe.distillation}
    weights = asdict(DistillationConfig(**recipe.distillation))
    if not any(weights[key] > 0 for key in terms if key != "correction"):
        raise CLIError("--recipe: distillation: every loss term is 0, there is nothing to train")
    return recipe


def _comparable(recipe: dict) -> dict:
    """A recipe's fields with the model settings and the loss terms completed by their defaults, so
    that two recipes meaning the same training compare equal."""
    import inspect

    from ..configuration_zip2zip import Zip2ZipConfig
    from ..finetuning.distillation import DistillationConfig

    defaults = inspect.signature(Zip2ZipConfig.__init__).parameters
    out = dict(recipe)
    # Fields a recipe of an earlier version lacks, at the value that version trained with.
    out.setdefault("corpus", "stdlib")
    out.setdefault("corpus_budgets", None)
    if isinstance(out.get("model"), dict):
        given = out["model"]
        model = {key: given.get(key, defaults[key].default) for key in MODEL_KEYS}
        if "input_hyper_encoder_residual" not in given and model["hyper_encoder"] == "attention":
            if not model["tie_hyper_encoders"]:  # what `Zip2ZipForCausalLM.from_base` picks then
                model["input_hyper_encoder_residual"] = "last"
        out["model"] = model
    if isinstance(out.get("distillation"), dict):
        try:
            out["distillation"] = asdict(DistillationConfig(**out["distillation"]))
        except TypeError:  # a record of another version: compared as it is
            pass
    return out


# What a user knows these fields as.
FIELD_NAMES = {"max_codebook_size": "max_codebook_size (K)", "max_subtokens": "max_subtokens (M)"}


def recipe_differences(saved: dict, recipe: dict) -> list[str]:
    """``field (RUN in the run, NOW now)`` for each recipe field that differs."""
    saved, recipe = _comparable(saved), _comparable(recipe)
    differences = []
    for key in dict.fromkeys([*recipe, *saved]):
        before, now = saved.get(key), recipe.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            pairs = [(f"{key}.{k}", before.get(k), now.get(k)) for k in dict.fromkeys([*now, *before])]
        else:
            pairs = [(FIELD_NAMES.get(key, key), before, now)]
        differences += [f"{name} ({_json(a)} in the run, {_json(b)} now)" for name, a, b in pairs if a != b]
    return differences


# ---------------------------------------------------------------------- checkpoints


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(N, folder)`` of every ``checkpoint-N`` folder in ``run``, by step."""
    found = []
    for path in run.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def checkpoint_damage(folder: Path) -> str | None:
    """Why the Trainer cannot resume from the checkpoint ``folder`` (a file missing, truncated or
    unreadable), or None when it is intact. Every file is read through once."""
    from safetensors import safe_open

    fsdp = (folder / FSDP_CHECKPOINT_FILES[0]).exists()
    needed = [name for name in CHECKPOINT_FILES if not (fsdp and name == "optimizer.pt")]
    for name in needed + list(FSDP_CHECKPOINT_FILES if fsdp else ()):
        if not (folder / name).is_file():
            return f"{name} is missing"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".json":
                content = json.loads(path.read_text(encoding="utf-8"))
                if path.name == "trainer_state.json" and not isinstance(content.get("global_step"), int):
                    return "trainer_state.json has no global_step"
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as weights:
                    for key in weights.keys():
                        weights.get_tensor(key)
            elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's zip archives
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is corrupt ({bad})"
        except zipfile.BadZipFile:
            return f"{path.name} is truncated or corrupt (not a whole torch archive)"
        except Exception as error:  # a safetensors error is no OSError; JSON, Unicode, ... all mean damaged
            return f"{path.name} is unreadable ({_first_line(error)})"
    return None


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]


def _aside(folder: Path) -> Path:
    """Move ``folder`` aside as ``damaged-<name>`` (numbered if taken); the new path."""
    target = folder.with_name(DAMAGED + folder.name)
    number = 1
    while target.exists():
        number += 1
        target = folder.with_name(f"{DAMAGED}{folder.name}.{number}")
    folder.rename(target)
    return target


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of entries (a rename in it), to the disk where the system allows."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def atomic_checkpoint_trainer(trainer_class, recipe_record: dict):
    """A subclass of ``trainer_class`` (a ``transformers.Trainer``) whose checkpoints appear whole or
    not at all: each is written into ``OUTPUT_DIR/.checkpoint-staging/checkpoint-N`` with
    ``recipe_record`` as ``uptrain_recipe.json``, flushed, and renamed to ``OUTPUT_DIR/checkpoint-N``;
    then all but the newest `KEEP_CHECKPOINTS` are deleted (by step)."""

    class AtomicCheckpointTrainer(trainer_class):
        _staging: Path | None = None

        def _get_output_dir(self, trial):
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            # Every rank writes its part (its rng_state_N.pth; under FSDP its share of the gathering)
            # into the staging folder; the process that saves renames it once all are done.
            run = Path(super()._get_output_dir(trial))
            staging = run / STAGING
            saves = self.args.should_save
            if saves:
                shutil.rmtree(staging, ignore_errors=True)  # what a run killed mid-save left
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if saves:
                name = f"checkpoint-{self.state.global_step}"
                written = staging / name
                (written / RECIPE_FILE).write_text(json.dumps(recipe_record, indent=1) + "\n", encoding="utf-8")
                _fsync_tree(written)
                final = run / name
                if final.exists():  # never the case in `run_uptrain`, which resumes from the newest one
                    shutil.rmtree(final)
                os.replace(written, final)
                staging.rmdir()
                _fsync(run)
                for _, old in checkpoints(run)[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old, ignore_errors=True)
            self.accelerator.wait_for_everyone()  # no rank goes on (or resumes) before the checkpoint is in place

    return AtomicCheckpointTrainer


# ---------------------------------------------------------------------- folders


def _check_writable(folder: Path, option: str, named: Path | None = None) -> None:
    """Refuse (a `CLIError` about ``option named``) unless a folder can be made in ``folder``, or in the
    nearest folder above it that exists: tried for real, so a read-only disk is found before any training."""
    named = folder if named is None else named
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{option} {named}: {probe} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".zip2zip-write-test-", dir=probe))
    except OSError as error:
        raise CLIError(f"{option} {named}: cannot write in {probe} ({error.strerror or error})") from None


def export_target(args, output_dir: Path) -> Path:
    """Where the adapter will go, once checked: never inside the installed package (unless
    ``--replace-shipped-adapter``), never over an earlier export without ``--overwrite``, never into a
    folder holding anything else, and writable."""
    if args.replace_shipped_adapter:
        folder = EMBEDDED_ZIP2ZIP
    else:
        folder = Path(args.export) if args.export else output_dir / DEFAULT_EXPORT
        if folder.resolve().is_relative_to(PACKAGE_DIR):
            raise CLIError(
                f"--export {folder}: inside the installed zip2zip_hf package ({PACKAGE_DIR}); an export never "
                "goes there (--replace-shipped-adapter replaces the shipped adapter on purpose)"
            )
    option = "--replace-shipped-adapter" if args.replace_shipped_adapter else "--export"
    if folder.is_symlink() and not folder.exists():
        raise CLIError(f"{option} {folder}: a dangling symbolic link")
    if folder.exists():
        if not folder.is_dir():
            raise CLIError(f"{option} {folder}: exists and is not a folder")
        if any(folder.iterdir()):
            if not any((folder / name).exists() for name in EXPORT_FILES):
                raise CLIError(f"{option} {folder}: not empty and not an uptrain export (nothing is overwritten)")
            if not (args.overwrite or args.replace_shipped_adapter):
                raise CLIError(
                    f"{option} {folder}: holds an export already; pass --overwrite to replace it, or another --export"
                )
        _check_writable(folder, option)
    _check_writable(folder.parent, option, folder)  # the export is written beside it first
    return folder


def resume_point(args, output_dir: Path, recipe: UptrainRecipe, base_id: str):
    """``(checkpoint or None, its step, [(damaged checkpoint, why)])``: the newest intact checkpoint in
    ``output_dir`` and the newer ones skipped. Refuses a checkpoint of another recipe or base, and
    ``--steps`` below its step."""
    skipped, resume = [], None
    for _, folder in reversed(checkpoints(output_dir)):
        why = checkpoint_damage(folder)
        if why is None:
            resume = folder
            break
        skipped.append((folder, why))
    if resume is None:
        return None, 0, skipped
    step = checkpoint_step(resume)
    where = f"--output-dir {output_dir}: {resume.name}"
    if (resume / RECIPE_FILE).is_file():
        saved = json.loads((resume / RECIPE_FILE).read_text(encoding="utf-8"))
        differences = recipe_differences(saved.get("recipe", {}), asdict(recipe))
        if saved.get("base") != base_id:
            differences.insert(0, f"the base model ({saved.get('base')} in the run, {base_id} now)")
    else:  # a checkpoint of an older zip2zip_hf: the LoRA rank is what its files say plainly
        rank = json.loads((resume / "adapter_config.json").read_text(encoding="utf-8")).get("r")
        differences = [f"lora_r ({rank} in the run, {recipe.lora_r} now)"] if rank != recipe.lora_r else []
    if differences:
        raise CLIError(
            f"{where} was trained with another recipe: {'; '.join(differences)}. Resume with the run's "
            "recipe, or start a new --output-dir"
        )
    fsdp = (resume / FSDP_CHECKPOINT_FILES[0]).exists()
    if fsdp != bool(args.fsdp):
        raise CLIError(
            f"{where} was written by a run {'with' if fsdp else 'without'} --fsdp: resume it "
            f"{'with' if fsdp else 'without'} --fsdp (on any number of processes), or start a new --output-dir"
        )
    if step > args.steps:
        raise CLIError(
            f"{where} is at step {step} already, past --steps {args.steps}: nothing to do (ask for more steps "
            "to continue the run, or start a new --output-dir)"
        )
    return resume, step, skipped


def check_fits(model, checkpoint: Path) -> None:
    """Refuse (a `CLIError` naming a tensor) a checkpoint whose adapter weights do not fit ``model``."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    expected = {key: list(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as weights:
        saved = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    problems = [
        f"{key} is {saved[key]} there, {expected[key]} here"
        for key in expected
        if saved.get(key, expected[key]) != expected[key]
    ]
    problems += [f"{key} is missing there" for key in expected if key not in saved]
    problems += [f"{key} is not in this model" for key in saved if key not in expected]
    if problems:
        raise CLIError(
            f"{checkpoint}: its weights do not fit this recipe and base model ({problems[0]}"
            f"{f', and {len(problems) - 1} more' if len(problems) > 1 else ''}). Resume with the run's "
            "recipe, or start a new --output-dir"
        )


def launched_processes() -> tuple[int, int]:
    """``(world size, rank)`` of this run as ``torchrun`` / ``accelerate launch`` set them; ``(1, 0)``
    for a plain ``python -m zip2zip_hf uptrain``."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def batch_layout(batch_size: int, world: int, per_device: int | None) -> tuple[int, int]:
    """``(rows per process and forward, forwards per step)`` for the recipe's ``batch_size`` rows per
    optimizer step over ``world`` processes: the step is the same whatever the processes, so a run's
    loss curve does not depend on how many there are. ``per_device`` (``--per-device-batch-size``)
    default: the whole step in one forward per process."""
    if batch_size % world:
        raise CLIError(
            f"--recipe: batch_size {batch_size} (rows per optimizer step, over all processes) is not a multiple "
            f"of the {world} processes: use a batch_size that is"
        )
    share = batch_size // world
    per_device = share if per_device is None else per_device
    if share % per_device:
        raise CLIError(
            f"--per-device-batch-size {per_device} does not divide the {share} rows each of the {world} process(es) "
            f"has per step (batch_size {batch_size}): use a divisor of {share}"
        )
    return per_device, share // per_device


def fsdp_arguments(base) -> dict:
    """``TrainingArguments`` for FSDP2 (``--fsdp``): every decoder layer of ``base`` sharded on its own
    (its ``_no_split_modules``; accelerate adds the input embeddings and the head as units of their
    own, `FSDPSharedWeightsCallback` gathers them for the hyper-encoders, the root holds the rest), and
    whole (``FULL_STATE_DICT``) adapter checkpoints, which resume on any number of processes."""
    layers = list(getattr(base, "_no_split_modules", None) or [])
    config = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    # transformers 4.57 passes FSDP settings to accelerate through the environment, without these
    # two: accelerate reads them as `accelerate launch --fsdp_version 2 --fsdp_state_dict_type ...` sets them.
    os.environ["FSDP_VERSION"] = "2"
    os.environ["FSDP_STATE_DICT_TYPE"] = config["state_dict_type"]
    return {"fsdp": "full_shard auto_wrap" if layers else "full_shard", "fsdp_config": config}


def load_fsdp_adapter(trainer, checkpoint: Path) -> None:
    """Every process reads an FSDP checkpoint's whole adapter and keeps its own shard of it. (accelerate's
    ``load_fsdp_model`` broadcasts it from process 0 instead, and waits forever for the adapter's
    frozen neighbours.)"""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = torch.load(checkpoint / FSDP_CHECKPOINT_FILES[0], map_location="cpu", weights_only=True)
    result = set_model_state_dict(trainer.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise CLIError(f"{checkpoint}: weights this model does not have: {', '.join(result.unexpected_keys[:3])}")


def fsdp_on_cpus(trainer) -> None:
    """Shard with FSDP2 where accelerate would silently replicate: on CPU processes (gloo) it keeps the
    FSDP settings out of its state and runs DDP. FSDP2 itself shards over a CPU device mesh, so the
    Trainer's FSDP path (sharded model and optimizer, whole checkpoints) runs on CPUs as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    settings = getattr(trainer.args, "fsdp_plugin_args", None)  # transformers 5; 4.57 sets FSDP_* variables
    plugin = FullyShardedDataParallelPlugin(**settings) if settings is not None else FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def gathered_adapter_weights(trainer) -> dict | None:
    """The trained adapter's whole weights on process 0 (every process must call it) when FSDP shards
    the model; None otherwise (the model holds them whole). Only the trainable weights are gathered,
    never the frozen base model's."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(trainer.model, options=options)


def _silent(*args, **kwargs) -> None:
    pass


def _load_base(path: str, what: str, load):
    try:
        return load(path)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model {path}: cannot load {what} ({_first_line(error)})") from None


# ---------------------------------------------------------------------- the run


def run_uptrain(args) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..configuration_zip2zip import Zip2ZipConfig
    from ..finetuning.data import Zip2ZipDataCollator
    from ..finetuning.distillation import DistillationConfig, Zip2ZipDistillationTrainer
    from ..finetuning.training import (
        FSDPSharedWeightsCallback,
        default_lora_config,
        prepare_model_for_training,
        training_arguments,
        zip2zip_optimizer,
    )
    from ..modeling_zip2zip import Zip2ZipForCausalLM
    from ..tokenization_zip2zip import Zip2ZipTokenizer

    # Everything is checked before the first minute of work: the recipe, the base model's folder and
    # config, the checkpoints, and every folder to be written.
    if args.replace_shipped_adapter and args.export:
        raise CLIError("--replace-shipped-adapter writes the package's own adapter: it takes no --export")
    if args.replace_shipped_adapter and args.model and args.model not in NAMED_MODELS:
        raise CLIError(
            "--replace-shipped-adapter: the shipped adapter is for the embedded SmolLM2-135M-Instruct, "
            "so it takes no --model (use --export for an adapter of another base)"
        )
    recipe = parse_recipe(args.recipe)
    world, rank = launched_processes()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not args.fsdp:
        raise CLIError(
            "accelerate launch was configured for FSDP: pass --fsdp to uptrain instead (it sets FSDP2 up with "
            "whole-adapter checkpoints that resume on any number of processes) and launch without the FSDP config"
        )
    per_device, accumulation = batch_layout(recipe.batch_size, world, args.per_device_batch_size)
    say = print if rank == 0 else _silent  # every process checks, one speaks
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"--output-dir {output_dir}: exists and is not a folder")
    if output_dir.resolve().is_relative_to(PACKAGE_DIR):
        raise CLIError(
            f"--output-dir {output_dir}: inside the installed zip2zip_hf package ({PACKAGE_DIR}); runs go elsewhere"
        )
    if args.model and args.model not in NAMED_MODELS:
        if not os.path.isdir(args.model):
            raise CLIError(
                f"--model {args.model}: {'not a folder' if os.path.exists(args.model) else 'no such folder'}"
            )
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise CLIError(f"--model {args.model}: not a saved model folder (no config.json)")
        path, base_id = args.model, str(Path(args.model).resolve())
    else:  # the embedded base, by default or by name
        why = "uptrain wraps a plain base model: use smollm2 (the default)"
        path, base_id = checkpoint_folder(args.model or "smollm2", "--model", needs="plain", why=why), SHIPPED_BASE
    base_config = _load_base(path, "its config", AutoConfig.from_pretrained)
    positions = getattr(base_config.get_text_config(), "max_position_embeddings", None)
    for name in ("window", "eval_window"):
        window = getattr(recipe, name)
        if positions is not None and window + 1 > positions:
            raise CLIError(
                f"--recipe: {name} {window} needs {window + 1} positions (a BOS token, then the window) but the "
                f"base model has {positions}: use {name} {positions - 1} or less"
            )
    try:
        Zip2ZipConfig(
            text_config=base_config,
            max_codebook_size=recipe.max_codebook_size,
            max_subtokens=recipe.max_subtokens,
            **recipe.model,
        )
    except (TypeError, ValueError) as error:
        raise CLIError(f"--recipe: model: {_first_line(error)}") from None
    resume, resumed_step, damaged = resume_point(args, output_dir, recipe, base_id)
    folder = export_target(args, output_dir)
    _check_writable(output_dir, "--output-dir")

    for checkpoint, why in damaged if rank == 0 else ():
        aside = _aside(checkpoint)
        print(f"zip2zip_hf uptrain: warning: skipped {checkpoint}: {why}; moved it to {aside.name}", file=sys.stderr)
    if resume is not None:
        say(f"resuming from {resume} (step {resumed_step})", flush=True)
    elif damaged:
        say(f"no intact checkpoint in {output_dir}: starting from step 0", flush=True)
    if world > 1:
        say(
            f"{world} processes ({'FSDP2' if args.fsdp else 'DDP'}): {per_device} rows each per forward, "
            f"{accumulation} forward(s) per step, {recipe.batch_size} rows per step",
            flush=True,
        )

    if args.threads:
        torch.set_num_threads(args.threads)
    base_tokenizer = _load_base(path, "a tokenizer", AutoTokenizer.from_pretrained)
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
    say(f"training rows: {data['rows']} ({data['windows']} windows of {recipe.window} base tokens)", flush=True)
    say(f"training text ({data['corpus']} corpus), bytes: {json.dumps(data['bytes'])}", flush=True)

    torch.manual_seed(recipe.seed)
    base = _load_base(path, "a causal LM", lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))
    base_scores = score_held_out(base, base_tokenizer, recipe.eval_window)
    say(f"base model, held-out: {json.dumps(base_scores['all'])}", flush=True)
    # Before the wrap: LoRA goes into these very modules.
    unseen = score_unseen(base, base_tokenizer, None, None, recipe.eval_window, modes=("base",))
    model = Zip2ZipForCausalLM.from_base(base, tokenizer, **recipe.model)
    model = prepare_model_for_training(model, default_lora_config(model, r=recipe.lora_r))
    if resume is not None:
        check_fits(model, resume)

    held_out = HeldOutLogger(tokenizer, recipe.eval_window, args.eval_steps)
    trainer_class = atomic_checkpoint_trainer(Zip2ZipDistillationTrainer, {"recipe": asdict(recipe), "base": base_id})

    class UptrainTrainer(trainer_class):
        def create_accelerator_and_postprocess(self, *args, **kwargs):
            super().create_accelerator_and_postprocess(*args, **kwargs)
            if wants_fsdp and not self.is_fsdp_enabled:
                fsdp_on_cpus(self)

        def save_model(self, output_dir=None, _internal_call=False):
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            # The adapter gathered whole (never the frozen base model), written as one process would.
            weights = gathered_adapter_weights(self)
            if self.args.should_save:
                self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=weights)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self.is_fsdp_enabled:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_fsdp_adapter(self, Path(resume_from_checkpoint))

        def create_optimizer(self, *args, **kwargs):
            # Made here, not passed in: under FSDP the Trainer builds it over the sharded parameters.
            if self.optimizer is None:
                self.optimizer = zip2zip_optimizer(
                    self.model, recipe.learning_rate, recipe.encoder_learning_rate, weight_decay=0.0
                )
            return self.optimizer

    on_cpu, wants_fsdp = not torch.cuda.is_available(), args.fsdp
    trainer = UptrainTrainer(
        model=model,
        args=training_arguments(
            str(output_dir),
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
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
            ddp_backend="gloo" if world > 1 and on_cpu else None,
            ddp_find_unused_parameters=False,
            **(fsdp_arguments(base) if args.fsdp else {}),
        ),
        train_dataset=rows,
        data_collator=Zip2ZipDataCollator(tokenizer, distillation=True),
        callbacks=[FSDPSharedWeightsCallback(), held_out],
        distillation=DistillationConfig(**recipe.distillation),
    )
    held_out.trainer = trainer
    if resume is not None and resumed_step == args.steps:
        # The Trainer would train one more step; the run is done, so only its export is (re)written.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        say(f"{resume} is at step {args.steps} already: nothing to train, exporting it", flush=True)
        set_peft_model_state_dict(model, load_file(str(resume / "adapter_model.safetensors")))
        state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        held_out.restore(state.get("log_history", []))
        steps, weights = resumed_step, None
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        steps = trainer.state.global_step
        weights = gathered_adapter_weights(trainer)  # every process takes part; process 0 gets them

    record = {
        "model": recipe.model,
        "compression": {"max_codebook_size": recipe.max_codebook_size, "max_subtokens": recipe.max_subtokens},
        "recipe": asdict(recipe),
        "data": data,
        "steps": steps,
        "training_seconds": round(held_out.seconds, 3),
        "hardware": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{torch.get_num_threads()} CPU threads",
        "held_out": {
            "window": recipe.eval_window,
            "texts": f"the first {HELD_OUT_CODE_BYTES} bytes of each of {', '.join(HELD_OUT)}; the first "
            f"{HELD_OUT_PROSE_BYTES} bytes of the pydoc sections {', '.join(PROSE_TOPICS)}",
            "base": base_scores,
            "zip2zip": held_out.scores_at(steps) or score_held_out(model, tokenizer, recipe.eval_window),
            "unseen": _merged(
                unseen,
                score_unseen(None, base_tokenizer, model, tokenizer, recipe.eval_window, ("zip2zip", "base_mode")),
            ),
        },
        "curve": held_out.curve,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    base_name = EMBEDDED_BASE_NAME if args.model in (None, "smollm2") else args.model
    if rank != 0:  # process 0 writes the export
        return 0
    try:
        export(model, folder, record, base_name, weights)
    except OSError as error:
        raise CLIError(
            f"{folder}: cannot write the adapter ({error.strerror or error}); the trained run is safe in "
            f"{output_dir}: run the same command again to export it without training"
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


def export(model, folder: Path, record: dict, base_name: str, state_dict: dict | None = None) -> None:
    """Write the trained adapter (LoRA and both hyper-encoders) as bfloat16 safetensors, its PEFT
    config, and ``uptrain.json`` into ``folder``: all of it into a new folder beside ``folder`` first,
    flushed to the disk, then renamed to ``folder`` (or, where ``folder`` exists, each file renamed
    over its namesake, ``uptrain.json`` last). A failure leaves ``folder`` as it was.

    ``state_dict``: the model's weights when ``model`` does not hold them whole (sharded by FSDP:
    `gathered_adapter_weights`); the export is the same either way."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            model.save_pretrained(scratch, **({"state_dict": state_dict} if state_dict is not None else {}))
            weights = load_file(f"{scratch}/adapter_model.safetensors")
            config = json.loads(Path(scratch, "adapter_config.json").read_text(encoding="utf-8"))
        weights = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
        save_file(weights, str(staging / "adapter_model.safetensors"))
        config["base_model_name_or_path"] = base_name  # not a local path of the machine that trained it
        if isinstance(config.get("target_modules"), list):  # PEFT's set, in the order of this process's hashing
            config["target_modules"] = sorted(config["target_modules"])
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (staging / "adapter_config.json").write_text(text, encoding="utf-8")
        (staging / "uptrain.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _fsync_tree(staging)
        if folder.exists():
            for name in EXPORT_FILES:
                os.replace(staging / name, folder / name)
            staging.rmdir()
        else:
            os.replace(staging, folder)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = (folder / "adapter_model.safetensors").stat().st_size
    print(f"wrote {folder}: the adapter ({size / 2**20:.1f} MiB) and uptrain.json, how it was made")


def add_uptrain_arguments(command) -> None:
    from .report import at_least

    command.add_argument(
        "--output-dir",
        default="uptrain-smollm2",
        help="checkpoints; resumed from the newest intact one if present (default uptrain-smollm2)",
    )
    command.add_argument(
        "--model",
        metavar="PATH",
        help="another base model, a local folder (default: smollm2, the embedded SmolLM2-135M-Instruct)",
    )
    command.add_argument(
        "--steps", type=at_least(1), default=600, metavar="N", help="train until step N (default 600)"
    )
    command.add_argument("--recipe", default=None, help="UptrainRecipe fields as JSON, e.g. '{\"lora_r\": 32}'")
    command.add_argument(
        "--eval-steps", type=at_least(1), default=100, metavar="N", help="held-out scoring every N steps"
    )
    command.add_argument("--save-steps", type=at_least(1), default=50, metavar="N", help="a checkpoint every N steps")
    command.add_argument("--logging-steps", type=at_least(1), default=10, metavar="N")
    command.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun / accelerate launch: shard the model over the processes with FSDP2 (transformers' "
        "Trainer fsdp='full_shard', fsdp_config version 2) instead of replicating it (DDP)",
    )
    command.add_argument(
        "--per-device-batch-size",
        type=at_least(1),
        default=None,
        metavar="N",
        help="rows per process and forward; the recipe's batch_size (rows per step, all processes together) is "
        "reached by gradient accumulation (default: batch_size / processes, no accumulation)",
    )
    command.add_argument(
        "--threads", type=at_least(1), default=None, metavar="N", help="torch threads (default: torch's choice)"
    )
    command.add_argument(
        "--export",
        metavar="DIR",
        default=None,
        help=f"where the adapter goes (default: OUTPUT_DIR/{DEFAULT_EXPORT}); never inside the installed package",
    )
    command.add_argument(
        "--overwrite", action="store_true", help="replace the export in --export if there is one already"
    )
    command.add_argument(
        "--replace-shipped-adapter",
        action="store_true",
        help="write the adapter over the one this package ships (embedded/smollm2-zip2zip), as `make uptrain` "
        "does in a source checkout; takes neither --export nor --model",
    )
