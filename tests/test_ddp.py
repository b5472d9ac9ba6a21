"""Multi-process training: ``torchrun --nproc_per_node=2`` (gloo, CPU) with plain ``transformers.Trainer``.

The ranks must end with identical parameters, the loss must fall, and a rank whose batch holds no
hypertoken at all must not hang DDP (the model runs both hyper-encoders every training step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from utils import save_tiny_base_model


pytestmark = pytest.mark.slow  # each test starts processes


pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parents[1]


def torchrun() -> list[str]:
    with socket.socket() as probe:  # a free port (torchrun's --master_port=0 hangs with the static rendezvous)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import datasets, torch
    import torch.distributed as dist
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer
    from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
    from zip2zip_hf.finetuning.data import Zip2ZipDataCollator, compress_dataset
    from zip2zip_hf.finetuning.training import default_lora_config, prepare_model_for_training, training_arguments

    model_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    tok = Zip2ZipTokenizer.from_base(model_dir, max_codebook_size=64, max_subtokens=3, padding_side="right")
    # Rows alternate: repetitive code (many hypertokens), then text with no repeat (none at all).
    repetitive = "    self.alpha = alpha\\n    self.beta = beta\\n" * 6
    plain = "a quick brown fox jumps over"
    texts = [repetitive if i % 2 == 0 else plain for i in range(40)]
    rows = compress_dataset(datasets.Dataset.from_dict({"text": texts}), tok, max_length=64, desc=None)
    V = tok.initial_vocab_size
    assert all(any(i >= V for i in ids) == (j % 2 == 0) for j, ids in enumerate(rows["input_ids"]))

    class Ordered(Trainer):  # batch b of every global step goes to rank b: rank 1 only sees plain rows
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Collator(Zip2ZipDataCollator):
        hyper_free_batches = 0
        def __call__(self, features):
            batch = super().__call__(features)
            Collator.hyper_free_batches += int(not (batch["input_ids"] >= V).any())
            return batch

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = Zip2ZipForCausalLM.from_base(base, tok, hyper_encoder_num_heads=2)
    model = prepare_model_for_training(model, default_lora_config(model, r=4))
    args = training_arguments(
        out_dir, per_device_train_batch_size=1, max_steps=12, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        disable_tqdm=True, seed=0,
    )
    trainer = Ordered(model=model, args=args, train_dataset=rows, data_collator=Collator(tok))
    trainer.train()
    digest = hashlib.sha256()
    for name, param in sorted(trainer.model.named_parameters()):
        digest.update(name.encode()); digest.update(param.detach().double().numpy().tobytes())
    rank = dist.get_rank()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"digest": digest.hexdigest(), "losses": losses, "hyper_free_batches": Collator.hyper_free_batches,
                   "world": dist.get_world_size()}, f)
    """
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("tiny-llama"))


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO / "src"),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # Own process group, so a hung rank is killed with torchrun on timeout (never left behind).
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (DDP hang?)\n{stdout[-2000:]}\n{stderr[-4000:]}")
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def test_torchrun_two_ranks_stay_identical(tiny_model_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    run([*torchrun(), str(script), str(tiny_model_dir), str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks' parameters differ"
    assert ranks[1]["hyper_free_batches"] >= 1 and ranks[0]["hyper_free_batches"] == 0
    losses = ranks[0]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_finetune_example_under_torchrun(tiny_model_dir, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(12):
        (data / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(i, i + 8)))
    out = tmp_path / "out"
    done = run(
        [
            *torchrun(),
            str(REPO / "examples" / "finetune.py"),
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--max-length",
            "64",
            "-K",
            "64",
            "-M",
            "3",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--logging-steps",
            "1",
            "--output-dir",
            str(out),
        ],
        cwd=tmp_path,
    )
    assert "compression ratio" in done.stdout and "hypertoken_share" in done.stdout + done.stderr
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "base_tokenizer.json").is_file()
    assert not [p for p in final.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
    shutil.rmtree(out)
