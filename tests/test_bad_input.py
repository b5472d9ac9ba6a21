"""Bad input found by adversarial probing: each case is a clear error, and a failed call changes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from utils import K, M, V, compressed, tiny_base, tiny_causal_lm_config, wrap
from zip2zip_hf import LZWCodec, Zip2ZipConfig, Zip2ZipForCausalLM, Zip2ZipStaticCache, Zip2ZipTokenizer
from zip2zip_hf.lzw_codebook import MAX_CODEBOOK_SIZE, MAX_SUBTOKENS
from zip2zip_hf.tools.cli import main


TEXT_CONFIG = tiny_causal_lm_config("llama", V)


def state_of(cache) -> tuple:
    """Everything a later call reads: codebooks, pending phrases, counters and the KV length."""
    rows = cache.hyper_state.store
    streams = [(s.codebook.to_dict(), s.mark()) for s in rows.streams]
    return streams, list(rows.num_encoded), list(rows.num_real_tokens), cache.get_seq_length()


# ---------------------------------------------------------------------- 1. a failed forward changes nothing


def prefilled(model, rows: list[list[int]], static: bool = False):
    ids = torch.tensor(rows)
    cache = Zip2ZipStaticCache(config=model.config.get_text_config(), max_cache_len=80) if static else None
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values


def test_forward_failing_on_a_later_row_leaves_the_cache_as_it_was(model):
    prompt = compressed(3, 40)[:20]
    cache = prefilled(model, [prompt, prompt])
    before = state_of(cache)
    # Row 0 is legal and would install entries; row 1 fails at its third id.
    block = torch.tensor([[5, 6, 5, 6], [5, 6, V + K - 1, 6]])
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\]"), torch.no_grad():
        model(input_ids=block, past_key_values=cache, use_cache=True)
    assert state_of(cache) == before

    # The caller can carry on exactly as if the failed call had never been made.
    good = torch.tensor([[5, 6, 5, 6], [5, 6, 5, 6]])
    with torch.no_grad():
        carried_on = model(input_ids=good, past_key_values=cache, use_cache=True).logits
        fresh = model(input_ids=good, past_key_values=prefilled(model, [prompt, prompt]), use_cache=True).logits
    torch.testing.assert_close(carried_on, fresh, atol=0, rtol=0)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("bad_id", [-1, V + K + 5, V + K - 1])
def test_a_bad_decoding_step_raises_and_changes_nothing(model, bad_id, on_device, static, monkeypatch):
    """Decoding steps run on the device state and learn of a bad id after the step is queued; the
    error and the rollback are the same as anywhere else, in a dynamic and in a static cache."""
    prompt = compressed(5, 40)
    monkeypatch.setattr(model, "codebooks_on_device", on_device)

    def decoded(steps):
        cache, errors = prefilled(model, [prompt], static), []
        with torch.no_grad():
            for ids in steps:
                try:
                    logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
                except ValueError as error:
                    errors.append(str(error))
        return logits, int(cache.get_seq_length()), errors

    # A bad id at the first decoding step (where the codebooks move to the device) and at a later one.
    logits, length, errors = decoded([[bad_id], [5], [bad_id], [6], [5]])
    named = r"input_ids\[0, 0\] = -?\d+ is outside|input_ids\[0, 0\]: hyper id"
    assert len(errors) == 2 and all(re.search(named, error) for error in errors), errors
    expected_logits, expected_length, _ = decoded([[5], [6], [5]])
    torch.testing.assert_close(logits, expected_logits, atol=0, rtol=0)
    assert length == expected_length


def test_forward_failing_inside_the_base_model_rolls_back_codebooks_and_keys(model):
    prompt = compressed(4, 30)
    cache = prefilled(model, [prompt])
    before = state_of(cache)

    def fail(*_):
        raise RuntimeError("simulated failure in the last decoder layer")

    handle = model.language_model.model.layers[-1].register_forward_hook(fail)  # runs after that layer wrote its keys
    try:
        with pytest.raises(RuntimeError, match="simulated"), torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 5, 6, 5]]), past_key_values=cache, use_cache=True)
    finally:
        handle.remove()
    assert state_of(cache) == before
    assert all(cache.get_seq_length(i) == len(prompt) for i in range(len(cache.layers)))


# ---------------------------------------------------------------------- 2-3. shapes


@pytest.mark.parametrize(
    "mask",
    [torch.ones(1, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 1, 4, dtype=torch.long)],
    ids=["fewer rows", "shorter", "3-d"],
)
def test_attention_mask_must_match_the_ids(model, mask):
    with pytest.raises(ValueError, match=r"attention_mask must be a \(batch, past \+ length\) = \(2, 4\)"):
        model(input_ids=torch.tensor([[5, 6, 5, 6], [7, 8, 7, 8]]), attention_mask=mask)


@pytest.mark.parametrize("logits_to_keep", [-3, 1.5, torch.tensor([0, 9])])
def test_bad_logits_to_keep_raises(model, logits_to_keep):
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=torch.tensor([[5, 6, 5, 6]]), logits_to_keep=logits_to_keep)


def test_labels_must_match_the_ids(model):
    with pytest.raises(ValueError, match="labels has shape"):
        model(input_ids=torch.tensor([[5, 6, 5, 6]]), labels=torch.tensor([[5, 6, 5]]))


def test_float_input_ids_raise(model):
    with pytest.raises(ValueError, match="integer tensor"):
        model(input_ids=torch.tensor([[5.0, 6.0]]))


# ---------------------------------------------------------------------- 4-5. settings: ints, bounded


@pytest.mark.parametrize("value", [2.7, 2.0, True, "64", None])
def test_non_integer_codebook_size_is_rejected_everywhere(tiny_base_tokenizer, value):
    with pytest.raises(ValueError, match="max_codebook_size must be an int"):
        Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=value)
    with pytest.raises(ValueError, match="max_codebook_size must be an int"):
        Zip2ZipConfig(text_config=TEXT_CONFIG, initial_vocab_size=V, max_codebook_size=value)
    with pytest.raises(ValueError, match="max_codebook_size must be an int"):
        LZWCodec(V, value, M)


@pytest.mark.parametrize("value", [1.9, True, 4.0])
def test_non_integer_subtokens_are_rejected(tiny_base_tokenizer, value):
    with pytest.raises(ValueError, match="max_subtokens must be an int"):
        Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_subtokens=value)
    with pytest.raises(ValueError, match="max_subtokens must be an int"):
        Zip2ZipConfig(text_config=TEXT_CONFIG, initial_vocab_size=V, max_subtokens=value)


@pytest.mark.parametrize("key, value", [("max_codebook_size", 1.9), ("max_subtokens", True), ("disabled_ids", [0.5])])
def test_saved_tokenizer_config_with_non_integer_settings_is_rejected(tiny_base_tokenizer, tmp_path, key, value):
    Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config[key] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="must be an int"):
        Zip2ZipTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("remove", [False, True], ids=["null", "missing"])
@pytest.mark.parametrize("key", ["max_codebook_size", "max_subtokens"])
def test_saved_tokenizer_config_without_a_setting_is_rejected(tiny_base_tokenizer, tmp_path, key, remove):
    Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if remove:
        del config[key]
    else:
        config[key] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{key} must be an int, got None: a saved tokenizer_config.json"):
        Zip2ZipTokenizer.from_pretrained(tmp_path)


def test_saved_model_config_with_float_settings_is_rejected():
    with pytest.raises(ValueError, match="max_codebook_size must be an int"):
        Zip2ZipConfig.from_dict(
            {"text_config": TEXT_CONFIG.to_dict(), "initial_vocab_size": V, "max_codebook_size": 64.0}
        )


@pytest.mark.parametrize("key", ["canonical_ids_only", "write_provisional_hypertokens", "tie_hyper_encoders"])
@pytest.mark.parametrize("value", ["false", 1, None])
def test_a_switch_of_the_model_config_must_be_a_bool(key, value):
    """A hand-edited ``"canonical_ids_only": "false"`` would be truthy: refused, not read as True."""
    with pytest.raises(ValueError, match=f"{key} must be a bool, got {value!r}"):
        Zip2ZipConfig.from_dict({"text_config": TEXT_CONFIG.to_dict(), "initial_vocab_size": V, key: value})


def test_absurd_settings_are_refused_up_front(tiny_base_tokenizer):
    with pytest.raises(ValueError, match=f"max_codebook_size must be <= {MAX_CODEBOOK_SIZE}"):
        Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=10**9)
    with pytest.raises(ValueError, match=f"max_codebook_size must be <= {MAX_CODEBOOK_SIZE}"):
        Zip2ZipConfig(text_config=TEXT_CONFIG, initial_vocab_size=V, max_codebook_size=10**9)
    with pytest.raises(ValueError, match=f"max_subtokens must be <= {MAX_SUBTOKENS}"):
        LZWCodec(V, K, 10**6)
    assert LZWCodec(V, MAX_CODEBOOK_SIZE, MAX_SUBTOKENS).total_vocab_size == V + MAX_CODEBOOK_SIZE


# ---------------------------------------------------------------------- 6. unexpected weights are an error


@pytest.mark.parametrize(
    "edit, unexpected",
    [({"hyper_encoder": "mean"}, "input_hyper_encoder"), ({"tie_hyper_encoders": True}, "output_hyper_encoder")],
)
def test_loading_into_a_model_without_the_saved_encoder_weights_raises(tmp_path, edit, unexpected):
    wrap(tiny_base("llama")).save_pretrained(tmp_path)
    weights_before = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"unexpected: {unexpected}"):
        Zip2ZipForCausalLM.from_pretrained(tmp_path)
    # Nothing the user saved is touched.
    assert load_file(tmp_path / "model.safetensors").keys() == weights_before.keys()


# ---------------------------------------------------------------------- 7. the command line


def test_compress_refuses_a_fifo_instead_of_hanging(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("status", main(["compress", str(fifo)])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():  # unblock the reader before failing, so the test process can exit
        with open(fifo, "wb"):
            pass
        pytest.fail("compress blocked on a FIFO")
    assert result["status"] == 2
    assert "not a regular file" in capsys.readouterr().err


def test_compress_refuses_a_device_and_oversized_files(tmp_path, capsys):
    assert main(["compress", "/dev/zero"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    big = tmp_path / "big.txt"
    big.write_text("x" * 2000)
    assert main(["compress", str(big), "--max-bytes", "1000"]) == 2
    assert "more than --max-bytes 1000" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_with_a_corrupt_base_tokenizer_is_one_line(tiny_base_tokenizer, tmp_path):
    folder = tmp_path / "tok"
    Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=64).save_pretrained(folder)
    (folder / "base_tokenizer.json").write_text(json.dumps({"model": {"vocab": {"1": 2}}, "version": 3}))
    text = tmp_path / "a.txt"
    text.write_text("hello hello")
    run = subprocess.run(
        [sys.executable, "-m", "zip2zip_hf", "compress", str(text), "--tokenizer", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "base_tokenizer.json is not a valid tokenizers JSON file" in lines[0]


# ---------------------------------------------------------------------- 8. weak spots


@pytest.mark.parametrize(
    "ids, message",
    [
        ("abc", "sequence of ints, got str"),
        (None, "sequence of ints, got NoneType"),
        ([[1, 2], [3]], "got list .* at position 0"),
        ([1.5, 2], "got float 1.5 at position 0"),
        ([1, 2, None], "got NoneType None at position 2"),
    ],
)
def test_codec_rejects_non_integer_ids(ids, message):
    codec = LZWCodec(10, 5, 3)
    for call in (codec.encode, codec.decode, codec.stream().feed):
        with pytest.raises(ValueError, match=message):
            call(ids)


def test_codec_accepts_numpy_integers():
    numpy = pytest.importorskip("numpy")
    codec = LZWCodec(10, 5, 3)
    expected = codec.encode([1, 2, 1, 2, 1])
    assert codec.encode([numpy.int64(i) for i in [1, 2, 1, 2, 1]]) == expected
    assert codec.encode(numpy.array([1, 2, 1, 2, 1])) == expected


def test_negative_id_under_padding_is_a_clear_error(model):
    ids = torch.tensor([[-5, 6, 7], [5, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\] = -5 is outside the id space"):
        model(input_ids=ids, attention_mask=mask)
