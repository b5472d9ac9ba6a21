"""Finetune any Hugging Face causal LM into a zip2zip model (LoRA + hyper-encoders) on a text dataset.

    python examples/finetune.py                                   # SmolLM2-135M on the CPython stdlib
    python examples/finetune.py --model PATH --dataset wikitext --dataset-config wikitext-2-raw-v1
    python examples/finetune.py --dataset ./my_repo --glob "**/*.py" --max-steps 1000 --output-dir out
    torchrun --nproc_per_node=2 examples/finetune.py ...          # DDP (gloo on CPU, NCCL on GPU)
    accelerate launch examples/finetune.py ...

``--dataset`` is a ``datasets`` name or path (``load_dataset``), a data file (.txt/.json/.jsonl/.csv/
.parquet), or a folder of text files (``--glob``). Default: the CPython standard-library sources,
present on every machine. Logs loss, compression ratio and hypertoken share; the final model (LoRA
merged) is saved with its tokenizer to ``OUTPUT_DIR/final`` as a self-contained checkpoint that loads
with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, Trainer

from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
from zip2zip_hf.finetuning.data import Zip2ZipDataCollator, compress_dataset, dataset_stats
from zip2zip_hf.finetuning.training import (
    CompressionLoggingCallback,
    default_lora_config,
    prepare_model_for_training,
    training_arguments,
    zip2zip_optimizer,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="base HF causal LM folder or Hub id (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument(
        "--dataset", help="datasets name/path, data file, or folder of text files (default: the CPython stdlib)"
    )
    p.add_argument("--dataset-config", help="datasets configuration name")
    p.add_argument("--split", default="train")
    p.add_argument("--glob", default="**/*.py", help="files to read from a --dataset folder (default **/*.py)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-docs", type=int, help="use at most this many documents")
    p.add_argument("--max-length", type=int, default=512, help="zip2zip tokens per row (default 512)")
    p.add_argument("-K", "--max-codebook-size", type=int, default=2048)
    p.add_argument("-M", "--max-subtokens", type=int, default=4)
    p.add_argument("--hyper-encoder", default="attention", choices=["attention", "mean"])
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--encoder-learning-rate", type=float, default=None, help="default: a fifth of --learning-rate")
    p.add_argument("--batch-size", type=int, default=4, help="rows per device and step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=200, help="-1: train --epochs epochs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--num-proc", type=int, help="processes for compressing the dataset")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument("--resume-from-checkpoint", help="a checkpoint folder, or 'last'")
    p.add_argument("--output-dir", default="zip2zip-finetune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not save the final model")
    return p.parse_args(argv)


def load_texts(args) -> datasets.Dataset:
    source = args.dataset
    if source is None:
        source = sysconfig.get_paths()["stdlib"]
        args.glob = "*.py"
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.arrow")) and not (path / "dataset_info.json").exists():
        files = sorted(f for f in path.glob(args.glob) if f.is_file())
        texts = []
        for file in files:
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
        if not texts:
            raise SystemExit(f"no readable {args.glob} files under {path}")
        data = datasets.Dataset.from_dict({"text": texts})
        args.text_column = "text"
    elif path.is_file():
        kind = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            path.suffix
        )
        if kind is None:
            raise SystemExit(f"{path}: unknown data file type")
        data = datasets.load_dataset(kind, data_files=str(path), split=args.split)
    else:
        data = datasets.load_dataset(source, args.dataset_config, split=args.split)
    if args.max_docs:
        data = data.select(range(min(args.max_docs, len(data))))
    return data


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model_path = args.model
    if model_path is None:
        from zip2zip_hf.tools.smollm2 import smollm2_path

        model_path = str(smollm2_path())

    targs = training_arguments(
        args.output_dir,
        gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 20) if args.max_steps > 0 else 0,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=("nccl" if torch.cuda.is_available() else "gloo") if distributed else None,
        ddp_find_unused_parameters=False,  # the model uses every parameter every step (encoders included)
    )

    tokenizer = Zip2ZipTokenizer.from_base(
        model_path, max_codebook_size=args.max_codebook_size, max_subtokens=args.max_subtokens, padding_side="right"
    )
    # Rank 0 compresses first; the others then load its cached result (datasets with cache files).
    with targs.main_process_first(desc="compress dataset"):
        rows = compress_dataset(
            load_texts(args),
            tokenizer,
            max_length=args.max_length,
            text_column=args.text_column,
            num_proc=args.num_proc,
        )
    if targs.process_index == 0:
        stats = dataset_stats(rows, tokenizer.initial_vocab_size)
        print(
            f"dataset: {stats['rows']} rows, {stats['base_tokens']} base tokens -> {stats['tokens']} zip2zip tokens "
            f"(compression ratio {stats['compression_ratio']:.3f}, hypertoken share {stats['hypertoken_share']:.3f})"
        )

    dtype = torch.bfloat16 if targs.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = Zip2ZipForCausalLM.from_base(base, tokenizer, hyper_encoder=args.hyper_encoder)
    lora = None if args.full_finetune else default_lora_config(model, r=args.lora_r)
    model = prepare_model_for_training(model, lora, gradient_checkpointing=args.gradient_checkpointing)
    if targs.process_index == 0 and lora is not None:
        model.print_trainable_parameters()

    collator = Zip2ZipDataCollator(tokenizer, max_length=args.max_length)
    # The hyper-encoders learn at their own, lower rate (zip2zip_hf.finetuning.training.ENCODER_LEARNING_RATE_SCALE).
    optimizer = zip2zip_optimizer(model, args.learning_rate, args.encoder_learning_rate)
    trainer = Trainer(
        model=model, args=targs, train_dataset=rows, data_collator=collator, optimizers=(optimizer, None)
    )
    CompressionLoggingCallback(collator).attach(trainer)
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)

    if not args.no_save and trainer.is_world_process_zero():
        final = Path(args.output_dir) / "final"
        merged = model.merge_and_unload() if lora is not None else model
        merged.save_pretrained(final)
        tokenizer.save_pretrained(final)
        print(f"saved {final} (load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
