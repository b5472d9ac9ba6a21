"""Multi-process training: ``torchrun --nproc_per_node=2`` (gloo, CPU) with plain ``transformers.Trainer``,
and ``python -m zip2zip_hf uptrain`` under ``torchrun`` / ``accelerate launch`` with DDP and FSDP2.

The ranks must end with identical parameters, the loss must fall, and a rank whose batch holds no
hypertoken at all must not hang DDP (the model runs both hyper-encoders every training step).

``uptrain`` on two processes must train as one process does at the same global batch (the recipe's
``batch_size``): the same loss at every step and the same exported adapter, with DDP and with FSDP2,
also when the run is killed and resumed. The tolerance: a relative 1e-4 on each logged loss and
bfloat16's own rounding (one unit in the last place, 2**-8 relative) on the exported weights. The two
runs do the same float32 arithmetic but sum it in another order (each process sums its half of the
batch, then the gradients are averaged across processes, by all-reduce or reduce-scatter), which
moves the last bits of a gradient; measured over 6 steps the losses differ by under 1e-6 relative.
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
import time
from pathlib import Path

import pytest
import transformers

from utils import TINY_UPTRAIN_RECIPE, save_tiny_base_model


pytestmark = pytest.mark.slow  # each test starts processes


pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:  # a free port (torchrun's --master_port=0 hangs with the static rendezvous)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun() -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
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


def environment() -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO / "src"),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # On a timeout the launcher and every rank are killed (never left behind).
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
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


# ---------------------------------------------------------------------- uptrain on several processes

# 4 rows per optimizer step: 2 per process on two, all 4 on one. A rate high enough to move the loss.
UPTRAIN_RECIPE = json.dumps({**TINY_UPTRAIN_RECIPE, "batch_size": 4, "learning_rate": 0.005})
UPTRAIN_STEPS = 6
LOSS_TOLERANCE = 1e-4  # relative, per logged step (see the module docstring)


def accelerate_launch() -> list[str]:
    # --multi_gpu is accelerate's multi-process launcher; on a machine without GPUs the Trainer runs it on gloo.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]


def uptrain(launcher: list[str], base: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *launcher,
        "-m",
        "zip2zip_hf",
        "uptrain",
        "--model",
        str(base),
        "--recipe",
        UPTRAIN_RECIPE,
        "--output-dir",
        str(run_dir),
        "--steps",
        str(UPTRAIN_STEPS),
        "--save-steps",
        "2",
        "--eval-steps",
        str(UPTRAIN_STEPS),
        "--logging-steps",
        "1",
        "--threads",
        "1",
        *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / f"checkpoint-{UPTRAIN_STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """The same loss at every step (within LOSS_TOLERANCE) and the same exported adapter (bfloat16)."""
    import torch
    from safetensors.torch import load_file

    got, expected = losses(run_dir), losses(reference)
    assert len(got) == len(expected) == UPTRAIN_STEPS, (got, expected)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
    assert worst < LOSS_TOLERANCE, f"losses differ by {worst:.2e} relative: {got} vs {expected}"
    assert len(set(expected)) > 1  # the curve moves: the comparison says something
    weights, reference_weights = (
        load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir, reference)
    )
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert weights[name].shape == value.shape and weights[name].dtype == torch.bfloat16, name
        torch.testing.assert_close(weights[name].float(), value.float(), rtol=2**-7, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def uptrain_base(tmp_path_factory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("uptrain-base"))


@pytest.fixture(scope="module")
def one_process_run(uptrain_base, tmp_path_factory) -> Path:
    """The reference: one process reading all 4 rows of each step."""
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    run(uptrain([sys.executable], uptrain_base, run_dir), cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(uptrain_base, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    done = run(uptrain(torchrun(), uptrain_base, run_dir, "--fsdp"), cwd=run_dir.parent)
    return run_dir, done.stdout


def test_uptrain_with_ddp_trains_as_one_process(uptrain_base, one_process_run, tmp_path):
    run_dir = tmp_path / "run"
    done = run(uptrain(torchrun(), uptrain_base, run_dir), cwd=tmp_path)
    assert_same_training(run_dir, one_process_run)
    assert "2 processes (DDP): 2 rows each per forward, 1 forward(s) per step, 4 rows per step" in done.stdout
    assert done.stdout.count("wrote ") == 1, "one process writes the export"
    checkpoint = run_dir / f"checkpoint-{UPTRAIN_STEPS}"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()


def test_uptrain_with_fsdp2_trains_as_one_process(fsdp_run, one_process_run):
    run_dir, stdout = fsdp_run
    assert_same_training(run_dir, one_process_run)
    assert "2 processes (FSDP2)" in stdout and stdout.count("wrote ") == 1
    # Sharded for real (not silently replicated): the Trainer's FSDP checkpoint files.
    assert (run_dir / f"checkpoint-{UPTRAIN_STEPS}" / "pytorch_model_fsdp.bin").is_file()


def test_uptrain_fsdp2_export_is_whole_and_loads(fsdp_run, one_process_run, uptrain_base):
    """The FSDP2 export is one process's export: the whole adapter (no shard, no DTensor), its PEFT config
    and uptrain.json, and the existing loader reads it into a model that generates."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zip2zip_hf.tools.embedded import _load_zip2zip, shipped_record

    run_dir, _ = fsdp_run
    export, reference = run_dir / "adapter", one_process_run / "adapter"
    assert sorted(p.name for p in export.iterdir()) == sorted(p.name for p in reference.iterdir())
    shapes = []
    for folder in (export, reference):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
            shapes.append({name: list(weights.get_slice(name).get_shape()) for name in weights.keys()})
    assert shapes[0] == shapes[1] and any("lora_A" in name for name in shapes[0])
    assert json.loads((export / "adapter_config.json").read_text()) == json.loads(
        (reference / "adapter_config.json").read_text()
    )
    record = shipped_record(export)
    assert record["steps"] == UPTRAIN_STEPS and record["recipe"]["batch_size"] == 4

    base = AutoModelForCausalLM.from_pretrained(uptrain_base)
    model, tokenizer = _load_zip2zip(base, AutoTokenizer.from_pretrained(uptrain_base), export, None)
    prompt = tokenizer(["def f(x):\n    return x\n"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] > 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts each rank in a session of its own, so a
    process group is not enough to kill a whole run)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    for each in process_tree(pid):
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_first_checkpoint(command: list[str], run_dir: Path, timeout: float = 300) -> None:
    """Start ``command`` and SIGKILL the launcher and every rank once a checkpoint is in place."""
    process = subprocess.Popen(
        command,
        cwd=run_dir.parent,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not (run_dir / "checkpoint-2").is_dir():
            assert process.poll() is None, f"the run ended (exit {process.returncode}) before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        kill_tree(process.pid)  # as a machine that dies: launcher and ranks at once
        process.wait()
    assert not (run_dir / "adapter").exists(), "killed too late: the run had finished"


# transformers 4.57 loads a multi-process run's optimizer state with map_location=args.device, which is
# "cpu:0" on CPU processes and which torch cannot restore to: its DDP runs resume on GPUs only.
DDP_RESUMES_ON_CPU = int(transformers.__version__.split(".")[0]) >= 5


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "ddp",
            marks=pytest.mark.skipif(
                not DDP_RESUMES_ON_CPU,
                reason="transformers 4.57 maps the optimizer state of a multi-process CPU run to 'cpu:0', which "
                "torch.load cannot restore (a resume on GPUs is unaffected)",
            ),
        ),
        "fsdp",
    ],
)
def test_uptrain_killed_then_resumed_trains_as_one_process(kind, uptrain_base, one_process_run, tmp_path):
    """A run SIGKILLed (launcher and ranks) after its first checkpoint, started again with the same command,
    resumes from its newest intact checkpoint and ends as the uninterrupted one-process run. DDP runs under
    ``accelerate launch``, FSDP2 under ``torchrun``."""
    run_dir = tmp_path / "run"
    launcher, extra = (accelerate_launch(), ()) if kind == "ddp" else (torchrun(), ("--fsdp",))
    kill_after_first_checkpoint(uptrain(launcher, uptrain_base, run_dir, *extra), run_dir)
    launcher = accelerate_launch() if kind == "ddp" else torchrun()  # a fresh port
    done = run(uptrain(launcher, uptrain_base, run_dir, *extra), cwd=tmp_path)
    assert "resuming from" in done.stdout
    assert_same_training(run_dir, one_process_run)
