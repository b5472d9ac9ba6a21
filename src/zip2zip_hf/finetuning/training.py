"""Training helpers for zip2zip: PEFT LoRA defaults, gradient checkpointing, TrainingArguments, logging.

The recipe (paper §3): LoRA on the base LM's linear layers, the hyper-encoders trained fully. With
plain ``transformers.Trainer``::

    from zip2zip_hf.finetuning.data import Zip2ZipDataCollator, compress_dataset
    from zip2zip_hf.finetuning.training import default_lora_config, prepare_model_for_training, training_arguments

    rows = compress_dataset(texts, tokenizer, max_length=512)
    model = prepare_model_for_training(model, default_lora_config(model), gradient_checkpointing=True)
    collator = Zip2ZipDataCollator(tokenizer)
    trainer = Trainer(model=model, args=training_arguments("out", learning_rate=5e-4, ...), train_dataset=rows,
                      data_collator=collator, callbacks=[CompressionLoggingCallback(collator)],
                      optimizers=(zip2zip_optimizer(model, 5e-4), None))  # encoders at a fifth of the rate
    trainer.train()
    model.merge_and_unload().save_pretrained("final"); tokenizer.save_pretrained("final")

Nothing special is needed for DDP (``torchrun`` / ``accelerate launch``): in training the model runs
both hyper-encoders every step, whether or not a rank's batch holds a hypertoken. Under FSDP2
(``TrainingArguments(fsdp=..., fsdp_config={"version": 2, ...})``) add `FSDPSharedWeightsCallback`:
the hyper-encoders read rows of the input embeddings and of the head, which accelerate shards as
units of their own.

Not part of a checkpoint's remote-code closure; the release differences it meets (gradient vs
activation checkpointing names) are in `_compat`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from .._compat import checkpointing_arguments, enable_activation_checkpointing
from ..modeling_zip2zip import HYPER_ENCODER_NAMES


__all__ = [
    "CompressionLoggingCallback",
    "FSDPSharedWeightsCallback",
    "bf16_available",
    "default_lora_config",
    "enable_gradient_checkpointing",
    "prepare_model_for_training",
    "training_arguments",
    "zip2zip_optimizer",
]

# The hyper-encoders' learning rate relative to the rest (LoRA or full weights). Measured with
# benchmarks/bench_quality.py (SmolLM2-135M, 120 s per arm on 2 CPU cores, LoRA at 5e-4): held-out
# bits per byte 1.213 with encoders at 0.2x, 1.236 frozen, 1.255 at 1x, 1.681 at 4x. The encoders
# start from a useful point (`input_hyper_encoder_residual`) that a large step destroys.
ENCODER_LEARNING_RATE_SCALE = 0.2


def default_lora_config(
    model: nn.Module,
    r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    train_hyper_encoders: bool = True,
    **kwargs,
):
    """A PEFT ``LoraConfig`` for a `Zip2ZipForCausalLM`: LoRA on the base LM, hyper-encoders trained fully.

    Args:
        model: the `Zip2ZipForCausalLM` to adapt.
        r: LoRA rank. ``lora_alpha`` defaults to ``2 * r``.
        target_modules: default PEFT's ``"all-linear"``: every linear layer of the base LM but the
            output head (PEFT resolves it to the layer names, e.g. ``q_proj`` ... ``down_proj`` for
            Llama, ``c_attn``/``c_fc``/``c_proj`` for GPT-2, and saves those in the adapter config).
        train_hyper_encoders: put the hyper-encoders in ``modules_to_save`` (trained and saved in full).
            With tied encoders ``output_hyper_encoder`` is None and only the input one is listed.
        kwargs: more ``LoraConfig`` fields (``use_rslora``, ``layers_to_transform``, ...).

    The hyper-encoders never get LoRA layers, even where their layer names (``o_proj``,
    ``up_proj``, ...) match ``target_modules``: ``exclude_modules`` keeps them out.
    """
    from peft import LoraConfig, TaskType

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoders = [name for name in HYPER_ENCODER_NAMES if getattr(inner, name, None) is not None]
    kwargs.setdefault("modules_to_save", list(encoders) if train_hyper_encoders else None)
    if encoders:  # a regex over full module names: the encoders and everything inside them
        kwargs.setdefault("exclude_modules", rf"(?:.*\.)?(?:{'|'.join(HYPER_ENCODER_NAMES)})(?:\..*)?")
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules="all-linear" if target_modules is None else list(target_modules),
        **kwargs,
    )


def zip2zip_optimizer(
    model: nn.Module, learning_rate: float, encoder_learning_rate: float | None = None, **adamw_kwargs
) -> torch.optim.AdamW:
    """AdamW over a zip2zip model's trainable parameters, the hyper-encoders in a group of their own.

    Pass it to ``Trainer(optimizers=(optimizer, None))``: the Trainer's scheduler (warm-up, cosine)
    then scales both groups alike.

    Args:
        learning_rate: the rate of the LoRA layers (or of every base weight in a full finetune).
        encoder_learning_rate: the hyper-encoders' rate (default ``ENCODER_LEARNING_RATE_SCALE *
            learning_rate``).
        adamw_kwargs: more ``torch.optim.AdamW`` arguments (``weight_decay``, ``betas``, ...).
    """
    if encoder_learning_rate is None:
        encoder_learning_rate = ENCODER_LEARNING_RATE_SCALE * learning_rate
    encoders, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (encoders if any(part in HYPER_ENCODER_NAMES for part in name.split(".")) else rest).append(parameter)
    groups = [{"params": rest, "lr": learning_rate}, {"params": encoders, "lr": encoder_learning_rate}]
    return torch.optim.AdamW([group for group in groups if group["params"]], **adamw_kwargs)


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Non-reentrant gradient checkpointing plus input-embedding grads (safe with frozen embeddings / LoRA).

    Call it before ``get_peft_model`` (or on the PEFT model, which forwards it).
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_activation_checkpointing(target)
    # Frozen embeddings would otherwise give checkpointed blocks inputs without grad.
    target.enable_input_require_grads()
    target.config.use_cache = False
    if hasattr(target.config, "get_text_config"):
        target.config.get_text_config().use_cache = False
    return model


def prepare_model_for_training(model: nn.Module, lora_config=None, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap a `Zip2ZipForCausalLM` for training.

    With a ``lora_config`` (e.g. `default_lora_config`) returns the PEFT model (LoRA layers and the
    hyper-encoders trainable, the rest frozen); without, the model itself, fully trainable (full
    finetune). ``gradient_checkpointing`` enables it the safe way (`enable_gradient_checkpointing`).
    """
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora_config is None:
        model.requires_grad_(True)
        return model.train()
    from peft import get_peft_model

    return get_peft_model(model, lora_config).train()


def bf16_available() -> bool:
    """True on a CUDA device with bfloat16 support (CPU training stays float32)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(output_dir: str, gradient_checkpointing: bool = False, **kwargs) -> TrainingArguments:
    """``TrainingArguments`` with the settings zip2zip training needs, on transformers 4.57 and 5.x.

    * ``remove_unused_columns=False``: `Zip2ZipDataCollator` picks its own keys and reads
      ``num_base_tokens`` for logging the compression ratio;
    * ``bf16`` where the hardware has it (`bf16_available`), unless given;
    * gradient checkpointing non-reentrant (``gradient_checkpointing=True``), under the argument name
      the installed transformers uses;
    * ``report_to="none"`` unless given.
    """
    kwargs.setdefault("remove_unused_columns", False)
    kwargs.setdefault("report_to", "none")
    if "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = bf16_available()
    if gradient_checkpointing:
        kwargs.update(checkpointing_arguments())
    return TrainingArguments(output_dir=output_dir, **kwargs)


class CompressionLoggingCallback(TrainerCallback):
    """Adds ``hypertoken_share`` (hyper ids among real ids) and ``compression_ratio`` (real ids per
    base token, from the batches' precomputed ``codebooks``) of the training batches since the last
    log to the Trainer's logs.

    The batches are counted where the model reads them (a forward pre-hook on the model while it
    trains, removed when training ends), so the counts are right however many DataLoader workers
    collate them; the sums stay on the device until a log reads them. Added with
    ``Trainer(callbacks=[...])`` it runs after the printing callbacks; `attach` puts it first so the
    printed lines show the values too. Under DDP each rank counts its own batches.

    Args:
        tokenizer: the `Zip2ZipTokenizer` (or the `Zip2ZipDataCollator`): where V comes from.
    """

    def __init__(self, tokenizer):
        self.initial_vocab_size = int(tokenizer.initial_vocab_size)
        self._counts: dict[str, torch.Tensor] = {}
        self._hook = None

    def attach(self, trainer) -> CompressionLoggingCallback:
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if not module.training or not isinstance(input_ids, torch.Tensor):
            return
        real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        counts = {"tokens": real.sum(), "hypertokens": ((input_ids >= self.initial_vocab_size) & real).sum()}
        codebooks = kwargs.get("codebooks")
        if isinstance(codebooks, dict) and "lengths" in codebooks:
            counts["base_tokens"] = codebooks["lengths"].sum()
        for key, value in counts.items():
            self._counts[key] = self._counts[key] + value if key in self._counts else value

    def pop_stats(self) -> dict[str, float]:
        """Hypertoken share (and compression ratio, when batches carry codebooks) since the last call."""
        counts, self._counts = {key: int(value) for key, value in self._counts.items()}, {}
        stats = {}
        if counts.get("tokens"):
            stats["hypertoken_share"] = counts["hypertokens"] / counts["tokens"]
        if counts.get("base_tokens"):
            stats["compression_ratio"] = counts["tokens"] / counts["base_tokens"]
        return stats

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            stats = {k: round(v, 4) for k, v in self.pop_stats().items()}
            logs.update(stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)


class FSDPSharedWeightsCallback(TrainerCallback):
    """Under FSDP2, keeps the input embeddings and the head whole while the zip2zip model runs.

    accelerate shards the base model's input embeddings and its head (with the final norm) as FSDP
    units of their own, gathered only inside their own ``forward``. A zip2zip model also reads their
    weights directly: the hyper-encoders encode embedding rows and head rows. Once the Trainer has
    sharded the model, this callback gathers both units when a forward of the zip2zip model starts
    and frees them when the step ends (after the backward), or when the forward ends where there is
    no backward (evaluation). That is about ``2 * vocabulary * hidden`` weights more per process
    during a step. Without FSDP2 it does nothing.
    """

    def __init__(self):
        self._units: list = []
        self._hooks: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        if self._hooks or model is None:
            return
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        for unit in (inner.get_input_embeddings(), inner.get_output_embeddings()):
            if isinstance(unit, FSDPModule) and unit not in self._units:
                self._units.append(unit)
        if not self._units:
            return
        for unit in self._units:
            unit.set_reshard_after_forward(False)

        def gather(module, args):
            for unit in self._units:
                unit.unshard()

        def free_after_evaluation(module, args, output):
            if not (module.training and torch.is_grad_enabled()):
                self._reshard()

        self._hooks = [inner.register_forward_pre_hook(gather), inner.register_forward_hook(free_after_evaluation)]

    def _reshard(self) -> None:
        for unit in self._units:
            unit.reshard()

    def on_step_end(self, args, state, control, **kwargs):
        self._reshard()  # before any checkpoint or scoring of this step

    def on_train_end(self, args, state, control, **kwargs):
        self._reshard()
