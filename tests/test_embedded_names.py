"""The embedded models by name wherever a checkpoint is asked for, and ``export``, which writes one as
a standalone checkpoint folder. Quick tests stand tiny models in for the embedded ones (the base's
folder and `load_named_model` replaced); one test exports the real SmolLM2-135M zip2zip model and
loads it where zip2zip_hf cannot be imported."""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import zip2zip_hf.interop
import zip2zip_hf.tools.cli
import zip2zip_hf.tools.embedded
import zip2zip_hf.tools.smollm2
from utils import run_without_package, save_tiny_base_model
from zip2zip_hf import Zip2ZipForCausalLM
from zip2zip_hf.tools.cli import main
from zip2zip_hf.tools.embedded import load_named_model


SERVING = int(transformers.__version__.split(".")[0]) >= 5
TEXT = "def parse(self, text):\n    return text.split()\n" * 3


class Embedded:
    """Tiny stand-ins for the embedded models: ``smollm2`` a tiny Llama folder (the base's folder, as
    `smollm2_path` gives it), ``smollm2-zip2zip`` the tests' tiny zip2zip model. Counts the loads."""

    def __init__(self, base: Path, zip2zip_model, zip2zip_tokenizer):
        self.base, self.zip2zip = base, (zip2zip_model, zip2zip_tokenizer)
        self.loads: list[str] = []

    def load(self, name: str, device=None, folder=None):
        self.loads.append(name)
        if name == "smollm2":
            return AutoModelForCausalLM.from_pretrained(self.base).eval(), AutoTokenizer.from_pretrained(self.base)
        return self.zip2zip

    def built(self) -> list[str]:
        """The checkpoint folders built beside the base's (the cache)."""
        return sorted(path.name for path in self.base.parent.iterdir() if path != self.base)


@pytest.fixture
def embedded(tmp_path, monkeypatch, text_model, text_tok):
    base = save_tiny_base_model(tmp_path / "cache" / "SmolLM2-tiny")
    stand_in = Embedded(base, text_model, text_tok)
    monkeypatch.setattr(zip2zip_hf.tools.smollm2, "smollm2_path", lambda weights=True: base)
    monkeypatch.setattr(zip2zip_hf.tools.embedded, "load_named_model", stand_in.load)
    monkeypatch.setattr(zip2zip_hf.tools.cli, "load_named_model", stand_in.load)
    return stand_in


def refused(capsys, command: str, *argv) -> str:
    """Run ``command argv``: exit status 2 and one ``error:`` line, which is returned."""
    assert main([command, *map(str, argv)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"zip2zip_hf {command}: error: "), errors
    return errors[0]


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------- export


def test_export_writes_each_embedded_model_as_a_checkpoint_of_its_own(embedded, tmp_path, text_model, text_tok):
    out = tmp_path / "new" / "smollm2-zip2zip"
    assert main(["export", "smollm2-zip2zip", str(out)]) == 0
    ids = text_tok(TEXT, return_tensors="pt")["input_ids"]
    loaded = Zip2ZipForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(text_model, ids), atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == ids[0].tolist()
    assert (out / "model.safetensors").is_file() and (out / "modeling_zip2zip.py").is_file()
    assert json.loads((out / "uptrain.json").read_text())["compression"]  # how it was made
    plain = tmp_path / "plain"
    assert main(["export", "smollm2", str(plain)]) == 0
    assert not list(plain.glob("*.py")) and json.loads((plain / "config.json").read_text())["model_type"] == "llama"
    base_ids = torch.tensor([[5, 6, 7, 8]])
    expected = logits_of(AutoModelForCausalLM.from_pretrained(embedded.base), base_ids)
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(plain), base_ids), expected)
    assert sorted(os.listdir(tmp_path)) == ["cache", "new", "plain"]  # no staging folder left beside them


def test_export_refuses_a_bad_out_dir_before_any_work(embedded, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "not empty (nothing is overwritten)" in refused(capsys, "export", "smollm2-zip2zip", tmp_path / "full")
    (tmp_path / "file").write_text("mine")
    assert "an existing file, not a folder" in refused(capsys, "export", "smollm2", tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert "which does not exist" in refused(capsys, "export", "smollm2", tmp_path / "dangling")
    inside = Path(zip2zip_hf.__file__).parent / "embedded" / "exported"
    assert "inside the installed zip2zip_hf package" in refused(capsys, "export", "smollm2-zip2zip", inside)
    assert not inside.exists()
    assert embedded.loads == []  # refused before loading anything
    assert (tmp_path / "full" / "keep.txt").read_text() == (tmp_path / "file").read_text() == "mine"
    error = refused(capsys, "export", "smollm2-zip", tmp_path / "out")
    assert "smollm2-zip: neither an embedded model (smollm2, smollm2-zip2zip) nor an adapter folder" in error


def test_a_failed_export_leaves_nothing_behind(embedded, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(embedded.zip2zip[0]), "save_pretrained", full_disk)
    error = refused(capsys, "export", "smollm2-zip2zip", tmp_path / "a" / "b" / "out")
    assert "cannot write the checkpoint (" in error and "nothing was kept" in error
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # neither the staging folder nor the parents it made


# ---------------------------------------------------------------------- the names wherever a checkpoint is asked for


def test_eval_reads_an_embedded_model_from_its_checkpoint_folder_built_once(embedded, tmp_path, capsys):
    text = tmp_path / "text.py"
    text.write_text(TEXT, encoding="utf-8")
    for _ in range(2):
        assert main(["eval", "smollm2-zip2zip", str(text), "--json", "--device", "cpu"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "smollm2-zip2zip"
    assert embedded.loads == ["smollm2-zip2zip"]  # exported once, read from its folder after
    (folder,) = embedded.built()
    assert folder.startswith("SmolLM2-tiny-smollm2-zip2zip-")
    assert main(["eval", "smollm2", str(text), "--json", "--device", "cpu"]) == 0
    assert embedded.built() == [folder]  # the base is its own folder


@pytest.mark.skipif(not SERVING, reason="serving runs on transformers 5's serving code")
def test_serve_serves_an_embedded_model_under_its_name(embedded, monkeypatch, capsys, text_model, text_tok):
    import uvicorn

    from test_serving import get, post, running_app

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    assert main(["serve", "smollm2-zip2zip", "--device", "cpu"]) == 0
    with running_app(apps[0]) as url:
        assert [model["id"] for model in get(f"{url}/v1/models")["data"]] == ["smollm2-zip2zip"]
        status, answer = post(
            f"{url}/v1/completions", {"model": "smollm2-zip2zip", "prompt": TEXT, "max_tokens": 6, "temperature": 0}
        )
    # transformers writes a name that is not a folder as the Hub's repo@revision in its answers
    assert status == 200 and answer["model"].split("@")[0] == "smollm2-zip2zip", answer
    inputs = text_tok(TEXT, return_tensors="pt")
    written = text_model.generate(**inputs, max_new_tokens=6, do_sample=False, return_hypertokens=True)
    base_ids = text_tok.codec.decode(written[0].tolist())[0][len(text_tok.codec.decode(inputs["input_ids"][0])[0]) :]
    assert answer["choices"][0]["text"] == text_tok.base_tokenizer.decode(base_ids, skip_special_tokens=True)
    error = refused(capsys, "serve", "smollm2", "--device", "cpu")
    assert "smollm2: the plain base model, and serve serves zip2zip models: use smollm2-zip2zip" in error


def test_lm_eval_reads_an_embedded_pretrained_from_its_folder(embedded, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval._cli import HarnessCLI

    ran = []
    monkeypatch.setattr(HarnessCLI, "execute", lambda self, args: ran.append(args.model_args))
    run = ["lm-eval", "run", "--tasks", "wikitext", "--model_args"]
    assert main([*run, "pretrained=smollm2-zip2zip,dtype=float32", "--model", "zip2zip"]) == 0
    assert main([*run, "pretrained=smollm2", "--model", "hf"]) == 0
    (folder,) = embedded.built()
    assert ran == [
        {"pretrained": str(embedded.base.parent / folder), "dtype": "float32"},
        {"pretrained": str(embedded.base)},
    ]
    error = refused(capsys, "lm-eval", *run[1:], "pretrained=smollm2-zip2zip", "--model", "hf")
    assert "pretrained=smollm2-zip2zip: a zip2zip model, and lm-eval's 'hf' model" in error
    assert "pretrained=smollm2: the plain base model" in refused(
        capsys, "lm-eval", *run[1:], "pretrained=smollm2", "--model", "zip2zip"
    )


def test_what_wraps_a_base_model_takes_smollm2_and_refuses_the_zip2zip_model(embedded, tmp_path, capsys, monkeypatch):
    seen = []

    def from_reference(ref_dir, base_model=None):
        seen.append(base_model)
        raise ValueError("stopped here")

    monkeypatch.setattr(zip2zip_hf.interop, "from_reference", from_reference)
    assert "cannot convert it (stopped here)" in refused(
        capsys, "convert", tmp_path, tmp_path / "out", "--base", "smollm2"
    )
    assert seen == [str(embedded.base)]
    for command, option, *extra in (
        ("convert", "--base", tmp_path, tmp_path / "out"),
        ("uptrain", "--model", "--output-dir", tmp_path / "uptrain"),
        ("demo", "--model", "--finetune"),
    ):
        error = refused(capsys, command, *extra, option, "smollm2-zip2zip")
        assert f"{option} smollm2-zip2zip: a zip2zip model, and " in error and "use smollm2" in error
    assert embedded.loads == [] and embedded.built() == [] and not (tmp_path / "uptrain").exists()


# ---------------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_the_exported_smollm2_zip2zip_loads_without_the_package_and_gives_the_same_logits(tmp_path):
    out = tmp_path / "smollm2-zip2zip"
    assert main(["export", "smollm2-zip2zip", str(out)]) == 0
    model, tokenizer = load_named_model("smollm2-zip2zip")
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
        ids = tokenizer({TEXT!r}, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save_file(dict(ids=ids, logits=logits.contiguous()), sys.argv[2])
        print(type(model).__module__)
        """
    )
    assert "transformers_modules" in run_without_package(script, str(out), str(tmp_path / "got.safetensors"))
    got = load_file(tmp_path / "got.safetensors")
    assert got["ids"].tolist() == ids.tolist()
    torch.testing.assert_close(got["logits"], expected, atol=0, rtol=0)
