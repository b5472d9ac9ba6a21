"""Self-distillation: the alignment the collator makes, the exact LZW targets, each term, the Trainer."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from utils import (
    DISABLED,
    PAD,
    V,
    build_tiny_base_tokenizer,
    left_pad,
    repetitive_ids,
    tiny_base,
    tiny_causal_lm_config,
    wrap,
)
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer, codebook_tensors
from zip2zip_hf.finetuning.data import Zip2ZipDataCollator
from zip2zip_hf.finetuning.distillation import (
    DistillationConfig,
    Zip2ZipDistillationTrainer,
    Zip2ZipDistiller,
    _Spans,
    alignment_tensors,
)
from zip2zip_hf.lzw import LZWCodec


M = 3
CODEC = LZWCodec(V, 64, M, DISABLED)


def right_pad(rows: list[list[int]]):
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def batch_of(rows: list[list[int]], side: str = "left", codec: LZWCodec = CODEC) -> dict:
    ids, mask = (left_pad if side == "left" else right_pad)(rows)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
        "codebooks": codebook_tensors(codec, ids, mask),
        "distillation": alignment_tensors(codec, ids, mask),
    }


# Few distinct ids (two of them disabled): LZW installs, extends and fills codebooks quickly.
texts = st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=60), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(texts, st.sampled_from(["left", "right"]))
def test_extension_sets_are_the_children_installed_when_each_id_is_written(base_rows, side):
    """X_t is every id that extends code t's phrase in the codebook that `encode` has built on the
    text up to the end of that phrase: exactly what greedy LZW checked before writing code t."""
    rows = [CODEC.encode([2, *r])[0] for r in base_rows]
    batch = batch_of(rows, side)
    found = {}
    alignment = batch["distillation"]
    for b, t, x in zip(*(alignment[k].tolist() for k in ("extension_rows", "extension_codes", "extension_ids"))):
        found.setdefault((b, t), set()).add(x)
    for b, codes in enumerate(rows):
        columns = [t for t in range(batch["input_ids"].shape[1]) if batch["attention_mask"][b, t]]
        base, codebook = CODEC.decode(codes)
        assert alignment["base_ids"][b, : len(base)].tolist() == base
        assert alignment["base_mask"][b].sum() == len(base)
        end = 0
        for t, code in zip(columns, codes):
            phrase = codebook.get_subtokens(code)
            end += len(phrase)
            installed = CODEC.encode(base[:end])[1].to_list()
            expected = {c[-1] for c in installed if tuple(c[:-1]) == phrase} if len(phrase) < M else set()
            assert found.get((b, t), set()) == expected, (b, t, phrase)


def teacher_token_log_probs(base_model, alignment) -> torch.Tensor:
    """(B, L): log p_T(b_i | b_<i) of each real base id after the first, 0 elsewhere."""
    ids, mask = alignment["base_ids"], alignment["base_mask"]
    with torch.no_grad():
        log_probs = torch.log_softmax(base_model(input_ids=ids, attention_mask=mask).logits[..., :V].float(), -1)
    token = log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    return torch.nn.functional.pad(token, (1, 0))


@pytest.mark.parametrize("side", ["left", "right"])
def test_corrected_span_targets_telescope_to_the_teachers_probability_of_the_text(side):
    """Over a window the targets multiply to the teacher's probability of the text after the first
    id: a student matching them scores the teacher's bits per byte on canonical ids. The correction
    moves mass between positions (a code whose phrase could have been extended gets less, the code
    after it more) and changes no target where neither it nor the code before had an extension."""
    base_model = tiny_base("llama")
    rows = [CODEC.encode([2, *repetitive_ids(seed, n)])[0] for seed, n in ((0, 80), (1, 47))]
    batch = batch_of(rows, side)
    alignment, lengths = batch["distillation"], batch["codebooks"]["lengths"]
    token = teacher_token_log_probs(base_model, alignment)
    counted = (lengths[:, 1:] > 0) & (lengths[:, :-1] > 0)
    logits = base_model(input_ids=alignment["base_ids"], attention_mask=alignment["base_mask"]).logits.detach()
    corrected, naive = (_Spans(lengths, alignment, logits[..., :V], c).target_log_probs() for c in (True, False))
    text = token[:, 1:].sum(1)  # after the first id ([2]: one base id, never extended)
    torch.testing.assert_close((corrected * counted).sum(1), text, atol=1e-4, rtol=1e-5)

    extended = torch.zeros_like(lengths, dtype=torch.bool)
    extended[alignment["extension_rows"], alignment["extension_codes"]] = True
    real = lengths > 0
    extended &= torch.nn.functional.pad(real[:, 1:], (0, 1))  # the last code is written because the text ends
    touched = (extended[:, 1:] | extended[:, :-1]) & counted
    assert bool(touched.any())
    assert (corrected != naive)[touched].all()
    torch.testing.assert_close(corrected[counted & ~touched], naive[counted & ~touched])


def distiller_terms(model, batch, **config) -> dict[str, float]:
    _, _, terms = Zip2ZipDistiller(DistillationConfig(**config))(model, batch)
    return {name: float(value) for name, value in terms.items()}


def test_the_ce_term_is_the_models_own_loss():
    """(Right padding: with left padding the model's own loss also scores each row's first id,
    predicted from padding; the distiller does not.)"""
    model = wrap(tiny_base("llama"))
    batch = batch_of([CODEC.encode(repetitive_ids(seed, n))[0] for seed, n in ((3, 70), (4, 50))], "right")
    with torch.no_grad():
        expected = float(model(**batch).loss)
    assert distiller_terms(model, batch, ce=1.0, span=0.0) == {"ce": pytest.approx(expected, rel=1e-5)}


def lora_student(max_codebook_size: int):
    from peft import get_peft_model

    from zip2zip_hf.finetuning.training import default_lora_config

    model = wrap(tiny_base("llama"), max_codebook_size=max_codebook_size)
    return get_peft_model(model, default_lora_config(model, r=4))


def test_without_hypertokens_a_fresh_lora_student_is_its_teacher():
    """K = 0: the student reads base ids at base positions, and a fresh LoRA adds nothing, so every
    teacher term is zero: the terms compare the right positions and the teacher is the adapter-free
    base model."""
    codec = LZWCodec(V, 0, M, DISABLED)
    rows = [codec.encode([2, *repetitive_ids(seed, 50)])[0] for seed in (5, 6)]
    batch = batch_of(rows, "left", codec)
    terms = distiller_terms(lora_student(0), batch, ce=1.0, span=1.0, marginal=1.0, hidden=1.0)
    assert terms["ce"] > 1.0
    for name in ("span", "marginal", "hidden"):
        assert abs(terms[name]) < 1e-5, (name, terms)


def test_every_term_is_positive_and_gives_gradients_where_the_student_differs():
    student = lora_student(64)
    batch = batch_of([CODEC.encode([2, *repetitive_ids(seed, 90)])[0] for seed in (7, 8)])
    config = DistillationConfig(ce=0.0, span=1.0, marginal=1.0, hidden=1.0)
    for name in ("span", "marginal", "hidden"):
        only = DistillationConfig(
            **{**config.to_dict(), **{n: float(n == name) for n in ("span", "marginal", "hidden")}}
        )
        student.zero_grad()
        loss, _, terms = Zip2ZipDistiller(only)(student, batch)
        assert float(terms[name]) > 1e-4
        loss.backward()
        encoder_grads = [p.grad for n, p in student.named_parameters() if "hyper_encoder" in n and p.grad is not None]
        assert encoder_grads and any(float(g.abs().sum()) > 0 for g in encoder_grads), name


def test_a_full_finetune_needs_a_teacher_model():
    model = wrap(tiny_base("llama"))
    batch = batch_of([CODEC.encode([2, 3, 4, 2, 3, 4, 2, 3])[0]])
    with pytest.raises(ValueError, match="teacher_model"):
        Zip2ZipDistiller(DistillationConfig(span=1.0))(model, batch)
    loss, _, terms = Zip2ZipDistiller(DistillationConfig(span=1.0), teacher_model=tiny_base("llama"))(model, batch)
    assert math.isfinite(float(loss)) and set(terms) == {"ce", "span"}


def test_batches_without_alignment_are_refused():
    model = wrap(tiny_base("llama"))
    batch = batch_of([CODEC.encode([2, 3, 4, 2, 3])[0]])
    del batch["distillation"]
    with pytest.raises(ValueError, match="distillation=True"):
        Zip2ZipDistiller(DistillationConfig(span=1.0))(model, batch)


@pytest.mark.slow  # trains with a Trainer
def test_the_trainer_distils_with_lora_and_leaves_the_teacher_untouched(tmp_path):
    from peft import get_peft_model

    from zip2zip_hf.finetuning.training import default_lora_config, training_arguments, zip2zip_optimizer

    torch.manual_seed(0)
    tokenizer = Zip2ZipTokenizer.from_base(
        build_tiny_base_tokenizer(), max_codebook_size=64, max_subtokens=3, padding_side="right"
    )
    config = tiny_causal_lm_config("llama", len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(Zip2ZipForCausalLM.from_base(base, tokenizer), default_lora_config(base, r=4))
    rng = random.Random(0)
    lines = ["x = 1\n", "for i in range(n):\n", "    total += i\n", "return total\n"]
    texts = ["".join(rng.choice(lines) for _ in range(12)) for _ in range(8)]
    rows = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]
    probe = torch.tensor([tokenizer.base_ids(texts[:1])[0]])
    with torch.no_grad():
        before = base(input_ids=probe).logits.clone()

    trainer = Zip2ZipDistillationTrainer(
        model=model,
        args=training_arguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2),
        train_dataset=rows,
        data_collator=Zip2ZipDataCollator(tokenizer, distillation=True),
        optimizers=(zip2zip_optimizer(model, 5e-3), None),
        distillation=DistillationConfig(ce=1.0, span=1.0, marginal=0.5, hidden=0.5),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(
        {"distill_ce", "distill_span", "distill_marginal", "distill_hidden"} <= set(e) for e in logged
    )
    with torch.no_grad(), model.disable_adapter():
        teacher = model.get_base_model().language_model(input_ids=probe).logits
        torch.testing.assert_close(teacher, before)
    with torch.no_grad():  # the student did change
        assert not torch.allclose(model.get_base_model().language_model(input_ids=probe).logits, before)


def test_the_first_id_marginal_sums_each_legal_ids_probability_onto_its_first_base_id():
    from zip2zip_hf.finetuning.distillation import _first_id_marginal

    model = wrap(tiny_base("llama"))
    rows = [CODEC.encode([2, *repetitive_ids(seed, n)])[0] for seed, n in ((9, 60), (10, 35))]
    batch = batch_of(rows, "right")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits.float(), -1)
    marginal = _first_id_marginal(probs, batch["codebooks"], V)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(marginal.sum(-1)[real], torch.ones(int(real.sum())))
    for b, codes in enumerate(rows):
        stream = CODEC.stream()
        for t, code in enumerate(codes):
            stream.feed([code])
            expected = probs[b, t, :V].clone()
            for k in range(stream.num_legal_hyper):
                pending = stream.provisional_subtokens()
                content = pending if k == stream.num_installed else stream.codebook.get_subtokens(V + k)
                expected[content[0]] += probs[b, t, V + k]
            torch.testing.assert_close(marginal[b, t], expected)
