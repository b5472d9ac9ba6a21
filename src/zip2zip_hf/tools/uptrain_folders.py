"""The folders ``uptrain`` writes, each whole or not at all, and what it reads back from them.

``--output-dir`` holds the Trainer's checkpoints. Each is written into a staging folder (every process
writes its part there) and renamed into place (`atomic_checkpoint_trainer`), so a run killed mid-save
leaves no half checkpoint; one that is damaged anyway (a truncated file, a missing one,
`checkpoint_damage`) is skipped and moved aside to ``damaged-checkpoint-N``. Every checkpoint records
the recipe and the base model it was trained with (``uptrain_recipe.json``): `resume_point` finds the
newest intact one and refuses one of another recipe, naming what differs.

The export (`export_target`, `export`): the adapter in bfloat16 safetensors with ``uptrain.json``,
written into a staging folder beside its place and renamed there; never into the installed package
but by ``--replace-shipped-adapter``, never over an earlier export without ``--overwrite``. Every
folder is tried for writing before any training (`check_writable`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

from .report import CLIError, first_line
from .uptrain_recipe import UptrainRecipe, recipe_differences


__all__ = [
    "atomic_checkpoint_trainer",
    "check_fits",
    "check_output_dir",
    "check_writable",
    "checkpoint_damage",
    "checkpoint_step",
    "checkpoints",
    "export",
    "export_target",
    "resume_point",
    "run_commands",
    "set_aside",
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_EXPORT = "adapter"  # inside --output-dir
EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", "uptrain.json")  # uptrain.json last
# In every checkpoint: the recipe, the base model it was trained with and the commands that trained it.
RECIPE_FILE = "uptrain_recipe.json"
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


# ---------------------------------------------------------------------- checkpoints


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(N, folder)`` of every ``checkpoint-N`` folder in ``run``, by step."""
    found = []
    for path in run.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path))
    return sorted(found)


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
            return f"{path.name} is unreadable ({first_line(error)})"
    return None


def checkpoint_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]


def set_aside(folder: Path) -> Path:
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


def resume_point(args, output_dir: Path, recipe: UptrainRecipe, base_id: str):
    """``(checkpoint or None, its step, [(damaged checkpoint, why)])``: the newest intact checkpoint in
    ``output_dir`` and the newer ones skipped. Refuses a checkpoint of another recipe or base, and
    ``--steps`` below its step."""
    resume, skipped = _newest_intact(output_dir)
    if resume is None:
        return None, 0, skipped
    step = checkpoint_step(resume)
    where = f"--output-dir {output_dir}: {resume.name}"
    differences = _differences_from_run(resume, recipe, base_id)
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


def run_commands(resume: Path | None, resumed_step: int, steps: int, command: str) -> list[str]:
    """The commands that trained the run, in order: those ``resume`` records, and ``command`` if it trains
    on (a run resumed at ``steps`` is only exported again). A run extended with more ``--steps`` is trained
    by several, each with its own learning-rate schedule, so one command alone would not remake it."""
    earlier = []
    if resume is not None:
        unknown = [f"(not recorded: what trained it to step {resumed_step})"]  # a checkpoint of an older zip2zip_hf
        earlier = (_run_record(resume) or {}).get("commands", unknown)
    return [*earlier, command] if resumed_step < steps else earlier


def _newest_intact(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint with nothing damaged (None if none is), and the newer ones with why each is damaged."""
    skipped = []
    for _, folder in reversed(checkpoints(output_dir)):
        why = checkpoint_damage(folder)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    return None, skipped


def _run_record(checkpoint: Path) -> dict | None:
    """What ``checkpoint`` records of its run (`RECIPE_FILE`), None for a checkpoint of an older zip2zip_hf."""
    path = checkpoint / RECIPE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _differences_from_run(checkpoint: Path, recipe: UptrainRecipe, base_id: str) -> list[str]:
    """How ``recipe`` and ``base_id`` differ from what ``checkpoint`` was trained with (nothing: [])."""
    saved = _run_record(checkpoint)
    if saved is not None:
        differences = recipe_differences(saved.get("recipe", {}), asdict(recipe))
        if saved.get("base") != base_id:
            differences.insert(0, f"the base model ({saved.get('base')} in the run, {base_id} now)")
        return differences
    # A checkpoint of an older zip2zip_hf: the LoRA rank is what its files say plainly.
    rank = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8")).get("r")
    return [f"lora_r ({rank} in the run, {recipe.lora_r} now)"] if rank != recipe.lora_r else []


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


# ---------------------------------------------------------------------- the folders, checked before any training


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``--output-dir`` that is a file, or inside the installed package."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"--output-dir {output_dir}: exists and is not a folder")
    if output_dir.resolve().is_relative_to(PACKAGE_DIR):
        raise CLIError(
            f"--output-dir {output_dir}: inside the installed zip2zip_hf package ({PACKAGE_DIR}); runs go elsewhere"
        )


def check_writable(folder: Path, option: str, named: Path | None = None) -> None:
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


def export_target(args, output_dir: Path, shipped_adapter: Path) -> Path:
    """Where the adapter will go, once checked: never inside the installed package (unless
    ``--replace-shipped-adapter``, which means ``shipped_adapter``), never over an earlier export
    without ``--overwrite``, never into a folder holding anything else, and writable."""
    if args.replace_shipped_adapter:
        folder = shipped_adapter
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
        check_writable(folder, option)
    check_writable(folder.parent, option, folder)  # the export is written beside it first
    return folder


# ---------------------------------------------------------------------- the export


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
