"""Bad input, round 5 (issue 42), on the command line and the benchmarks: each case one clear error
naming the culprit before any work, nothing left on disk."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class Parsed(Exception):
    """Raised instead of running a benchmark whose arguments were accepted."""


def parse_benchmark_arguments(module_name: str, argv: list[str], monkeypatch) -> None:
    """Parse ``argv`` as the benchmark's own ``main`` does, stopping right after: `Parsed` when they
    are accepted, ``SystemExit(2)`` when argparse refuses them."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(module_name)
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real_parse(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module_name, *argv])
    if inspect.signature(module.main).parameters:
        module.main(argv)
    else:
        module.main()


@pytest.mark.parametrize(
    "module_name, argv, named",
    [
        ("bench_unseen", ["--bytes", "0"], "--bytes"),
        ("bench_excess", ["--bytes", "-5"], "--bytes"),
        ("bench_quality", ["--window", "0"], "--window"),
        ("bench_quality", ["--budget", "-1"], "--budget"),
        ("bench_quality", ["--budget", "nan"], "--budget"),
        ("bench_quality", ["--checkpoints", "0"], "--checkpoints"),
        ("bench_generation", ["--threads", "0"], "--threads"),
        ("bench_speculative", ["--lookup", "0"], "--lookup"),
        ("bench_training", ["--steps", "0"], "--steps"),
        ("bench_codec", ["--repeats", "0"], "--repeats"),
        ("bench_model", ["--steps", "-1"], "--steps"),
        ("bench_gpu", ["--repeats", "0"], "--repeats"),
        ("bench_unseen", ["--json", "{missing}/scores.json"], "--json"),
        ("bench_quality", ["--json", "{missing}/curves.json"], "--json"),
        ("bench_quality", ["--plot", "{tmp}"], "--plot"),
        ("plot_uptrain", ["--out", "{missing}/curve.png"], "--out"),
        ("bench_engine", ["--base", "b", "--zip2zip", "z", "--requests", "0"], "--requests"),
        ("bench_engine", ["--base", "b", "--zip2zip", "z", "--new-tokens", "-1"], "--new-tokens"),
        ("bench_engine", ["--base", "b", "--zip2zip", "z", "--json", "{missing}/engine.json"], "--json"),
    ],
)
def test_a_benchmark_refuses_bad_arguments_before_any_work(module_name, argv, named, tmp_path, monkeypatch, capsys):
    argv = [arg.format(missing=tmp_path / "missing", tmp=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        parse_benchmark_arguments(module_name, argv, monkeypatch)
    assert exit_info.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_a_benchmark_takes_good_arguments(tmp_path, monkeypatch):
    with pytest.raises(Parsed):
        parse_benchmark_arguments("bench_unseen", ["--bytes", "10", "--json", str(tmp_path / "s.json")], monkeypatch)


# ---------------------------------------------------------------------- export ADAPTER_FOLDER


class BaseLoaded(Exception):
    """What loading the adapter's base raises here: a check that came too late."""


@pytest.fixture
def adapter(tmp_path, monkeypatch) -> Path:
    """An adapter folder as uptrain writes it (the shipped record and config; weights a stand-in),
    whose base is never loaded here."""
    import shutil

    import torch
    from safetensors.torch import save_file

    import zip2zip_hf.tools.cli as cli
    from zip2zip_hf.tools.embedded import EMBEDDED_ZIP2ZIP

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("uptrain.json", "adapter_config.json"):
        shutil.copy(EMBEDDED_ZIP2ZIP / name, folder / name)
    save_file({"weight": torch.zeros(64, 64)}, str(folder / "adapter_model.safetensors"))

    def base_loaded(*args, **kwargs):
        raise BaseLoaded

    monkeypatch.setattr(cli, "load_uptrain_export", base_loaded)
    monkeypatch.setattr(cli, "load_named_model", base_loaded)
    return folder


def _edit_json(path: Path, edit) -> None:
    import json

    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "uptrain.json").write_text("not json"), "uptrain.json: cannot read it as JSON"),
        (lambda f: (f / "uptrain.json").write_text("{}"), "uptrain.json: compression must be a JSON object"),
        (lambda f: (f / "uptrain.json").write_text("[]"), "uptrain.json: holds a JSON list, not an object"),
        (lambda f: (f / "adapter_config.json").write_text("{"), "adapter_config.json: cannot read it as JSON"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (lambda f: _truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors: damaged"),
        (
            lambda f: _edit_json(f / "uptrain.json", lambda r: r["compression"].update(max_codebook_size="2048")),
            "uptrain.json: max_codebook_size must be an int, got '2048'",
        ),
        (
            lambda f: _edit_json(f / "uptrain.json", lambda r: r["compression"].update(max_subtokens=0)),
            "uptrain.json: max_subtokens must be >= 1, got 0",
        ),
        (
            lambda f: _edit_json(f / "uptrain.json", lambda r: r.update(compresion={})),
            "uptrain.json: unknown keys ['compresion']",
        ),
        (
            lambda f: _edit_json(f / "uptrain.json", lambda r: r["model"].update(hyper_encoder="big")),
            "uptrain.json: hyper_encoder must be one of",
        ),
    ],
)
def test_a_damaged_adapter_folder_is_one_line_before_its_base_loads(adapter, tmp_path, capsys, damage, message):
    from zip2zip_hf.tools.cli import main

    damage(adapter)
    assert main(["export", str(adapter), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("zip2zip_hf export: error: ") and message in lines[0], lines[0]
    assert str(adapter) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_intact_adapter_folder_goes_on_to_load_its_base(adapter, tmp_path):
    from zip2zip_hf.tools.cli import main

    with pytest.raises(BaseLoaded):
        main(["export", str(adapter), str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_folder_named_as_an_embedded_model_does_not_take_its_name(adapter, tmp_path, monkeypatch):
    """A name always means the embedded model, in export and wherever a checkpoint is taken (a folder
    of that name is ``./NAME``)."""
    import zip2zip_hf.tools.embedded as embedded
    from zip2zip_hf.tools.cli import main

    adapter.rename(tmp_path / "smollm2-zip2zip")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BaseLoaded):  # the embedded model's loading, not the adapter's refusal
        main(["export", "smollm2-zip2zip", str(tmp_path / "out")])
    monkeypatch.setattr(embedded, "embedded_checkpoint", lambda name: Path("/embedded") / name)
    assert embedded.checkpoint_folder("smollm2-zip2zip") == str(Path("/embedded/smollm2-zip2zip"))
    with pytest.raises(embedded.CLIError, match="an adapter written by uptrain"):
        embedded.checkpoint_folder("./smollm2-zip2zip")


# ---------------------------------------------------------------------- hand-edited checkpoints


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, text_model, text_tok) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    text_model.save_pretrained(folder)
    text_tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "file, edit, message",
    [
        ("tokenizer_config.json", lambda content: [], "tokenizer_config.json: holds a JSON list, not an object"),
        ("generation_config.json", lambda content: "x", "generation_config.json: holds a JSON str, not an object"),
        (
            "config.json",
            lambda content: {**content, "text_config": {**content["text_config"], "max_position_embeddings": 0}},
            "config.json: text_config.max_position_embeddings must be an int of at least 2",
        ),
    ],
)
def test_a_hand_edited_checkpoint_is_one_line_naming_the_file(saved_checkpoint, tmp_path, capsys, file, edit, message):
    import json
    import shutil

    from zip2zip_hf.tools.cli import main

    folder = shutil.copytree(saved_checkpoint, tmp_path / "checkpoint")
    (folder / file).write_text(json.dumps(edit(json.loads((folder / file).read_text()))))
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 4)
    assert main(["eval", str(folder), str(text), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("zip2zip_hf eval: error: ") and f"{folder / file.split(':')[0]}" in lines[0]
    assert message in lines[0]
