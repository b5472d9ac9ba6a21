"""Text reports shared by the command line and the demo: reading files, loading a tokenizer, tables
of compression statistics, coloured samples. Errors a user can fix are `CLIError`s (one line each)."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import stat
from collections.abc import Sequence
from pathlib import Path

from ..tokenization_zip2zip import Zip2ZipTokenizer
from .visualize import ANSI_RESET, ANSI_STYLES, color_decode, compression_stats


__all__ = [
    "DEFAULT_MAX_BYTES",
    "CLIError",
    "coloured_sample",
    "describe",
    "first_line",
    "legend",
    "load_tokenizer",
    "prose_samples",
    "read_text_file",
    "stats_table",
]

# Sections of the Python language reference (English prose) shipped in pydoc_data.
PROSE_TOPICS = ("if", "while", "for", "try", "with", "function", "class", "import")
SAMPLE_LINES = 18
# Files larger than this are refused unless --max-bytes says otherwise: compression statistics hold
# the whole text, its base ids and its codes in memory at once.
DEFAULT_MAX_BYTES = 64 * 2**20

HEADERS = ("text", "bytes", "base tokens", "zip2zip tokens", "ratio", "bytes/base tok", "bytes/z2z tok")


class CLIError(Exception):
    """A problem with the user's input: reported as one line on stderr, without a traceback."""


def first_line(error: BaseException) -> str:
    """An error's first line (what a one-line `CLIError` quotes of it), or its type's name when it says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_text_file(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The UTF-8 text of ``path``, or a CLIError saying in one line why it cannot be had.

    Only regular files are read (a FIFO or a device such as /dev/zero could block or never end),
    and at most ``max_bytes`` of them.
    """
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except OSError as error:
        raise CLIError(f"{path}: cannot read it ({error.strerror or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CLIError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise CLIError(f"{path}: not a regular file (pipes and devices are not read)")
    if info.st_size > max_bytes:
        raise CLIError(f"{path}: {info.st_size} bytes, more than --max-bytes {max_bytes}")
    try:
        with file.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as error:
        raise CLIError(f"{path}: cannot read it ({error.strerror or error})") from None
    if len(data) > max_bytes:
        raise CLIError(f"{path}: more than --max-bytes {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CLIError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None


def load_tokenizer(path: str | None, max_codebook_size: int | None, max_subtokens: int | None) -> Zip2ZipTokenizer:
    """A Zip2ZipTokenizer from a saved one, or built from a base HF tokenizer folder (default: SmolLM2).

    ``max_codebook_size`` / ``max_subtokens`` override a saved tokenizer's settings when given.
    """
    if path is None:
        from .smollm2 import smollm2_path

        try:
            path = str(smollm2_path(weights=False))
        except (ImportError, OSError) as error:
            raise CLIError(f"the default SmolLM2 tokenizer is not available: {error}") from None
    folder = Path(path)
    if not folder.is_dir():
        raise CLIError(f"{path}: no such tokenizer folder")
    overrides = {}
    if max_codebook_size is not None:
        overrides["max_codebook_size"] = max_codebook_size
    if max_subtokens is not None:
        overrides["max_subtokens"] = max_subtokens
    try:
        if (folder / Zip2ZipTokenizer.vocab_files_names["base_tokenizer_file"]).is_file():
            return Zip2ZipTokenizer.from_pretrained(folder, **overrides)
        return Zip2ZipTokenizer.from_base(folder, **overrides)
    except (OSError, ValueError, TypeError) as error:
        raise CLIError(f"cannot load a tokenizer from {path}: {first_line(error)}") from None


def stats_table(tokenizer: Zip2ZipTokenizer, named_texts: Sequence[tuple[str, str]]) -> str:
    """A text table of `compression_stats` per text, plus a total row (texts compressed independently)."""
    rows = []
    for name, text in named_texts:
        rows.append((name, compression_stats(tokenizer, [text])))
    rows.append(("total", compression_stats(tokenizer, [text for _, text in named_texts])))
    cells = [HEADERS] + [
        (
            name,
            str(s["bytes"]),
            str(s["base_tokens"]),
            str(s["compressed_tokens"]),
            f"{s['ratio']:.3f}",
            f"{s['bytes_per_base_token']:.2f}",
            f"{s['bytes_per_compressed_token']:.2f}",
        )
        for name, s in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]

    def line(row: Sequence[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(
            [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        )

    rule = "-" * len(line(cells[0]))
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:-1]), rule, line(cells[-1])])


def describe(tokenizer: Zip2ZipTokenizer) -> str:
    name = Path(tokenizer.name_or_path).name or "tokenizer"
    return (
        f"tokenizer {name}: V={tokenizer.initial_vocab_size} base ids, "
        f"K={tokenizer.max_codebook_size} hypertokens per sequence, M={tokenizer.max_subtokens} base tokens each"
    )


def legend() -> str:
    return "legend: base token  " + "  ".join(
        f"{style} {label} {ANSI_RESET}"
        for style, label in zip(ANSI_STYLES.values(), ("2 tokens", "3 tokens", "4+ tokens"), strict=True)
    )


def prose_samples() -> list[tuple[str, str]]:
    """English prose from the standard library: the Zen of Python and a few language-reference sections."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        import this
    samples = [("prose: the Zen of Python", codecs.decode(this.s, "rot13"))]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out; the Zen alone still shows prose
        return samples
    sections = [topics[key] for key in PROSE_TOPICS if key in topics]
    if sections:
        samples.append(("prose: Python language reference", "\n\n".join(sections)))
    return samples


def coloured_sample(tokenizer: Zip2ZipTokenizer, text: str, n_lines: int = SAMPLE_LINES) -> str:
    """``n_lines`` consecutive lines of ``text`` with the most hypertokens, coloured by `color_decode`.

    The whole text is compressed and decoded (a sequence only decodes from its start); only the
    shown lines are picked afterwards, which works because colours never cross a line end.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lines = color_decode(tokenizer, ids).split("\n")
    hyper_counts = [line.count(ANSI_RESET) for line in lines]
    windows = [sum(hyper_counts[i : i + n_lines]) for i in range(max(1, len(lines) - n_lines + 1))]
    start = windows.index(max(windows))
    return "\n".join(lines[start : start + n_lines])


def at_least(minimum: int, most: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``most``, if given)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        if most is not None and number > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {number}")
        return number

    return parse
