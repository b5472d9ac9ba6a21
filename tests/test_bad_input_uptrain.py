"""`python -m zip2zip_hf uptrain` (and `eval --window`) on bad input: a clear error (one `error:` line on
stderr, exit status 2) or the right behaviour, and nothing a user saved lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils import save_tiny_base_model, stdlib_text
from zip2zip_hf.tools.cli import main


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_base_model(tmp_path_factory.mktemp("base"))  # 256 positions


def error_line(capsys) -> str:
    """The one line a refused command printed on stderr (nothing else there)."""
    err = capsys.readouterr().err
    noise = ("Warning", "warnings.warn", "it/s]")  # warnings of other libraries, progress bars
    lines = [line for line in err.strip().splitlines() if not any(part in line for part in noise)]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("zip2zip_hf uptrain: error: ") or lines[0].startswith("zip2zip_hf eval: error: ")
    return lines[0]


def test_eval_window_beyond_the_model_positions(base_dir, tmp_path, capsys):
    text = tmp_path / "code.py"
    text.write_text(stdlib_text(3000), encoding="utf-8")
    assert main(["eval", str(base_dir), str(text), "--window", "256", "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "--window 256:" in line and "has 256 positions" in line and "use --window 255 or less" in line
    assert main(["eval", str(base_dir), str(text), "--window", "255", "--device", "cpu", "--json"]) == 0
