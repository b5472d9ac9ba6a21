"""``uptrain`` on several processes, under ``torchrun`` / ``accelerate launch``: replicated (DDP) by
default, sharded with FSDP2 (transformers' Trainer FSDP support) with ``--fsdp``, on GPUs or on CPU
processes alike.

The recipe's ``batch_size`` is the rows per optimizer step over all processes (`batch_layout`), so the
loss curve is the one-process one. Under FSDP the Trainer's checkpoints hold the whole adapter and
optimizer state (`fsdp_arguments`) and resume on any number of processes (`load_fsdp_adapter`); the
export is the adapter gathered whole on process 0 (`gathered_adapter_weights`), never the frozen base.
"""

from __future__ import annotations

import os
from pathlib import Path

from .report import CLIError
from .uptrain_folders import FSDP_CHECKPOINT_FILES


__all__ = [
    "batch_layout",
    "check_launcher",
    "fsdp_arguments",
    "fsdp_on_cpus",
    "gathered_adapter_weights",
    "launched_processes",
    "load_fsdp_adapter",
    "sharding_trainer",
]


def launched_processes() -> tuple[int, int]:
    """``(world size, rank)`` of this run as ``torchrun`` / ``accelerate launch`` set them; ``(1, 0)``
    for a plain ``python -m zip2zip_hf uptrain``."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def check_launcher(fsdp: bool) -> None:
    """Refuse an ``accelerate launch`` configured for FSDP without ``--fsdp``: its FSDP settings are not
    the ones uptrain's checkpoints and export need; and ``--fsdp`` without a launcher (torchrun and
    accelerate launch set ``LOCAL_RANK``), where transformers would fail after the model loaded."""
    if fsdp and "LOCAL_RANK" not in os.environ:
        raise CLIError(
            "--fsdp shards the model over processes: launch them with torchrun --nproc_per_node=N -m zip2zip_hf "
            "uptrain --fsdp ... (or accelerate launch), or leave --fsdp out for one process"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not fsdp:
        raise CLIError(
            "accelerate launch was configured for FSDP: pass --fsdp to uptrain instead (it sets FSDP2 up with "
            "whole-adapter checkpoints that resume on any number of processes) and launch without the FSDP config"
        )


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


def sharding_trainer(trainer_class, wants_fsdp: bool):
    """A subclass of ``trainer_class`` (a ``transformers.Trainer``) that shards with FSDP2 when
    ``wants_fsdp``, on CPU processes too (`fsdp_on_cpus`), and under FSDP saves and loads the adapter
    alone, whole."""

    class ShardingTrainer(trainer_class):
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

    return ShardingTrainer
