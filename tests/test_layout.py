"""The package's layout: a saved checkpoint carries exactly the core, the core imports nothing but
what a checkpoint's reader has, and no module imports itself back through another."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

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
    "checkpoint_loading.py",
    "codebook_blocks.py",
    "codebook_stores.py",
    "hyper_state.py",
    "device_codebooks.py",
    "precomputed_codebooks.py",
    "input_pipeline.py",
    "hyper_logits.py",
    "hyper_encoder.py",
    "reference_hyper_encoders.py",
    "lzw.py",
    "lzw_codebook.py",
    "base_tokenizer.py",
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


@pytest.mark.parametrize("entry_point", ["modeling_zip2zip.py", "tokenization_zip2zip.py", "configuration_zip2zip.py"])
def test_each_auto_class_module_imports_every_core_file_it_needs_by_name(entry_point):
    """transformers 4.57 copies a local checkpoint's remote code one import deep from the module an
    auto_map names: a core file that only a sibling imports is missing from its module cache, and
    loading fails."""

    def siblings(name):
        return {f"{module}.py" for level, module in imports_of(PACKAGE / name) if level == 1}

    needed, todo = set(), [entry_point]
    while todo:
        for sibling in siblings(todo.pop()) - needed:
            needed.add(sibling)
            todo.append(sibling)
    assert needed - {entry_point} <= siblings(entry_point)


def test_the_top_level_is_the_core_and_the_rest_lives_in_subpackages():
    """What a checkpoint carries sits flat; finetuning, evaluation, serving, the engines' core and the tools
    each have a folder."""
    assert {p.name for p in PACKAGE.glob("*.py")} == CORE | {"__init__.py", "__main__.py"}
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == {"engines", "evaluation", "finetuning", "interop", "serving", "tools"}


def test_only_the_tools_and_the_entry_point_import_the_tools():
    """`tools/` serves the command line: the library's modules never depend on it."""
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tools" or path.name == "__main__.py":
            continue
        for level, module in imports_of(path):
            depth_one = path.parent == PACKAGE
            absolute = level == 0 and module.startswith("zip2zip_hf.tools")
            relative = (level == 1 and depth_one or level == 2 and not depth_one) and module.startswith("tools")
            assert not (absolute or relative), f"{path.relative_to(PACKAGE)} imports the tools ({module})"


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


def test_the_input_pipeline_declares_what_it_reads():
    """`Zip2ZipInputPipeline` reads only the attributes it declares or sets itself, its own methods,
    and what every PreTrainedModel has (``config``, ``training``): no contract lives in its host's
    memory."""
    tree = ast.parse((PACKAGE / "input_pipeline.py").read_text(encoding="utf-8"))
    (pipeline,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Zip2ZipInputPipeline"]
    own = {n.target.id for n in pipeline.body if isinstance(n, ast.AnnAssign)}
    own |= {n.name for n in pipeline.body if isinstance(n, ast.FunctionDef)}
    attributes = [n for n in ast.walk(pipeline) if isinstance(n, ast.Attribute)]
    on_self = [n for n in attributes if isinstance(n.value, ast.Name) and n.value.id == "self"]
    own |= {n.attr for n in on_self if isinstance(n.ctx, ast.Store)}
    read = {n.attr for n in on_self if isinstance(n.ctx, ast.Load)}
    assert read - own <= {"config", "training"}, (
        f"read but not declared: {sorted(read - own - {'config', 'training'})}"
    )


def test_each_name_is_imported_from_the_module_that_defines_it():
    """`lzw` uses what `lzw_codebook` defines but does not re-export it: every import of those names
    (in the package, the tests and the benchmarks) names `lzw_codebook`."""
    defined = {
        node.name if hasattr(node, "name") else node.targets[0].id
        for node in ast.parse((PACKAGE / "lzw_codebook.py").read_text(encoding="utf-8")).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
        or isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
    }
    roots = [PACKAGE, PACKAGE.parents[1] / "tests", PACKAGE.parents[1] / "benchmarks"]
    for path in (p for root in roots if root.is_dir() for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "lzw":
                names = {alias.name for alias in node.names} & defined
                assert not names, f"{path.name} imports {sorted(names)} from lzw, not lzw_codebook"


def test_no_module_is_longer_than_500_lines():
    """A module is read whole by whoever changes it: none grows past 500 lines, in the core or in the
    subpackages around it."""
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 500, f"{path.relative_to(PACKAGE)} has {lines} lines: split it"
