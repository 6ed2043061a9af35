"""The package's shape: no import cycles (function-level imports included), no Hydra in cgpt/, and
no edits of the interpreter's import path anywhere (entry points import the installed package)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "cgpt"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def cgpt_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every cgpt module ``path`` imports, at any depth of the file (functions, ``if`` blocks, ...)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = cgpt_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import os\n\ndef f():\n    from cgpt.b import g\n")
    b.write_text("from cgpt.a import f\n")
    known = {"cgpt.a", "cgpt.b"}
    graph = {"cgpt.a": imports_of(a, "cgpt.a", known), "cgpt.b": imports_of(b, "cgpt.b", known)}
    assert graph == {"cgpt.a": {"cgpt.b"}, "cgpt.b": {"cgpt.a"}}
    assert find_cycle(graph) == ["cgpt.a", "cgpt.b", "cgpt.a"]


def test_cgpt_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "cgpt.weights.loading" in graph  # the walk sees the whole package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_weights_import_no_strategy_and_strategies_no_weights_loader() -> None:
    """Checkpoint formats and loading know nothing of parallelism; strategies only wrap the model."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("cgpt.weights"):
            assert not any(d.startswith(("cgpt.strategies", "cgpt.lit_module", "cgpt.training")) for d in deps), name
        if name.startswith("cgpt.strategies"):
            assert not any(d in ("cgpt.weights.loading", "cgpt.init_from", "cgpt.lora") for d in deps), name


def test_cgpt_is_free_of_hydra() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("hydra", "omegaconf") for n in names), path


# The fork server gives each run the first import-path entry the interpreter gives `python SCRIPT`
# (the script's folder): it stands in for the interpreter's start, it does not add a path of its own;
# its test reads that entry back.
STANDS_IN_FOR_THE_INTERPRETER = {"tests/forkserver.py", "tests/test_rank_launcher.py"}


def test_nothing_edits_the_import_path() -> None:
    needle = "sys" + ".path"  # spelled apart so that this file passes its own check (and a grep)
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for folder in ("cgpt", "train", "slurm", "tests", "bench", "data")
        for p in (REPO_ROOT / folder).rglob("*.py")
        if needle in p.read_text() and str(p.relative_to(REPO_ROOT)) not in STANDS_IN_FOR_THE_INTERPRETER
    ]
    assert offenders == []
