"""Command line: ``python -m zip2zip_hf compress FILE...`` and ``python -m zip2zip_hf demo``.

``compress`` prints how much LZW shortens each file (each compressed on its own) and a total.
``demo`` (see `zip2zip_hf.demo`) zip2zip-fies SmolLM2-135M, LoRA-finetunes it briefly on CPython
standard-library sources and shows compression, held-out loss and a generated sample;
``demo --compression-only`` shows the compression of real text (code and prose) alone.

The default tokenizer is the real SmolLM2-135M-Instruct one (see `zip2zip_hf.smollm2`).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from .tokenization_zip2zip import ANSI_RESET, ANSI_STYLES, Zip2ZipTokenizer


__all__ = ["main"]

# Standard-library sources for the demo: present in every CPython install, varied in style.
# Sections of the Python language reference (English prose) shipped in pydoc_data.
DEMO_TOPICS = ("if", "while", "for", "try", "with", "function", "class", "import")
SAMPLE_LINES = 18
# Files larger than this are refused unless --max-bytes says otherwise: compression statistics hold
# the whole text, its base ids and its codes in memory at once.
DEFAULT_MAX_BYTES = 64 * 2**20

HEADERS = ("text", "bytes", "base tokens", "zip2zip tokens", "ratio", "bytes/base tok", "bytes/z2z tok")


class CLIError(Exception):
    """A problem with the user's input: reported as one line on stderr, without a traceback."""


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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"cannot load a tokenizer from {path}: {first_line}") from None


def stats_table(tokenizer: Zip2ZipTokenizer, named_texts: Sequence[tuple[str, str]]) -> str:
    """A text table of `compression_stats` per text, plus a total row (texts compressed independently)."""
    rows = []
    for name, text in named_texts:
        rows.append((name, tokenizer.compression_stats([text])))
    rows.append(("total", tokenizer.compression_stats([text for _, text in named_texts])))
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
    sections = [topics[key] for key in DEMO_TOPICS if key in topics]
    if sections:
        samples.append(("prose: Python language reference", "\n\n".join(sections)))
    return samples


def coloured_sample(tokenizer: Zip2ZipTokenizer, text: str, n_lines: int = SAMPLE_LINES) -> str:
    """``n_lines`` consecutive lines of ``text`` with the most hypertokens, coloured by `color_decode`.

    The whole text is compressed and decoded (a sequence only decodes from its start); only the
    shown lines are picked afterwards, which works because colours never cross a line end.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    lines = tokenizer.color_decode(ids).split("\n")
    hyper_counts = [line.count(ANSI_RESET) for line in lines]
    windows = [sum(hyper_counts[i : i + n_lines]) for i in range(max(1, len(lines) - n_lines + 1))]
    start = windows.index(max(windows))
    return "\n".join(lines[start : start + n_lines])


def run_compress(args: argparse.Namespace) -> int:
    named_texts = [(path, read_text_file(path, args.max_bytes)) for path in args.files]  # all checked first
    tokenizer = load_tokenizer(args.tokenizer, args.max_codebook_size, args.max_subtokens)
    print(describe(tokenizer))
    print(stats_table(tokenizer, named_texts))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(args)


def at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zip2zip_hf",
        description="zip2zip: per-sequence LZW hypertokens for Hugging Face causal LMs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_tokenizer_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--tokenizer",
            metavar="PATH",
            help="a saved Zip2ZipTokenizer, or a HF tokenizer folder to wrap (default: SmolLM2-135M-Instruct)",
        )
        command.add_argument(
            "-K",
            dest="max_codebook_size",
            type=at_least(0),
            metavar="K",
            help="hypertokens per sequence (default 2048)",
        )
        command.add_argument(
            "-M", dest="max_subtokens", type=at_least(1), metavar="M", help="base tokens per hypertoken (default 4)"
        )

    compress = commands.add_parser("compress", help="compression statistics of text files")
    compress.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (regular files only)")
    compress.add_argument(
        "--max-bytes",
        type=at_least(1),
        default=DEFAULT_MAX_BYTES,
        metavar="N",
        help=f"refuse files larger than N bytes (default {DEFAULT_MAX_BYTES})",
    )
    add_tokenizer_options(compress)
    compress.set_defaults(run=run_compress)

    demo = commands.add_parser(
        "demo",
        help="zip2zip-fy SmolLM2-135M, LoRA-finetune it briefly on standard-library code, show compression, "
        "loss and a generated sample",
    )
    add_tokenizer_options(demo)
    from .demo import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 1 on a reported error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CLIError as error:
        print(f"zip2zip_hf {args.command}: error: {error}", file=sys.stderr)
        return 1
