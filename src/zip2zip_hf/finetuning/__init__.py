"""Finetuning a zip2zip model: compressed datasets and the collator (`data`), LoRA defaults and
Trainer settings (`training`), and uptraining by self-distillation from the base model
(`distillation`). Never part of a checkpoint."""

from .data import Zip2ZipCompressor, Zip2ZipDataCollator, compress_dataset, dataset_stats, split_windows
from .distillation import DistillationConfig, Zip2ZipDistillationTrainer, Zip2ZipDistiller, alignment_tensors
from .training import (
    CompressionLoggingCallback,
    bf16_available,
    default_lora_config,
    enable_gradient_checkpointing,
    prepare_model_for_training,
    training_arguments,
    zip2zip_optimizer,
)


__all__ = [
    "CompressionLoggingCallback",
    "DistillationConfig",
    "Zip2ZipCompressor",
    "Zip2ZipDataCollator",
    "Zip2ZipDistillationTrainer",
    "Zip2ZipDistiller",
    "alignment_tensors",
    "bf16_available",
    "compress_dataset",
    "dataset_stats",
    "default_lora_config",
    "enable_gradient_checkpointing",
    "prepare_model_for_training",
    "split_windows",
    "training_arguments",
    "zip2zip_optimizer",
]
