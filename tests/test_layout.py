"""The package's layers as docs/design.md states them, checked on the source (AST), and every
docstring example run.

- no import cycle between gradstab's modules (imports inside functions count: a lazy import
  does not make a cycle go away; only ``if TYPE_CHECKING:`` imports are left out);
- the bottom module, ``gradstab._common``, imports nothing else from gradstab;
- library code never imports from ``gradstab.tools`` (the command-line tools import the
  library, never the other way round);
- a module over 800 lines says why in a ``Size:`` paragraph of its docstring;
- every ``>>>`` example in a docstring runs and prints what it shows (doctest).
"""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import pkgutil

import pytest

import gradstab

PKG_DIR = os.path.dirname(os.path.abspath(gradstab.__file__))
#: Modules kept only so that old import paths keep working: each replaces itself in sys.modules.
ALIASES = {"gradstab.bench", "gradstab.demo", "gradstab.plots", "gradstab.report"}
MAX_LINES = 800


def _module_files() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG_DIR):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, os.path.dirname(PKG_DIR))[:-3].replace(os.sep, ".")
            out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST) -> list[str]:
    """Every gradstab module named by an import statement outside ``if TYPE_CHECKING:``."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gradstab import x` imports the module gradstab.x when there is one
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub != "gradstab._C":  # the compiled extension imports nothing of ours
                    names.append(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [n for n in names if n == "gradstab" or n.startswith("gradstab.")]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        graph[name] = {m for m in _imported(tree) if m in MODULES and m != name}
    return graph


GRAPH = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walker_sees_lazy_imports_and_skips_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gradstab.callback import GradStabCallback\n"
        "def f():\n    from gradstab import functional\n    import gradstab.reference\n"
    )
    assert _imported(tree) == ["gradstab.functional", "gradstab.reference"]


def test_no_import_cycles_between_gradstab_modules():
    assert _cycles(GRAPH) == []


def test_the_bottom_module_imports_nothing_from_gradstab():
    assert GRAPH["gradstab._common"] == set()


def test_library_code_never_imports_the_tools():
    library = [m for m in GRAPH if not m.startswith("gradstab.tools") and m not in ALIASES]
    bad = {m: sorted(d for d in GRAPH[m] if d.startswith("gradstab.tools")) for m in library}
    assert {m: d for m, d in bad.items() if d} == {"gradstab.__main__": ["gradstab.tools.cli"]}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_long_modules_say_why(name):
    with open(MODULES[name], encoding="utf-8") as f:
        text = f.read()
    if text.count("\n") <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "Size:" in doc, f"{name} has over {MAX_LINES} lines and no 'Size:' reason"


def _doctest_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(gradstab.__path__, "gradstab.")]
    return sorted(n for n in names if n not in ALIASES and n != "gradstab.__main__")


@pytest.mark.parametrize("name", ["gradstab", *_doctest_modules()])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
