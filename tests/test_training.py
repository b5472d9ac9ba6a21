"""Training: compressed datasets, the collator, LoRA defaults, Trainer / SFTTrainer runs, resume, merge, reload."""

from __future__ import annotations

import json
import pickle
import random
import shlex
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from utils import build_tiny_base_tokenizer, run_without_package, save_tiny_base_model, tiny_causal_lm_config
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer, codebook_tensors
from zip2zip_hf.finetuning.data import (
    Zip2ZipCompressor,
    Zip2ZipDataCollator,
    compress_dataset,
    dataset_stats,
    split_windows,
)
from zip2zip_hf.finetuning.training import (
    ENCODER_LEARNING_RATE_SCALE,
    CompressionLoggingCallback,
    default_lora_config,
    prepare_model_for_training,
    training_arguments,
    zip2zip_optimizer,
)


datasets = pytest.importorskip("datasets")

K, M = 64, 3
NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and lose a lot to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_tok() -> Zip2ZipTokenizer:
    return Zip2ZipTokenizer.from_base(
        build_tiny_base_tokenizer(), max_codebook_size=K, max_subtokens=M, padding_side="right"
    )


def repetitive_texts(n: int, seed: int = 0) -> list[str]:
    """Short 'programs' built from four lines: LZW finds many repeats, and a model learns them fast."""
    rng = random.Random(seed)
    return [
        "".join(f"    self.{name} = {name}\n" for name in rng.choices(NAMES, k=rng.randint(6, 14))) for _ in range(n)
    ]


def tiny_model(train_tok, arch: str = "llama", tie_encoders: bool = False, hidden: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_causal_lm_config(arch, len(train_tok), hidden=hidden, positions=256)
    base = AutoModelForCausalLM.from_config(config)
    return Zip2ZipForCausalLM.from_base(base, train_tok, hyper_encoder_num_heads=2, tie_hyper_encoders=tie_encoders)


@pytest.fixture(scope="module")
def rows(train_tok):
    return compress_dataset(
        datasets.Dataset.from_dict({"text": repetitive_texts(400)}), train_tok, max_length=64, desc=None
    )


def no_pickles(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


# ---------------------------------------------------------------------- data


def test_windows_are_maximal_and_encode_their_base_text(train_tok):
    codec = train_tok.codec
    ids = train_tok.base_ids(["".join(repetitive_texts(6, seed=3))], add_special_tokens=False)[0]
    for max_length in (2, 7, 40):
        windows = split_windows(codec, ids, max_length)
        start = 0
        for i, (codes, n_base) in enumerate(windows):
            window = ids[start : start + n_base]
            assert codes == codec.encode(window)[0] and len(codes) <= max_length
            if i < len(windows) - 1:  # one more base id would not fit
                assert len(codec.encode(ids[start : start + n_base + 1])[0]) > max_length
            start += n_base
        assert start == len(ids)


def test_compress_dataset_rows_are_inference_encodings(train_tok, rows, tmp_path):
    texts = repetitive_texts(400)
    stats = dataset_stats(rows, train_tok.initial_vocab_size)
    assert stats["hypertoken_share"] > 0.2 and stats["compression_ratio"] < 0.8
    # Re-cut every document and compare: rows are codec.encode(window) with EOS closing each document.
    expected = []
    for ids in train_tok.base_ids(texts):
        for codes, _ in split_windows(train_tok.codec, ids + [train_tok.eos_token_id], 64):
            if len(codes) >= 2:
                expected.append(codes)
    assert rows["input_ids"] == expected
    assert max(map(len, rows["input_ids"])) == 64

    # Deterministic and picklable: same fingerprint, cache hit from disk, same rows with num_proc=2.
    compressor = Zip2ZipCompressor(train_tok, 64)
    assert pickle.loads(pickle.dumps(compressor))(dict(text=texts[:3])) == compressor(dict(text=texts[:3]))
    from datasets.fingerprint import Hasher

    assert Hasher.hash(compressor) == Hasher.hash(Zip2ZipCompressor(train_tok, 64))
    assert Hasher.hash(compressor) != Hasher.hash(Zip2ZipCompressor(train_tok, 63))
    datasets.Dataset.from_dict({"text": texts[:40]}).save_to_disk(tmp_path / "raw")
    raw = datasets.load_from_disk(str(tmp_path / "raw"))
    first = compress_dataset(raw, train_tok, max_length=64, desc=None)
    again = compress_dataset(raw, train_tok, max_length=64, desc=None)
    assert first._fingerprint == again._fingerprint and first.cache_files == again.cache_files
    parallel = compress_dataset(raw, train_tok, max_length=64, num_proc=2, desc=None, load_from_cache_file=False)
    assert parallel["input_ids"] == first["input_ids"]


def test_compress_dataset_rejects_missing_column(train_tok):
    with pytest.raises(ValueError, match="no column 'text'"):
        compress_dataset(datasets.Dataset.from_dict({"content": ["x"]}), train_tok)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_and_labels_only_real_ids(train_tok, side):
    pad, V = train_tok.pad_token_id, train_tok.initial_vocab_size
    collator = Zip2ZipDataCollator(train_tok, padding_side=side)
    features = [
        {"input_ids": [5, 6, V, pad], "num_base_tokens": 5},
        {"input_ids": [7, 8]},
    ]  # row 0 ends with a real pad id
    batch = collator(features)
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, V, pad], [7, 8, pad, pad]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
        assert batch["labels"].tolist() == [[5, 6, V, pad], [7, 8, -100, -100]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, V, pad], [pad, pad, 7, 8]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
        assert batch["labels"].tolist() == [[5, 6, V, pad], [-100, -100, 7, 8]]
    with pytest.raises(ValueError, match="cut documents in base space"):
        Zip2ZipDataCollator(train_tok, max_length=3)(features)
    # The rows' codebooks, precomputed for the forward; an id that cannot stand where it is fails here.
    expected = codebook_tensors(train_tok.codec, batch["input_ids"], batch["attention_mask"])
    assert batch["codebooks"].keys() == expected.keys()
    assert all(torch.equal(batch["codebooks"][key], expected[key]) for key in expected)
    assert "codebooks" not in Zip2ZipDataCollator(train_tok, precompute_codebooks=False)(features)
    with pytest.raises(ValueError, match=r"input_ids\[0, 2\]: hyper id"):
        collator([{"input_ids": [5, 6, V + 2]}])


@pytest.mark.parametrize(
    "texts, bad_row",
    [(["x = 1\n", None], 1), ([3, 4], 0), ([["a"], ["b"]], 0), ([b"x = 1", b"y"], 0)],
)
def test_compress_dataset_refuses_what_is_not_text(train_tok, texts, bad_row):
    raw = datasets.Dataset.from_dict({"text": texts})
    with pytest.raises(ValueError, match=rf"row {bad_row}: 'text' must be a string, got"):
        compress_dataset(raw, train_tok, max_length=64, desc=None, load_from_cache_file=False)


@pytest.mark.parametrize(
    "features, message",
    [
        ([], "empty batch"),
        ([{"input_ids": [5, 6]}, {"ids": [5]}], r"row 1 has no 'input_ids'"),
        ([{"input_ids": [91.7, 277.2]}], r"row 0: input_ids must be ints: got float 91.7 at position 0"),
        ([{"input_ids": torch.tensor([91.7, 277.2])}], r"row 0: input_ids must be ints: got float"),
        ([{"input_ids": [5, None]}], r"row 0: input_ids must be ints: got NoneType None at position 1"),
        ([{"input_ids": [[5, 6], [7, 8]]}], r"row 0: input_ids must be ints: got list"),
        ([{"input_ids": torch.tensor([[5, 6]])}], r"row 0: input_ids must be ints: got list"),
        ([{"input_ids": "56"}], r"row 0: input_ids must be a sequence of ints, got str"),
        ([{"input_ids": [5, 6]}, 7], r"row 1 has no 'input_ids'"),
    ],
)
def test_the_collator_refuses_bad_rows_naming_them(train_tok, features, message):
    collator = Zip2ZipDataCollator(train_tok)
    with pytest.raises(ValueError, match=message):
        collator(features)


@pytest.mark.parametrize("setting", ["pad_to_multiple_of", "max_length"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_the_collator_refuses_bad_settings(train_tok, setting, value):
    with pytest.raises(ValueError, match=setting):
        Zip2ZipDataCollator(train_tok, **{setting: value})


# ---------------------------------------------------------------------- LoRA config


@pytest.mark.parametrize(
    "arch, targets",
    [
        ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("gpt2", ["c_attn", "c_fc", "c_proj"]),
    ],
)
@pytest.mark.parametrize("tie_encoders", [False, True])
def test_default_lora_config_targets_base_linears_and_saves_encoders(train_tok, arch, targets, tie_encoders):
    from peft import get_peft_model
    from peft.utils import ModulesToSaveWrapper

    model = tiny_model(train_tok, arch, tie_encoders=tie_encoders, hidden=32)
    peft_model = get_peft_model(model, default_lora_config(model, r=4))
    adapted = {name.rsplit(".", 2)[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert sorted(adapted) == targets  # PEFT's "all-linear": the head and the encoders left out
    inner = peft_model.get_base_model()
    encoders = ["input_hyper_encoder"] + ([] if tie_encoders else ["output_hyper_encoder"])
    assert inner.output_hyper_encoder is None if tie_encoders else True
    for name in encoders:
        assert isinstance(getattr(inner, name), ModulesToSaveWrapper), name
    lora_names = [n for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and not [n for n in lora_names if "hyper_encoder" in n]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "hyper_encoder" in n for n in trainable)
    assert any("input_hyper_encoder" in n for n in trainable)


@pytest.mark.parametrize("lora", [True, False])
def test_optimizer_gives_the_encoders_their_own_rate(train_tok, lora):
    """Every trainable parameter in exactly one group: the encoders' (LoRA's modules_to_save copies
    or the full modules) at their rate, the rest at the main rate; frozen ones in none."""
    model = tiny_model(train_tok, "llama", hidden=32)
    model = prepare_model_for_training(model, default_lora_config(model, r=4) if lora else None)
    optimizer = zip2zip_optimizer(model, 1e-3, weight_decay=0.0)
    main, encoders = optimizer.param_groups
    assert (main["lr"], encoders["lr"]) == (1e-3, pytest.approx(ENCODER_LEARNING_RATE_SCALE * 1e-3))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in encoders["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and "hyper_encoder" in n
    }
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(grouped) == len(set(grouped))
    assert zip2zip_optimizer(model, 1e-3, encoder_learning_rate=0.0).param_groups[1]["lr"] == 0.0


# ---------------------------------------------------------------------- Trainer


@pytest.mark.slow
def test_trainer_learns_and_model_emits_hypertokens(train_tok, rows, tmp_path):
    """Full finetune of a tiny random model on a repetitive corpus: loss falls far, greedy output compresses."""
    model = prepare_model_for_training(tiny_model(train_tok))
    collator = Zip2ZipDataCollator(train_tok)
    args = training_arguments(
        str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=200,
        learning_rate=3e-3,
        warmup_steps=10,
        logging_steps=10,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    CompressionLoggingCallback(collator).attach(trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.25 * losses[0], losses
    logged = [entry for entry in trainer.state.log_history if "hypertoken_share" in entry]
    assert logged and 0.2 < logged[-1]["hypertoken_share"] < 1 and 0 < logged[-1]["compression_ratio"] < 1

    model.eval()
    prompt = train_tok(["    self.alpha = alpha\n    self.beta = beta\n"], return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False, return_hypertokens=True)
    generated = out[0, n:].tolist()
    assert sum(i >= train_tok.initial_vocab_size for i in generated) >= 5, generated
    text = train_tok.decode(out[0], skip_special_tokens=True)
    assert "    self." in text[len("    self.alpha = alpha\n    self.beta = beta\n") :]


@pytest.mark.slow  # trains with a Trainer
@pytest.mark.parametrize("workers", [0, 2])
def test_compression_logs_count_every_training_batch_whatever_the_workers(train_tok, tmp_path, workers):
    """The counts are taken where the model reads the batches, so DataLoader workers (which collate
    in other processes) change nothing: every row here is the same, so each log has its values."""
    row = compress_dataset(
        datasets.Dataset.from_dict({"text": repetitive_texts(1)}), train_tok, max_length=64, desc=None
    )[0]
    ids, n_base = row["input_ids"], row["num_base_tokens"]
    expected_share = sum(i >= train_tok.initial_vocab_size for i in ids) / len(ids)
    args = training_arguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=2,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=workers,
        report_to=[],
    )
    dataset = datasets.Dataset.from_dict({"input_ids": [ids] * 16})
    callback = CompressionLoggingCallback(train_tok)
    trainer = Trainer(
        model=tiny_model(train_tok), args=args, train_dataset=dataset, data_collator=Zip2ZipDataCollator(train_tok)
    )
    callback.attach(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert entry["hypertoken_share"] == pytest.approx(expected_share, abs=1e-4)
        assert entry["compression_ratio"] == pytest.approx(len(ids) / n_base, abs=1e-4)
    assert not trainer.model._forward_pre_hooks  # removed when training ended


def lora_trainer(train_tok, rows, output_dir, max_steps, tie_encoders=False):
    model = tiny_model(train_tok, tie_encoders=tie_encoders, seed=0)
    torch.manual_seed(1)
    peft_model = prepare_model_for_training(model, default_lora_config(model, r=8), gradient_checkpointing=True)
    args = training_arguments(
        str(output_dir),
        gradient_checkpointing=True,
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=Zip2ZipDataCollator(train_tok))


@pytest.mark.slow
def test_lora_training_resume_merge_save_and_remote_code_reload(train_tok, rows, tmp_path):
    trainer = lora_trainer(train_tok, rows, tmp_path / "run", max_steps=6)
    peft_model = trainer.model
    inner = peft_model.get_base_model()
    assert inner.is_gradient_checkpointing
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainer.train()
    after = dict(peft_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any("input_hyper_encoder.modules_to_save" in n for n in changed)
    assert any("output_hyper_encoder.modules_to_save" in n for n in changed)
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert frozen and not changed.intersection(frozen)

    # Checkpoints: safetensors adapters (with the full encoders); resuming gives the same weights.
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    # (The Trainer's own optimizer.pt / scheduler.pt / rng_state.pth / training_args.bin are not model weights.)
    assert not [
        p for p in no_pickles(tmp_path / "run") if Path(p).name.startswith(("adapter_model", "pytorch_model", "model"))
    ]
    resumed = lora_trainer(train_tok, rows, tmp_path / "resumed", max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, after[name], atol=1e-5, rtol=1e-4, msg=name)

    # Merge, save with the tokenizer, reload through remote code: same logits, same text.
    merged = peft_model.merge_and_unload().eval()
    assert type(merged) is Zip2ZipForCausalLM
    final = tmp_path / "final"
    merged.save_pretrained(final)
    train_tok.save_pretrained(final)
    assert not no_pickles(final)
    # A fresh process without our package: the checkpoint's own code must do everything.
    prompt_text = "    self.gamma = gamma\n    self.gamma = gamma\n"
    ids = train_tok([prompt_text], return_tensors="pt")
    with torch.no_grad():
        logits = merged(**ids).logits
    text = train_tok.decode(merged.generate(**ids, max_new_tokens=12, do_sample=False)[0])
    save_file({"ids": ids["input_ids"], "logits": logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(final)!r}, trust_remote_code=True).eval()
        train_tok = AutoTokenizer.from_pretrained({str(final)!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model)
        ids = train_tok([{prompt_text!r}], return_tensors="pt")
        assert torch.equal(ids["input_ids"], expected["ids"])
        with torch.no_grad():
            torch.testing.assert_close(model(**ids).logits, expected["logits"], atol=1e-5, rtol=1e-5)
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        print(json.dumps(train_tok.decode(out[0])))
        """
    )
    assert json.loads(run_without_package(script)) == text


@pytest.mark.slow  # trains with a Trainer
def test_lora_with_tied_encoders_trains(train_tok, rows, tmp_path):
    trainer = lora_trainer(train_tok, rows, tmp_path, max_steps=2, tie_encoders=True)
    encoder = trainer.model.get_base_model().input_hyper_encoder
    before = [p.detach().clone() for p in encoder.modules_to_save.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.modules_to_save.parameters(), strict=True))
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and not no_pickles(tmp_path / "adapter")


def test_gradient_checkpointing_gives_the_same_gradients(train_tok, rows):
    batch = Zip2ZipDataCollator(train_tok)([rows[i] for i in range(4)])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(train_tok, seed=0)
        torch.manual_seed(1)
        peft_model = prepare_model_for_training(
            model, default_lora_config(model, r=4), gradient_checkpointing=checkpointing
        )
        peft_model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------- TRL


@pytest.mark.slow  # trains with a Trainer
def test_trl_sft_trainer_with_our_tokenizer(train_tok, tmp_path):
    trl = pytest.importorskip("trl")
    from packaging.version import Version

    if Version(trl.__version__) >= Version("1.15"):
        pytest.skip("trl >= 1.15 replaces the LM head with a fused static one, which cannot score hypertokens")
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(train_tok, hidden=32)
    texts = datasets.Dataset.from_dict({"text": repetitive_texts(32, seed=5)})
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-3,
        max_length=128,
        loss_type="nll",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=texts,
        processing_class=train_tok,
        peft_config=default_lora_config(model, r=4),
    )
    row = trainer.train_dataset[0]["input_ids"]
    assert any(i >= train_tok.initial_vocab_size for i in row) and row[-1] == train_tok.eos_token_id
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


# ---------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """`python -m zip2zip_hf demo` with every stage, shrunk: a tiny base model folder and a few steps."""
    from zip2zip_hf.tools.cli import main

    save_tiny_base_model(tmp_path)
    argv = [
        "demo",
        "--finetune",
        "--model",
        str(tmp_path),
        "--steps",
        "2",
        "--max-length",
        "48",
        "--train-chars",
        "30000",
        "--eval-rows",
        "2",
        "--new-tokens",
        "8",
        "-K",
        "64",
        "-M",
        "3",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for heading in ("1/6 model", "2/6 data", "3/6 held-out loss", "4/6 LoRA", "5/6 held-out loss after", "6/6 greedy"):
        assert heading in out
    assert "zip2zip, after training" in out and "stdlib/textwrap.py" in out
    assert out.rstrip().splitlines()[-1].startswith("demo finished in")


# ---------------------------------------------------------------------- uptrain


def test_a_run_records_every_command_that_trained_it(tmp_path):
    """A run extended with more --steps trains under a new schedule, so one command would not remake it:
    the record names each leg, and one that only exports again adds none."""
    from zip2zip_hf.tools.uptrain_folders import RECIPE_FILE, run_commands

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / RECIPE_FILE).write_text(json.dumps({"recipe": {}, "commands": ["first leg"]}))
    assert run_commands(None, 0, 4, "first leg") == ["first leg"]
    assert run_commands(checkpoint, 4, 6, "second leg") == ["first leg", "second leg"]
    assert run_commands(checkpoint, 4, 4, "export again") == ["first leg"]
    (checkpoint / RECIPE_FILE).unlink()  # a checkpoint of an older version: what trained it is unknown
    assert run_commands(checkpoint, 4, 6, "second leg") == ["(not recorded: what trained it to step 4)", "second leg"]


@pytest.mark.slow
def test_uptrain_resumes_exports_bf16_and_the_export_loads_as_trained(tmp_path, capsys, monkeypatch):
    """`python -m zip2zip_hf uptrain`, shrunk to a tiny base: a run cut off after 2 steps resumes from
    its checkpoint (the step count and the held-out curve continue), and the exported bf16 adapter
    loads back into a model that scores the held-out text as the record says."""
    from safetensors import safe_open

    import zip2zip_hf.tools.uptrain as uptrain

    unseen = uptrain.unseen_held_out(300)  # the held-out text of other sources, cut short
    monkeypatch.setattr(uptrain, "unseen_held_out", lambda: unseen)

    from zip2zip_hf.tools.cli import main
    from zip2zip_hf.tools.embedded import _load_zip2zip, shipped_record
    from zip2zip_hf.tools.uptrain import score_held_out

    base_dir = save_tiny_base_model(tmp_path / "base")
    recipe = json.dumps(
        {"max_codebook_size": 64, "max_subtokens": 3, "window": 48, "eval_window": 48, "lora_r": 4, "max_chars": 20000}
    )
    common = ["uptrain", "--model", str(base_dir), "--recipe", recipe, "--output-dir", str(tmp_path / "run")]
    common += ["--save-steps", "2", "--eval-steps", "2", "--logging-steps", "1", "--export", str(tmp_path / "out")]
    assert main([*common, "--steps", "2"]) == 0
    first = shipped_record(tmp_path / "out")
    assert first["steps"] == 2 and [entry["step"] for entry in first["curve"]] == [0, 2]
    assert main([*common, "--steps", "4", "--overwrite"]) == 0  # an earlier export is replaced only when asked
    record = shipped_record(tmp_path / "out")
    assert record["steps"] == 4 and [entry["step"] for entry in record["curve"]] == [0, 2, 4]
    assert record["training_seconds"] > first["training_seconds"]
    # Each leg trained with its own schedule, so the record names both commands, in order.
    legs = [[*common, "--steps", "2"], [*common, "--steps", "4", "--overwrite"]]
    assert record["commands"] == [shlex.join(["python", "-m", "zip2zip_hf", *leg]) for leg in legs]

    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert {weights.get_tensor(name).dtype for name in names} == {torch.bfloat16}
    assert any("lora_A" in n for n in names) and any("output_hyper_encoder" in n for n in names)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model, tokenizer = _load_zip2zip(base, AutoTokenizer.from_pretrained(base_dir), tmp_path / "out", None)
    scores = score_held_out(model, tokenizer, 48)["all"]
    recorded = record["held_out"]["zip2zip"]["all"]
    assert scores["steps_per_byte"] == recorded["steps_per_byte"]
    assert abs(scores["bits_per_byte"] - recorded["bits_per_byte"]) < 0.01 * recorded["bits_per_byte"]  # bf16
