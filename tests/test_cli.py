"""The command line: ``compress`` statistics agree with `compression_stats`; bad input is one clear line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import transformers

from utils import STDLIB, save_tiny_base_model, stdlib_text
from zip2zip_hf import Zip2ZipTokenizer
from zip2zip_hf.tools.cli import main
from zip2zip_hf.tools.visualize import compression_stats


ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def base_dir(tiny_base_tokenizer, tmp_path_factory) -> Path:
    """The tiny base tokenizer saved as a plain HF tokenizer folder."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_base_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def files(tmp_path) -> list[Path]:
    texts = {"code.py": stdlib_text(6000), "prose.txt": "The cat sat on the mat. The cat sat on the hat. " * 10}
    paths = []
    for name, text in texts.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def table_rows(out: str) -> dict[str, list[str]]:
    """{name: [bytes, base, compressed, ratio, bytes/base, bytes/z2z]} from a printed stats table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 7 and re.fullmatch(r"\d+", parts[-6]):
            rows[" ".join(parts[:-6])] = parts[-6:]
    return rows


def expected_cells(stats: dict) -> list[str]:
    return [
        str(stats["bytes"]),
        str(stats["base_tokens"]),
        str(stats["compressed_tokens"]),
        f"{stats['ratio']:.3f}",
        f"{stats['bytes_per_base_token']:.2f}",
        f"{stats['bytes_per_compressed_token']:.2f}",
    ]


def test_compress_numbers_agree_with_compression_stats(base_dir, files, capsys):
    assert main(["compress", *map(str, files), "--tokenizer", str(base_dir), "-K", "300", "-M", "3"]) == 0
    out = capsys.readouterr().out
    assert "V=512" in out and "K=300" in out and "M=3" in out
    tok = Zip2ZipTokenizer.from_base(base_dir, max_codebook_size=300, max_subtokens=3)
    texts = [path.read_text(encoding="utf-8") for path in files]
    rows = table_rows(out)
    assert set(rows) == {str(files[0]), str(files[1]), "total"}
    for path, text in zip(files, texts, strict=True):
        assert rows[str(path)] == expected_cells(compression_stats(tok, [text]))
    assert rows["total"] == expected_cells(compression_stats(tok, texts))
    assert float(rows[str(files[1])][3]) < 0.7  # repeated prose compresses well


def test_compress_with_a_saved_zip2zip_tokenizer(base_dir, files, tmp_path, capsys):
    saved = tmp_path / "z2z"
    Zip2ZipTokenizer.from_base(base_dir, max_codebook_size=50, max_subtokens=2).save_pretrained(saved)
    assert main(["compress", str(files[0]), "--tokenizer", str(saved)]) == 0
    rows = table_rows(capsys.readouterr().out)
    tok = Zip2ZipTokenizer.from_pretrained(saved)
    assert rows[str(files[0])] == expected_cells(compression_stats(tok, [files[0].read_text(encoding="utf-8")]))
    assert main(["compress", str(files[0]), "--tokenizer", str(saved), "-K", "0"]) == 0  # K=0: no hypertokens
    assert table_rows(capsys.readouterr().out)["total"][3] == "1.000"


def bad_input_message(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    return lines[0]


def test_compress_bad_paths(base_dir, files, tmp_path, capsys):
    tokenizer = ["--tokenizer", str(base_dir)]
    assert main(["compress", str(tmp_path / "missing.py"), *tokenizer]) == 2
    assert "missing.py: no such file" in bad_input_message(capsys)
    assert main(["compress", str(files[0]), str(tmp_path), *tokenizer]) == 2
    assert "is a directory" in bad_input_message(capsys)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"ok\xff\xfe\x00")
    assert main(["compress", str(binary), *tokenizer]) == 2
    assert "blob.bin: not UTF-8 text" in bad_input_message(capsys)
    assert main(["compress", str(files[0]), "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "no such tokenizer folder" in bad_input_message(capsys)
    assert main(["compress", str(files[0]), "--tokenizer", str(tmp_path)]) == 2  # a folder without a tokenizer
    assert "cannot load a tokenizer" in bad_input_message(capsys)


def test_compress_unreadable_file(base_dir, files, monkeypatch, capsys):
    # chmod cannot make a file unreadable for root, so simulate the OS refusing.
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self.name == "code.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    assert main(["compress", str(files[0]), "--tokenizer", str(base_dir)]) == 2
    assert "code.py: cannot read it (Permission denied)" in bad_input_message(capsys)


def test_bad_options_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "x.py", "-M", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_demo_with_a_given_tokenizer(base_dir, capsys):
    assert main(["demo", "--compression-only", "--tokenizer", str(base_dir), "-K", "512"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "stdlib/argparse.py" in rows and "prose: the Zen of Python" in rows and "total" in rows
    tok = Zip2ZipTokenizer.from_base(base_dir, max_codebook_size=512)
    argparse_text = (STDLIB / "argparse.py").read_text(encoding="utf-8")
    assert rows["stdlib/argparse.py"] == expected_cells(compression_stats(tok, [argparse_text]))
    sample = out.split("legend:", 1)[1].split("\n", 2)[2]
    assert "\x1b[" in sample and ANSI.sub("", sample).strip() in argparse_text


@pytest.mark.real_model
def test_demo_default_tokenizer(capsys):
    assert main(["demo", "--compression-only"]) == 0
    out = capsys.readouterr().out
    assert "V=49152" in out
    assert float(table_rows(out)["total"][3]) < 0.9


@pytest.mark.slow
def test_python_dash_m_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "zip2zip_hf", "compress", str(tmp_path / "nope.txt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"zip2zip_hf compress: error: {tmp_path / 'nope.txt'}: no such file"


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "not a saved model folder" in bad_input_message(capsys)
    save_tiny_base_model(tmp_path)  # a plain causal LM: no codebooks to serve
    capsys.readouterr()
    assert main(["serve", str(tmp_path), "--device", "nonsense"]) == 2
    assert "--device nonsense: not a device" in bad_input_message(capsys)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert main(["serve", str(tmp_path), "--device", "cpu"]) == 2
        assert "cannot serve it" in bad_input_message(capsys)


def test_serve_on_vllm_without_vllm_is_one_line_before_loading(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (make test-vllm tests serving on it)")
    save_tiny_base_model(tmp_path)
    capsys.readouterr()
    assert main(["serve", str(tmp_path), "--engine", "vllm"]) == 2
    assert "--engine vllm: vLLM is not installed" in bad_input_message(capsys)


def test_a_load_failure_that_says_nothing_is_still_one_line(tmp_path, files, monkeypatch, capsys):
    import zip2zip_hf.evaluation.scoring as scoring

    def silent_failure(*args, **kwargs):
        raise ValueError()

    save_tiny_base_model(tmp_path / "model")
    capsys.readouterr()  # the save's progress bar
    monkeypatch.setattr(scoring, "load_for_evaluation", silent_failure)
    assert main(["eval", str(tmp_path / "model"), str(files[0])]) == 2
    assert "cannot load it (ValueError)" in bad_input_message(capsys)


def test_serve_checks_its_port_and_host_before_loading(tmp_path, capsys, monkeypatch):
    """A port out of range, a host that does not resolve and a port taken are each one line, found
    before the model loads (which `serve` would do first)."""
    import socket

    pytest.importorskip("fastapi")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("serving runs on transformers 5's serving code")
    import zip2zip_hf.serving.server as server

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server, "serve", never)
    (tmp_path / "config.json").write_text("{}")
    for port in ("70000", "65536", "0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", str(tmp_path), "--port", port])
        assert exit_info.value.code == 2 and "--port" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid: " in bad_input_message(capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)" in bad_input_message(capsys)
