"""The shipped zip2zip SmolLM2-135M (the package's embedded adapter): what its record and the README
say of it holds, and the command line and the demo take it by name."""

from __future__ import annotations

import json

import pytest
import torch

from zip2zip_hf.tools.cli import main
from zip2zip_hf.tools.corpus import held_out_texts, prompt_text, unseen_held_out
from zip2zip_hf.tools.embedded import EMBEDDED_ZIP2ZIP, load_named_model, shipped_record
from zip2zip_hf.tools.uptrain import score_held_out


def test_the_shipped_adapter_is_small_bf16_safetensors_with_its_record():
    from safetensors import safe_open

    weights = EMBEDDED_ZIP2ZIP / "adapter_model.safetensors"
    assert weights.stat().st_size <= 32 * 2**20
    with safe_open(str(weights), "pt") as tensors:
        assert {tensors.get_tensor(name).dtype for name in tensors.keys()} == {torch.bfloat16}
    record = shipped_record()
    assert record["steps"] > 0 and record["training_seconds"] > 0
    assert {"recipe", "data", "held_out", "curve"} <= set(record)


def test_an_unknown_model_name_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("x = 1\n")
    assert main(["eval", "smollm3", str(text)]) == 2
    assert "smollm2-zip2zip" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shipped():
    return load_named_model("smollm2-zip2zip")


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2", "smollm2-zip2zip"])
def test_held_out_numbers_are_what_the_record_says(name, shipped):
    """The README quotes the record; here the numbers are measured again (bits per byte within 0.5%:
    a float32 reload of bf16 weights on another machine; steps per byte exactly)."""
    model, tokenizer = shipped if name == "smollm2-zip2zip" else load_named_model(name)
    record = shipped_record()
    side = "zip2zip" if name == "smollm2-zip2zip" else "base"
    measured = score_held_out(model, tokenizer, record["held_out"]["window"])
    for kind in held_out_texts():
        expected = record["held_out"][side][kind]
        assert measured[kind]["steps_per_byte"] == pytest.approx(expected["steps_per_byte"], abs=1e-5)
        assert measured[kind]["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=5e-3)


@pytest.mark.real_model
def test_numbers_on_text_of_other_sources_are_what_the_record_says(shipped):
    """The record's held-out text of other sources, measured again for the kinds installed here (Go
    and Rust need the corpus extra and Debian's rust-src): the same bytes, steps per byte exactly,
    bits per byte within 0.5%."""
    from zip2zip_hf.evaluation.scoring import score_kinds

    model, tokenizer = shipped
    unseen = shipped_record()["held_out"]["unseen"]
    texts, _ = unseen_held_out()
    kinds = [kind for kind in texts if kind in unseen["scores"]]
    assert len(kinds) >= 8, f"the record scores {sorted(unseen['scores'])}; installed here: {sorted(texts)}"
    parts = {kind: texts[kind].texts for kind in kinds}
    measured = score_kinds(parts, None, None, model, tokenizer, unseen["window"], modes=("zip2zip",))
    for kind in kinds:
        expected, got = unseen["scores"][kind]["zip2zip"], measured[kind]["zip2zip"]
        assert got.bytes == expected["bytes"], f"{kind}: other text than the record's"
        assert got.steps_per_byte == pytest.approx(expected["steps_per_byte"], abs=1e-5), kind
        assert got.bits_per_byte == pytest.approx(expected["bits_per_byte"], rel=5e-3), kind


@pytest.mark.real_model
def test_a_greedy_code_continuation_writes_hypertokens_and_does_not_loop(shipped):
    model, tokenizer = shipped
    inputs = tokenizer([prompt_text()], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False, return_hypertokens=True)
    written = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert any(i >= tokenizer.initial_vocab_size for i in written)
    prompt_length = len(tokenizer.codec.decode(inputs["input_ids"][0].tolist())[0])
    base = tokenizer.codec.decode(out[0].tolist())[0][prompt_length:]
    four_grams = list(zip(*(base[i:] for i in range(4))))
    assert len(set(four_grams)) > 0.5 * len(four_grams), tokenizer.base_tokenizer.decode(base)


@pytest.mark.real_model
def test_eval_takes_the_embedded_models_by_name(tmp_path, capsys):
    path = tmp_path / "held_out.py"
    path.write_text(held_out_texts()["code"][0][:1500], encoding="utf-8")
    results = {}
    for name in ("smollm2", "smollm2-zip2zip"):
        assert main(["eval", name, str(path), "--json", "--window", "256"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["smollm2"]["bytes"] == results["smollm2-zip2zip"]["bytes"] == len(path.read_bytes())
    assert results["smollm2-zip2zip"]["steps_per_byte"] < results["smollm2"]["steps_per_byte"]


@pytest.mark.real_model
def test_the_demo_shows_the_shipped_model_against_its_base(capsys):
    assert main(["demo", "--new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    headings = ("1/5 models", "2/5 held-out text", "3/5 held-out text of other sources", "4/5 greedy", "5/5 what")
    for heading in headings:
        assert heading in out
    record = shipped_record()
    all_row = next(line for line in out.splitlines() if line.startswith("all "))
    assert f"{record['held_out']['zip2zip']['all']['steps_per_byte']:.4f}" in all_row
    # The held-out text of other sources: one row a kind, bits per byte three ways and both ratios.
    section = out.split("3/5 held-out text of other sources")[1].split("4/5 greedy")[0].splitlines()
    header = next(line for line in section if line.startswith("kind "))
    assert "base-mode bits/byte" in header and "base-mode/base" in header
    texts, _ = unseen_held_out()
    for kind in (*texts, "all"):
        row = next(line for line in section if line.startswith(kind + " ") and line.split()[1].isdigit())
        numbers = [float(x) for x in row.split()[1:]]
        base, zip2zip, base_mode = numbers[1:4]
        assert numbers[4] == pytest.approx(zip2zip / base, abs=1e-3)
        assert numbers[5] == pytest.approx(base_mode / base, abs=1e-3)
    assert out.rstrip().splitlines()[-1].startswith("demo finished in")


def test_the_demo_takes_another_base_model_only_to_finetune_it(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "--finetune" in capsys.readouterr().err
