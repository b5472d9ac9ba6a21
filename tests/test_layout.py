"""The package's layout: a saved checkpoint carries exactly the core, the core imports nothing but
what a checkpoint's reader has, and no module imports itself back through another."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import zip2zip_hf
from utils import tiny_base, wrap


PACKAGE = Path(zip2zip_hf.__file__).parent
# The checkpoint's code: what `save_pretrained` copies next to the weights for trust_remote_code.
CORE = {
    "_compat.py",
    "configuration_zip2zip.py",
    "generation_zip2zip.py",
    "speculative_zip2zip.py",
    "cache_zip2zip.py",
    "codebook_blocks.py",
    "codebook_rows.py",
    "hyper_state.py",
    "lzw_tensors.py",
    "precomputed_codebooks.py",
    "hyper_encoder.py",
    "lzw.py",
    "modeling_zip2zip.py",
    "tokenization_zip2zip.py",
}
# What a reader of a checkpoint has: the standard library and these.
THIRD_PARTY = {"torch", "transformers", "tokenizers", "safetensors"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(level, module)`` of every import in ``path``, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_a_checkpoint_carries_exactly_the_core(tmp_path, text_tok):
    model = wrap(tiny_base("llama"))
    model.save_pretrained(tmp_path)
    text_tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == CORE


def test_the_core_imports_only_what_a_checkpoint_reader_has():
    for name in sorted(CORE):
        for level, module in imports_of(PACKAGE / name):
            top = module.split(".")[0]
            if level == 0:
                assert top in sys.stdlib_module_names or top in THIRD_PARTY, f"{name} imports {module}"
            else:  # transformers copies only `from .sibling import ...` into a checkpoint
                assert level == 1 and f"{module}.py" in CORE, f"{name} imports {'.' * level}{module}"


def test_the_model_module_imports_every_core_file_it_needs_by_name():
    """transformers 4.57 copies a local checkpoint's remote code one import deep: a core file that
    only a sibling imports is missing from its module cache, and loading fails."""

    def siblings(name):
        return {f"{module}.py" for level, module in imports_of(PACKAGE / name) if level == 1}

    needed, todo = set(), ["modeling_zip2zip.py"]
    while todo:
        for sibling in siblings(todo.pop()) - needed:
            needed.add(sibling)
            todo.append(sibling)
    assert needed - {"modeling_zip2zip.py"} <= siblings("modeling_zip2zip.py")


def test_no_import_cycles():
    modules = {p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", "."): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0] if "." in name else ""
        edges = set()
        for level, module in imports_of(path):
            if level == 0:
                if module.startswith("zip2zip_hf."):
                    edges.add(module.removeprefix("zip2zip_hf."))
                continue
            base = package.split(".")[: len(package.split(".")) - (level - 1)] if package else []
            edges.add(".".join([*base, module] if module else base))
        graph[name] = {e for e in edges if e in modules and e != name}

    def cycle_from(start, path, seen):
        for nxt in graph[start]:
            if nxt == path[0]:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                found = cycle_from(nxt, [*path, nxt], seen)
                if found:
                    return found
        return None

    for name in graph:
        cycle = cycle_from(name, [name], {name})
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
