"""Bits per byte: the tool scores what a hand computation from `forward` scores, a wrapper that never
compresses scores exactly its base, and ``python -m zip2zip_hf eval`` reports it for saved checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from utils import stdlib_text
from zip2zip_hf import Zip2ZipForCausalLM, Zip2ZipTokenizer
from zip2zip_hf.evaluation import score_texts
from zip2zip_hf.tools.cli import main


TEXTS = [stdlib_text(1500), "The cat sat on the mat. The cat sat on the hat. " * 6]


def hand_bits_per_byte(model, tokenizer, texts, window: int) -> tuple[float, int]:
    """Window by window, one forward each, log-softmax by hand."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    nats, tokens = 0.0, 0
    for text in texts:
        base = tokenizer.base_ids([text], add_special_tokens=False)[0]
        for start in range(0, len(base), window):
            ids = tokenizer.codec.encode([prefix, *base[start : start + window]])[0]
            with torch.no_grad():
                log_probs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            nats -= sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)))
            tokens += len(ids) - 1
    return nats / math.log(2) / sum(len(t.encode()) for t in texts), tokens


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bits_per_byte_is_the_hand_computation_from_forward(text_model, text_tok, batch_size):
    score = score_texts(text_model, text_tok, TEXTS, window=96, batch_size=batch_size)
    expected, tokens = hand_bits_per_byte(text_model, text_tok, TEXTS, window=96)
    assert score.tokens == tokens
    assert score.tokens < score.base_tokens, "the windows must compress"
    assert score.bytes == sum(len(t.encode()) for t in TEXTS)
    assert score.bits_per_byte == pytest.approx(expected, rel=1e-5)
    assert score.steps_per_byte == pytest.approx(score.tokens / score.bytes)


def test_a_wrapper_that_never_compresses_scores_exactly_its_base(text_model, tiny_base_tokenizer):
    """K = 0: the same ids, and logits no wider than the base's, so the same score."""
    base = text_model.language_model
    uncompressed = Zip2ZipTokenizer.from_base(tiny_base_tokenizer, max_codebook_size=0, max_subtokens=4)
    wrapper = Zip2ZipForCausalLM.from_base(base, uncompressed).eval()
    ours = score_texts(wrapper, uncompressed, TEXTS, window=64, batch_size=2)
    plain = score_texts(base, tiny_base_tokenizer, TEXTS, window=64, batch_size=2)
    assert (ours.tokens, ours.base_tokens, ours.bytes) == (plain.tokens, plain.base_tokens, plain.bytes)
    assert ours.tokens == plain.base_tokens
    assert ours.bits_per_byte == pytest.approx(plain.bits_per_byte, rel=1e-6)


def test_bad_arguments_are_clear_errors(text_model, text_tok):
    with pytest.raises(TypeError, match="list of texts"):
        score_texts(text_model, text_tok, "one string")
    with pytest.raises(ValueError, match="at least 1"):
        score_texts(text_model, text_tok, TEXTS, window=0)
    with pytest.raises(ValueError, match="empty"):
        score_texts(text_model, text_tok, [""])


@pytest.fixture(scope="module")
def checkpoints(text_model, text_tok, tiny_base_tokenizer, tmp_path_factory):
    """A saved zip2zip checkpoint and its saved base model."""
    zip2zip_dir, base_dir = tmp_path_factory.mktemp("zip2zip"), tmp_path_factory.mktemp("base")
    text_model.save_pretrained(zip2zip_dir)
    text_tok.save_pretrained(zip2zip_dir)
    text_model.language_model.save_pretrained(base_dir)
    tiny_base_tokenizer.save_pretrained(base_dir)
    return zip2zip_dir, base_dir


def test_eval_command_prints_one_json_object_for_all_files(checkpoints, text_model, text_tok, tmp_path, capsys):
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(tmp_path / f"text{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    zip2zip_dir, base_dir = checkpoints
    scores = {}
    for name, folder in (("zip2zip", zip2zip_dir), ("base", base_dir)):
        assert main(["eval", str(folder), *map(str, paths), "--json", "--window", "96", "--device", "cpu"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    expected = score_texts(text_model, text_tok, TEXTS, window=96)
    assert scores["zip2zip"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    assert scores["zip2zip"]["tokens"] == expected.tokens
    assert scores["base"]["bytes"] == scores["zip2zip"]["bytes"] == expected.bytes
    assert scores["base"]["tokens"] == scores["base"]["base_tokens"] == expected.base_tokens
    assert scores["zip2zip"]["steps_per_byte"] < scores["base"]["steps_per_byte"]


def test_eval_command_prints_a_table_without_json(checkpoints, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXTS[1], encoding="utf-8")
    assert main(["eval", str(checkpoints[0]), str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "steps per byte" in out


def test_bad_texts_and_windows_are_named(text_model, text_tok):
    with pytest.raises(TypeError, match="texts\\[1\\] is a NoneType, not a str"):
        score_texts(text_model, text_tok, ["fine", None])
    with pytest.raises(TypeError, match="texts\\[0\\] is a bytes, not a str"):
        score_texts(text_model, text_tok, [b"abc"])
    positions = text_model.config.get_text_config().max_position_embeddings
    with pytest.raises(ValueError, match=f"model has {positions}: use window={positions - 1} or less"):
        score_texts(text_model, text_tok, TEXTS, window=positions)
    assert score_texts(text_model, text_tok, TEXTS[1:], window=positions - 1).tokens > 0


def test_eval_command_errors_are_one_line_and_status_2(checkpoints, tmp_path, capsys):
    import torch

    text, empty, no_weights = tmp_path / "text.txt", tmp_path / "empty.txt", tmp_path / "no_weights"
    text.write_text(TEXTS[1], encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    no_weights.mkdir()
    (no_weights / "config.json").write_text((checkpoints[0] / "config.json").read_text())
    cases = [
        ([str(checkpoints[0]), str(empty)], "empty, there is no text to score"),
        ([str(checkpoints[0]), str(text), "--device", "nonsense"], "--device nonsense: not a device"),
        ([str(no_weights), str(text), "--device", "cpu"], f"{no_weights}: cannot load it"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(checkpoints[0]), str(text), "--device", "cuda"], "this machine has no CUDA device"))
    for arguments, message in cases:
        assert main(["eval", *arguments]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
