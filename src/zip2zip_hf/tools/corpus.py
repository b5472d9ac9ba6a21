"""The offline text the tools train and score on: what every Python ships.

Code is the CPython standard library's own sources; prose is the language reference that ``pydoc``
carries (``pydoc_data.topics``). A few files and sections are held out from every training run
(the demo's finetune, ``uptrain``, ``benchmarks/bench_quality.py``) and used only to score.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from .report import PROSE_TOPICS, CLIError


__all__ = [
    "HELD_OUT",
    "PROMPT_FILE",
    "PROMPT_LINES",
    "held_out_files",
    "held_out_texts",
    "prompt_text",
    "training_corpus",
    "training_texts",
]

# Held out from training: the compression table, the held-out scores and the generation prompt use them.
HELD_OUT = ("argparse.py", "textwrap.py", "difflib.py", "json/encoder.py", "csv.py")
PROMPT_FILE = "textwrap.py"
PROMPT_LINES = 40
# The share of the held-out text that `held_out_texts` gives (uptrain's logs and record, the demo).
HELD_OUT_CODE_BYTES = 4_000  # of each held-out file
HELD_OUT_PROSE_BYTES = 8_000  # of the held-out language-reference sections together


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_files() -> list[tuple[str, str]]:
    stdlib = stdlib_dir()
    files = [
        (f"stdlib/{name}", (stdlib / name).read_text(encoding="utf-8"))
        for name in HELD_OUT
        if (stdlib / name).is_file()
    ]
    if not files:
        raise CLIError(f"no standard-library sources found under {stdlib}")
    return files


def prompt_text() -> str:
    """The first `PROMPT_LINES` lines of the held-out `PROMPT_FILE`: the demo's generation prompt."""
    lines = (stdlib_dir() / PROMPT_FILE).read_text(encoding="utf-8").splitlines()
    return "\n".join(lines[:PROMPT_LINES]) + "\n"


def held_out_texts() -> dict[str, list[str]]:
    """``{"code": [...], "prose": [...]}``: the first bytes of each held-out file, and of the held-out
    language-reference sections (`PROSE_TOPICS`) together."""
    from pydoc_data.topics import topics

    def cut(text: str, n_bytes: int) -> str:
        return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")

    code = [cut(text, HELD_OUT_CODE_BYTES) for _, text in held_out_files()]
    prose = cut("\n\n".join(topics[key] for key in PROSE_TOPICS if key in topics), HELD_OUT_PROSE_BYTES)
    return {"code": code, "prose": [prose]}


def training_texts(max_chars: int | None) -> list[str]:
    """Top-level standard-library modules (sorted, the held-out ones skipped) until ``max_chars``
    characters are reached (None: all of them)."""
    texts, total = [], 0
    for path in sorted(stdlib_dir().glob("*.py")):
        if path.name in HELD_OUT:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def training_corpus(max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """``(code, prose)``: `training_texts`, and every language-reference section but the held-out
    ones (each kind until ``max_chars`` characters; None: all)."""
    from pydoc_data.topics import topics

    prose, total = [], 0
    for key, text in sorted(topics.items()):
        if key in PROSE_TOPICS:
            continue
        prose.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return training_texts(max_chars), prose
