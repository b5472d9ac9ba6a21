"""Zip2ZipForCausalLM: training equals inference, masks, loss, encoders, save/load, bad input."""

import functools
import json
import os
import re
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import zip2zip_hf
from utils import (
    DISABLED,
    PAD,
    K,
    M,
    V,
    assert_same_logits,
    compressed,
    left_pad,
    run_without_package,
    step_by_step_logits,
    tiny_base,
    tiny_causal_lm_config,
    wrap,
)
from zip2zip_hf import LZWCodec, Zip2ZipConfig, Zip2ZipForCausalLM, Zip2ZipModel
from zip2zip_hf.configuration_zip2zip import ZIP2ZIP_FORMAT_VERSION
from zip2zip_hf.modeling_zip2zip import HYPER_ENCODER_NAMES


# ---------------------------------------------------------------------- training equals inference


@pytest.mark.parametrize("on_device", [True, False], ids=["device-codebooks", "python-streams"])
@pytest.mark.parametrize("position_mode", ["base", "compressed"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_teacher_forced_equals_step_by_step(arch, position_mode, on_device):
    model = wrap(tiny_base(arch), position_mode, on_device=on_device)
    rows = [compressed(seed, n) for seed, n in ((1, 120), (2, 70), (3, 95))]
    assert all(any(i >= V for i in r) for r in rows), "the texts must produce hypertokens"
    ids, mask = left_pad(rows)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        stepped = step_by_step_logits(model, ids, mask)
        assert_same_logits(full, stepped, mask)
        for b, row in enumerate(rows):  # each row alone, unpadded, equals its padded batch row
            alone = model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
            assert_same_logits(full[b, -len(row) :], alone)


def test_cached_block_continuation_equals_uncached():
    model = wrap(tiny_base("llama"))
    ids, mask = left_pad([compressed(4, 150), compressed(5, 110)])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        split = 40
        first = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
        rest = model(input_ids=ids[:, split:], attention_mask=mask, past_key_values=first.past_key_values)
    assert_same_logits(full, torch.cat([first.logits, rest.logits], dim=1), mask)


def test_logits_to_keep_matches_full():
    model = wrap(tiny_base("llama"))
    ids, mask = left_pad([compressed(6, 90), compressed(7, 60)])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert_same_logits(full[:, -1:], last)


# ---------------------------------------------------------------------- precomputed codebooks


def _precomputed_batch(padding_side="left"):
    codec = LZWCodec(V, K, M, DISABLED)
    rows = [compressed(seed, n) for seed, n in ((13, 130), (14, 60))] + [codec.encode([5] * 14 + [7, 5, 5])[0]]
    ids, mask = left_pad(rows)
    if padding_side == "right":  # the same rows, padding moved to the end
        ids = torch.stack([torch.cat([r[m.bool()], r[~m.bool()]]) for r, m in zip(ids, mask)])
        mask = mask.flip(1)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize(
    "arch, position_mode, hyper_encoder, tie_encoders, padding_side",
    [
        ("llama", "base", "attention", False, "left"),
        ("llama", "compressed", "mean", True, "right"),
        ("gpt2", "base", "attention", True, "right"),
        ("qwen2", "compressed", "attention", False, "left"),
    ],
)
def test_precomputed_codebooks_give_the_same_logits_loss_and_gradients(
    arch, position_mode, hyper_encoder, tie_encoders, padding_side
):
    model = wrap(tiny_base(arch, tie=True), position_mode, hyper_encoder, tie_encoders)
    model.config.get_text_config().use_cache = False
    ids, mask, labels = _precomputed_batch(padding_side)
    codebooks = zip2zip_hf.codebook_tensors(model.codec, ids, mask)
    assert codebooks["entries"].shape[1] > 10 and (codebooks["provisional_lengths"] > 0).any()
    results = []
    for extra in ({}, {"codebooks": codebooks}):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits, loss, grads), (pre_logits, pre_loss, pre_grads) = results
    assert_same_logits(logits, pre_logits, mask)
    torch.testing.assert_close(loss, pre_loss)
    assert grads.keys() == pre_grads.keys()
    assert hyper_encoder == "mean" or any("hyper_encoder" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], pre_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # and with logits_to_keep
        last = model(input_ids=ids, attention_mask=mask, codebooks=codebooks, logits_to_keep=1).logits
    assert_same_logits(logits[:, -1:], last)


def test_precomputed_codebooks_in_training_mode_keep_every_encoder_in_the_graph():
    model = wrap(tiny_base("llama")).train()
    ids = torch.tensor([[5, DISABLED[0], 9]])  # nothing installed: the input encoder runs on a dummy entry
    codebooks = zip2zip_hf.codebook_tensors(model.codec, ids)
    assert codebooks["entries"].shape == (1, 0, M)
    model(input_ids=ids, labels=ids, codebooks=codebooks, use_cache=False).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "hyper_encoder" in n)


def test_bad_precomputed_codebooks_raise():
    model = wrap(tiny_base("llama"))
    ids, mask, labels = _precomputed_batch()
    codebooks = zip2zip_hf.codebook_tensors(model.codec, ids, mask)

    def call(codebooks=codebooks, ids=ids, mask=mask, **kwargs):
        kwargs.setdefault("use_cache", False)
        return model(input_ids=ids, attention_mask=mask, codebooks=codebooks, **kwargs)

    with pytest.raises(ValueError, match="without a cache"):
        call(use_cache=True)
    with pytest.raises(ValueError, match="codebook_tensors"):
        call(codebooks={k: v for k, v in codebooks.items() if k != "legal"})
    with pytest.raises(ValueError, match=r"codebooks\['provisional'\] has shape"):
        call(codebooks={**codebooks, "provisional": codebooks["provisional"][:, :-1]})
    with pytest.raises(ValueError, match="do not match the attention mask"):
        call(mask=torch.ones_like(mask))
    other = zip2zip_hf.codebook_tensors(model.codec, ids.flip(0), mask.flip(0))  # another batch's codebooks
    with pytest.raises(ValueError, match="not a legal id there|do not match"):
        call(codebooks=other)
    with pytest.raises(ValueError, match=r"input_ids\[0, \d+\]: hyper id"):
        zip2zip_hf.codebook_tensors(model.codec, torch.tensor([[5, V + 3]]))


# ---------------------------------------------------------------------- legal set


def _canonical_next(codec: LZWCodec, prefix: list[int], candidates) -> list[int]:
    """The ids of ``candidates`` that greedy LZW may write after the canonical ``prefix``: those with
    which the stream stays what `LZWCodec.encode` makes of its text (the oracle, id by id)."""
    return [u for u in candidates if codec.encode(codec.decode([*prefix, u])[0])[0] == [*prefix, u]]


@pytest.mark.parametrize("canonical_ids_only", [True, False])
@pytest.mark.parametrize("on_device", [False, True], ids=["python-streams", "device-codebooks"])
@pytest.mark.parametrize("seed", [8, 9])
def test_finite_logits_are_exactly_the_legal_ids(seed, on_device, canonical_ids_only):
    """Finite logits are the legal ids that are canonical next (all legal ids with
    ``canonical_ids_only=False``), in a whole-sequence forward and step by step."""
    model = wrap(tiny_base("llama", rows=V + 20), on_device=on_device)  # rows past the tokenizer: never legal
    model.config.canonical_ids_only = canonical_ids_only
    codec = LZWCodec(V, K, M, DISABLED)
    row = compressed(seed, 150)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row])).logits[0]
        stepped = step_by_step_logits(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
    assert logits.shape[-1] == V + K
    stream, ruled_out = codec.stream(), 0
    for t, code in enumerate(row):
        stream.feed(code)
        legal = list(range(V + stream.num_legal_hyper))
        expected = _canonical_next(codec, row[: t + 1], legal) if canonical_ids_only else legal
        ruled_out += len(legal) - len(expected)
        assert torch.isfinite(logits[t]).nonzero().flatten().tolist() == expected, f"position {t}"
        assert torch.isfinite(stepped[t]).nonzero().flatten().tolist() == expected, f"position {t}, step by step"
    assert (ruled_out > 0) == canonical_ids_only


def test_provisional_slot_lets_runs_compress():
    """In a run every code is emitted right after the step that creates it (KwKwK)."""
    model = wrap(tiny_base("llama"))
    codes, _ = LZWCodec(V, K, M, DISABLED).encode([5] * 12)  # [5, V, V+1, V+1, V+1, ...]
    assert codes[1] == V
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([codes])).logits[0]
    for t in range(len(codes) - 1):
        assert torch.isfinite(logits[t, codes[t + 1]]), f"target {codes[t + 1]} after position {t} must be legal"
    out = model(input_ids=torch.tensor([codes]), labels=torch.tensor([codes]))
    assert torch.isfinite(out.loss)


def test_no_hypertokens_gives_base_logits():
    base = tiny_base("llama")
    model = wrap(base)
    ids = torch.tensor([[5, 9, 17, 33, 2, 250, 48, 77]])  # no repeat: every code is a base id
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = base(input_ids=ids).logits
    torch.testing.assert_close(ours[..., :V], theirs[..., :V], atol=0, rtol=0)


def test_head_postprocessing_reaches_hyper_logits_too():
    """Gemma 2 soft-caps its head's logits: base and hyper logits alike are capped, once, and a
    prompt without hypertokens gets exactly the base model's logits."""
    cap = 0.05  # small enough that the tiny model's raw logits exceed it
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        tiny_causal_lm_config("gemma2", V, final_logit_softcapping=cap, pad_token_id=PAD)
    ).eval()
    model = Zip2ZipForCausalLM.from_base(base, SimpleTokenizerSettings()).eval()
    plain = torch.tensor([[5, 9, 17, 33, 2, 250, 48, 77]])
    ids = torch.tensor([compressed(0, 60)])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=plain).logits[..., :V], base(input_ids=plain).logits)
        logits = model(input_ids=ids).logits
        base.config.final_logit_softcapping = None
        uncapped = model(input_ids=ids).logits
    legal = torch.isfinite(logits[..., V:])
    assert legal.any() and torch.equal(legal, torch.isfinite(uncapped[..., V:]))
    assert uncapped[..., V:][legal].abs().max() > cap >= logits[..., V:][legal].abs().max()
    torch.testing.assert_close(logits[..., V:][legal], torch.tanh(uncapped[..., V:][legal] / cap) * cap)
    base.config.final_logit_softcapping = cap
    assert_same_logits(logits, step_by_step_logits(model, ids, torch.ones_like(ids)))


def test_an_unscored_provisional_id_stays_minus_inf_under_soft_capping():
    """``score_provisional=False`` masks after the head's post-processing: soft-capping would turn
    -inf into the finite -cap, a logit a sampler could pick."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        tiny_causal_lm_config("gemma2", V, final_logit_softcapping=0.05, pad_token_id=PAD)
    ).eval()
    model = Zip2ZipForCausalLM.from_base(base, SimpleTokenizerSettings()).eval()
    ids = torch.tensor([compressed(3, 120)])
    with torch.no_grad():
        scored, unscored = model(input_ids=ids).logits, model(input_ids=ids, score_provisional=False).logits
    changed = scored != unscored
    assert changed.any() and (changed.sum(-1) <= 1).all() and torch.isneginf(unscored[changed]).all()


def test_a_base_model_with_an_unknown_head_transform_is_refused():
    class DoubledLogits(type(tiny_base("llama"))):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2
            return output

    base = tiny_base("llama")
    base.__class__ = DoubledLogits
    with pytest.raises(NotImplementedError, match="DoubledLogits changes its head's logits"):
        Zip2ZipForCausalLM.from_base(base, SimpleTokenizerSettings())


# ---------------------------------------------------------------------- encoders


def test_only_new_entries_are_encoded():
    model = wrap(tiny_base("llama"))
    seen = []
    model.input_hyper_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    row = compressed(9, 200)
    ids = torch.tensor([row])
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        installed = len(out.past_key_values.hyper_state.store.streams[0].codebook)
        assert seen == [installed] and installed < K
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values)
    # A decoding step encodes a fixed M slots per row (the entries its id may install, the rest
    # masked), never the codebook again: the same shapes every step.
    assert seen[1:] == [M]


@pytest.mark.parametrize("tie_encoders", [False, True])
@pytest.mark.parametrize("hyper_encoder", ["attention", "mean"])
def test_gradients_reach_encoders_and_base(hyper_encoder, tie_encoders):
    model = wrap(tiny_base("llama", tie=True), hyper_encoder=hyper_encoder, tie_encoders=tie_encoders).train()
    ids, mask = left_pad([compressed(10, 80), compressed(11, 50)])
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_all_padding_row_gives_no_nan():
    model = wrap(tiny_base("llama")).train()
    row = compressed(12, 40)
    ids = torch.tensor([row, [PAD] * len(row)])
    mask = torch.tensor([[1] * len(row), [0] * len(row)])
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encoders_run_without_hypertokens_in_training():
    """DDP needs every parameter used each step, even when a batch installs nothing."""
    model = wrap(tiny_base("llama")).train()
    ids = torch.tensor([[5, 9, 17]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "hyper_encoder" in n)


# ---------------------------------------------------------------------- loss


def test_loss_is_cross_entropy_over_widened_vocabulary():
    model = wrap(tiny_base("llama"))
    ids, mask = left_pad([compressed(13, 60), compressed(14, 45)])
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, V + K), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    scaled = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(1000))
    counted = (targets != -100).sum()
    torch.testing.assert_close(scaled.loss, expected * counted / 1000)
    assert model.config.get_text_config().vocab_size == V  # never mutated


def test_pad_equal_eos_target_is_trained():
    model = wrap(tiny_base("llama"))
    row = compressed(15, 30) + [PAD]  # a real end-of-text whose id is the pad id
    ids = torch.tensor([row])
    with_eos = model(input_ids=ids, labels=ids).loss
    without = model(input_ids=ids, labels=ids.masked_fill(torch.arange(len(row)) == len(row) - 1, -100)).loss
    assert not torch.isclose(with_eos, without)


def test_illegal_label_raises():
    model = wrap(tiny_base("llama"))
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[5, 6, V + 10, 8]])
    with pytest.raises(ValueError, match=r"labels\[0, 2\]"):
        model(input_ids=ids, labels=labels)


def test_a_label_that_is_not_canonical_raises_unless_the_rule_is_off():
    """The text 5 6 7 5 6 7 8 5 6 7 is [5, 6, 7, V, 7, 8, V + 3] canonically: V + 3 = [5, 6, 7] is an entry
    by then, so greedy LZW never writes 7 after the second V = [5, 6], as the spelling below does."""
    codec = LZWCodec(V, K, M, DISABLED)
    spelled = [5, 6, 7, V, 7, 8, V, 7]
    assert codec.encode(codec.decode(spelled)[0])[0] == [5, 6, 7, V, 7, 8, V + 3]
    model = wrap(tiny_base("llama"))
    ids = torch.tensor([spelled])
    with pytest.raises(ValueError, match=r"labels\[0, 7\] = 7 is not canonical there"):
        model(input_ids=ids, labels=ids)
    model.config.canonical_ids_only = False
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "ids, message",
    [
        ([[5, V + 3]], r"input_ids\[0, 1\].*not installed"),
        ([[5, V + K + 1]], "outside the id space"),
        ([[5, -1]], "outside the id space"),
    ],
)
def test_illegal_input_ids_raise(ids, message):
    model = wrap(tiny_base("llama"))
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor(ids))


def test_empty_input_raises():
    model = wrap(tiny_base("llama"))
    with pytest.raises(ValueError, match="non-empty"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))


def test_foreign_cache_raises():
    from transformers import DynamicCache

    model = wrap(tiny_base("llama"))
    base_out = model.language_model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
    assert isinstance(base_out.past_key_values, DynamicCache)
    with pytest.raises(ValueError, match="codebook state"):
        model(input_ids=torch.tensor([[7]]), past_key_values=base_out.past_key_values)


# ---------------------------------------------------------------------- construction, save, load


def test_wrapping_keeps_base_weights():
    base = tiny_base("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = wrap(base)
    after = model.language_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_and_load_round_trip(tmp_path):
    model = wrap(tiny_base("llama", rows=V + 8), position_mode="compressed")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_zip2zip.py", "lzw.py"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, Zip2ZipForCausalLM) and loaded.config.position_mode == "compressed"
    ids = torch.tensor([compressed(16, 80)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_format_1_checkpoint_loads_and_saves_as_today(tmp_path):
    """Format 1 named the wrapped model's weights ``model.*``; it loads with the same weights and
    is saved again in today's layout."""
    model = wrap(tiny_base("llama"))
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    assert {name.split(".")[0] for name in weights} == {"language_model", *HYPER_ENCODER_NAMES}
    old_names = {re.sub(r"^language_model\.", "model.", name): tensor for name, tensor in weights.items()}
    save_file(old_names, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["input_hyper_encoder_residual"]  # a setting format 3 added
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "zip2zip_format_version": 1}))

    loaded = Zip2ZipForCausalLM.from_pretrained(tmp_path / "old")
    assert loaded.config.input_hyper_encoder_residual == "mean"
    for (name, mine), (loaded_name, theirs) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(mine, theirs), name
    loaded.save_pretrained(tmp_path / "new")
    assert load_file(tmp_path / "new" / "model.safetensors").keys() == weights.keys()
    saved_config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved_config["zip2zip_format_version"] == ZIP2ZIP_FORMAT_VERSION


def test_missing_or_misshaped_encoder_weights_raise(tmp_path):
    model = wrap(tiny_base("llama"))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if not k.startswith("output_hyper_encoder")}
    save_file(dropped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing: output_hyper_encoder"):
        Zip2ZipForCausalLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_subtokens"] = M + 2  # the position table of the attention encoder is M wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError)):
        Zip2ZipForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow
def test_remote_code_load_in_fresh_process(tmp_path):
    model = wrap(tiny_base("gpt2"))
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    ids = torch.tensor([compressed(17, 60)])
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(input_ids=ids).logits.contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__name__ == "Zip2ZipForCausalLM", type(model)
        assert "transformers_modules" in type(model).__module__
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        print("ok")
        """
    )
    assert run_without_package(script) == "ok"


def test_auto_class_registration():
    """Importing the package maps the zip2zip config to its classes in every Auto class."""
    from transformers import AutoConfig, AutoModel

    text_config = tiny_causal_lm_config("llama", V).to_dict()
    config = AutoConfig.for_model("zip2zip", text_config=text_config)
    assert type(config) is Zip2ZipConfig
    assert type(AutoModelForCausalLM.from_config(config)) is Zip2ZipForCausalLM
    assert type(AutoModel.from_config(config)) is Zip2ZipModel


def test_tokenizer_config_mismatch_raises_on_load(tmp_path, tiny_base_tokenizer):
    from zip2zip_hf import Zip2ZipTokenizer

    tokenizer = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=64, max_subtokens=3)
    base = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    model = Zip2ZipForCausalLM.from_base(base, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), Zip2ZipForCausalLM)
    other = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=128, max_subtokens=3)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_codebook_size: model 64 vs tokenizer 128"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_codebook_size"):
        model.config.check_tokenizer(other)


def test_from_base_pretrained_wraps_a_saved_base(tmp_path, tiny_base_tokenizer):
    base = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tiny_base_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    base.save_pretrained(tmp_path)
    tiny_base_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = Zip2ZipForCausalLM.from_base_pretrained(
        str(tmp_path), max_codebook_size=32, max_subtokens=2, hyper_encoder="mean", position_mode="compressed"
    )
    assert (model.config.max_codebook_size, model.config.max_subtokens, model.config.hyper_encoder) == (32, 2, "mean")
    assert tokenizer.initial_vocab_size == model.config.initial_vocab_size == len(tiny_base_tokenizer)
    batch = tokenizer(["def f(x):\n    return x\n" * 3], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == len(tokenizer) + 32
    wrapped = model.language_model.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), wrapped))


@pytest.mark.real_model
def test_real_smollm2_training_equals_inference(smollm2_dir):
    from transformers import AutoTokenizer

    from zip2zip_hf import Zip2ZipTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = Zip2ZipTokenizer.from_base(AutoTokenizer.from_pretrained(smollm2_dir))
    model = wrap_real(base, tokenizer)
    functions = (("add", "+"), ("sub", "-"), ("mul", "*"))
    text = "".join(f"def {name}(a, b):\n    return a {op} b\n\n\n" for name, op in functions)
    batch = tokenizer([text, text[:70]], return_tensors="pt", padding=True)
    assert (batch["input_ids"] >= tokenizer.initial_vocab_size).any()
    with torch.no_grad():
        full = model(**batch).logits
        stepped = step_by_step_logits(model, batch["input_ids"], batch["attention_mask"])
        plain = tokenizer(["def add(a, b):"], return_tensors="pt")  # no hypertoken yet
        torch.testing.assert_close(model(**plain).logits[..., : len(tokenizer)], base(**plain).logits, atol=0, rtol=0)
    assert_same_logits(full, stepped, batch["attention_mask"], atol=2e-4)


def wrap_real(base, tokenizer):
    model = Zip2ZipForCausalLM.from_base(base, tokenizer).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hyper_encoder" in name:
                param.add_(torch.randn_like(param) * 0.02)
    return model


def test_dtype_follows_the_base_model():
    base = tiny_base("qwen2", tie=True).to(torch.bfloat16)
    model = Zip2ZipForCausalLM.from_base(base, SimpleTokenizerSettings())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask = left_pad([compressed(18, 60), compressed(19, 40)])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


class SimpleTokenizerSettings:
    """What `from_base` reads off a tokenizer: its codec (compression settings) and special ids."""

    codec = LZWCodec(V, K, M, DISABLED)
    initial_vocab_size, max_codebook_size, max_subtokens, disabled_ids = V, K, M, DISABLED
    pad_token_id, bos_token_id, eos_token_id = PAD, None, 1


def test_from_base_takes_compression_settings_from_the_tokenizer_only():
    with pytest.raises(ValueError, match="max_codebook_size come from the tokenizer"):
        Zip2ZipForCausalLM.from_base(tiny_base("llama"), SimpleTokenizerSettings(), max_codebook_size=K + 1)
    model = Zip2ZipForCausalLM.from_base(tiny_base("llama"), SimpleTokenizerSettings(), hyper_encoder="mean")
    assert model.config.compression_settings() == SimpleTokenizerSettings.codec.settings()
    assert model.config.hyper_encoder == "mean"


@pytest.mark.parametrize(
    "kwargs, expected",
    [({}, "last"), ({"tie_hyper_encoders": True}, "mean"), ({"input_hyper_encoder_residual": "first"}, "first")],
)
def test_from_base_starts_the_input_encoder_at_the_last_constituent(kwargs, expected):
    """Measured on held-out code with SmolLM2-135M: a fresh wrap whose input vectors are each
    hypertoken's last constituent scores fewer bits per byte than one reading their mean."""
    model = Zip2ZipForCausalLM.from_base(tiny_base("llama"), SimpleTokenizerSettings(), **kwargs)
    assert model.config.input_hyper_encoder_residual == expected
    weight = model.get_input_embeddings().weight
    subtokens, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2])
    vectors = model.input_hyper_encoder(subtokens, lengths, weight)
    means = torch.stack([weight[[5, 6, 7]].mean(0), weight[[8, 9]].mean(0)])
    picked = {"last": weight[[7, 9]], "first": weight[[5, 8]], "mean": means}[expected]
    torch.testing.assert_close(vectors, picked, rtol=0, atol=1e-6)


def test_a_bad_residual_in_the_config_is_refused():
    with pytest.raises(ValueError, match="input_hyper_encoder_residual must be one of"):
        Zip2ZipConfig(text_config=tiny_base("llama").config, input_hyper_encoder_residual="max")
    with pytest.raises(ValueError, match="only 'mean' for a mean hyper-encoder"):
        Zip2ZipConfig(text_config=tiny_base("llama").config, hyper_encoder="mean", input_hyper_encoder_residual="last")


def test_a_model_that_does_not_write_the_provisional_id_still_reads_it(model, monkeypatch):
    """``write_provisional_hypertokens=False`` (checkpoints converted from the reference package):
    generate never writes the provisional id, the forward scores it -inf on request and nothing else
    changes, and ids that contain it are read as always."""
    ids = torch.tensor([compressed(3, 120)])
    scored = model(input_ids=ids).logits
    unscored = model(input_ids=ids, score_provisional=False).logits
    changed = scored != unscored
    assert changed.any() and (changed.sum(-1) <= 1).all()
    assert torch.isneginf(unscored[changed]).all() and torch.isfinite(scored[changed]).all()

    monkeypatch.setattr(model.config, "write_provisional_hypertokens", False)
    asked: list[bool] = []
    forward = model.forward

    @functools.wraps(forward)  # generate checks its keyword arguments against the forward's signature
    def spy(*args, **kwargs):
        asked.append(kwargs.get("score_provisional", True))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    prompt = ids[:, :30]
    written = model.generate(input_ids=prompt, max_new_tokens=40, do_sample=False, return_hypertokens=True)
    stream = model.codec.stream()
    stream.feed(prompt[0].tolist())
    for new_id in written[0, prompt.shape[1] :].tolist():
        provisional = V + stream.num_installed if stream.provisional_subtokens() is not None else None
        assert new_id != provisional
        stream.feed([new_id])
    assert asked and not any(asked)  # every step asked for the provisional id unscored
