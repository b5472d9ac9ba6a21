"""What ``uptrain`` checks before any training, and what those checks settle (`CheckedRun`): the
recipe, the launch (processes, the batch each takes), the base model's folder and config, the
checkpoint to resume from and the damaged ones to set aside, and every folder it will write, each
tried for writing, so that no error a user can fix comes after the first minute of work."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .embedded import NAMED_MODELS, checkpoint_folder
from .folder_checks import json_object
from .report import CLIError, first_line
from .uptrain_folders import check_output_dir, check_writable, export_target, resume_point, run_commands
from .uptrain_processes import batch_layout, check_launcher, launched_processes
from .uptrain_recipe import UptrainRecipe, check_recipe_fits_base, parse_recipe


__all__ = ["SHIPPED_BASE", "CheckedRun", "checked_run", "load_base"]

SHIPPED_BASE = "smollm2 (the embedded SmolLM2-135M-Instruct)"  # what a checkpoint records of the embedded base


@dataclass(frozen=True)
class CheckedRun:
    """What the checks before any training settled (`checked_run`), read by every later step."""

    recipe: UptrainRecipe
    world: int  # processes in the run
    rank: int  # this process's
    per_device: int  # rows per process and forward
    accumulation: int  # forwards per optimizer step
    output_dir: Path
    base_path: str  # the folder the base model loads from
    base_id: str  # what a checkpoint records of the base model
    resume: Path | None  # the newest intact checkpoint, if any
    resumed_step: int  # its step (0 without one)
    damaged: list[tuple[Path, str]]  # (checkpoint, why) of the damaged ones newer than `resume`
    export_folder: Path
    commands: list[str]  # what trained the run, in order, this one last if it trains (`run_commands`)

    def say(self, *args, **kwargs) -> None:
        """``print`` on process 0 alone: every process checks, one speaks."""
        if self.rank == 0:
            print(*args, **kwargs)


def checked_run(args, shipped_adapter: Path) -> CheckedRun:
    """Every argument checked before the first minute of work: the recipe, the launch, the base model's
    folder and config, the checkpoints, and every folder to be written (tried for writing).
    ``shipped_adapter``: the folder ``--replace-shipped-adapter`` writes."""
    from transformers import AutoConfig

    _check_shipped_adapter_options(args)
    recipe = parse_recipe(args.recipe)
    world, rank = launched_processes()
    check_launcher(args.fsdp)
    per_device, accumulation = batch_layout(recipe.batch_size, world, args.per_device_batch_size)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    base_path, base_id = _base_model_folder(args.model)
    check_recipe_fits_base(recipe, load_base(base_path, "its config", AutoConfig.from_pretrained))
    resume, resumed_step, damaged = resume_point(args, output_dir, recipe, base_id)
    export_folder = export_target(args, output_dir, shipped_adapter)
    check_writable(output_dir, "--output-dir")
    command = shlex.join(["python", "-m", "zip2zip_hf", *getattr(args, "argv", ["uptrain"])])
    return CheckedRun(
        recipe=recipe,
        world=world,
        rank=rank,
        per_device=per_device,
        accumulation=accumulation,
        output_dir=output_dir,
        base_path=base_path,
        base_id=base_id,
        resume=resume,
        resumed_step=resumed_step,
        damaged=damaged,
        export_folder=export_folder,
        commands=run_commands(resume, resumed_step, args.steps, command),
    )


def _check_shipped_adapter_options(args) -> None:
    if args.replace_shipped_adapter and args.export:
        raise CLIError("--replace-shipped-adapter writes the package's own adapter: it takes no --export")
    if args.replace_shipped_adapter and args.model and args.model not in NAMED_MODELS:
        raise CLIError(
            "--replace-shipped-adapter: the shipped adapter is for the embedded SmolLM2-135M-Instruct, "
            "so it takes no --model (use --export for an adapter of another base)"
        )


def _base_model_folder(model: str | None) -> tuple[str, str]:
    """``(folder, id)`` of the base model ``--model`` names: where it loads from, and what a checkpoint
    records of it (a local folder's resolved path, or `SHIPPED_BASE`)."""
    if model is not None and not model.strip():  # an unset shell variable: not the default model, silently
        raise CLIError(f"--model {model!r}: empty (leave --model out for the default, smollm2)")
    if model and model not in NAMED_MODELS:
        if not os.path.isdir(model):
            raise CLIError(f"--model {model}: {'not a folder' if os.path.exists(model) else 'no such folder'}")
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CLIError(f"--model {model}: not a saved model folder (no config.json)")
        if _model_type(model) == "zip2zip":
            raise CLIError(
                f"--model {model}: a zip2zip checkpoint, and uptrain wraps a plain base model: use the folder of "
                "the base it was made from (or smollm2, the default)"
            )
        return model, str(Path(model).resolve())
    # The embedded base, by default or by name.
    why = "uptrain wraps a plain base model: use smollm2 (the default)"
    return checkpoint_folder(model or "smollm2", "--model", needs="plain", why=why), SHIPPED_BASE


def _model_type(folder: str) -> str | None:
    """``model_type`` of the folder's ``config.json`` (a `CLIError` naming the file when it is no JSON object)."""
    return json_object(Path(folder) / "config.json").get("model_type")


def load_base(path: str, what: str, load):
    """``load(path)``: a part of the base model (``what``: its config, a tokenizer, the causal LM), or a
    `CLIError` saying which part cannot be loaded."""
    try:
        return load(path)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"--model {path}: cannot load {what} ({first_line(error)})") from None
