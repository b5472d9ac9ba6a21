"""The command line of ``python -m zip2zip_hf uptrain``: its options, their defaults and what each does
(`zip2zip_hf.tools.uptrain.run_uptrain` reads them)."""

from __future__ import annotations

from .report import at_least
from .uptrain_folders import DEFAULT_EXPORT


__all__ = ["add_uptrain_arguments"]


def add_uptrain_arguments(command) -> None:
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
