"""Imports point downward (DESIGN.md, "Package layout"). Read from the source with ``ast``, nothing imported.

Layers, top to bottom (a module may import its own layer and those below, never one above):

4. ``adapterkit.cli`` and ``adapterkit.serve``: the commands and the server, on top of the public API.
3. ``adapterkit`` (the public ``__init__``), ``controller`` and ``trainer`` (its Trainer callback): the verbs
   (add/merge/save/load/...).
2. ``formats/*``, ``quant/*``, ``merging``, ``methods/*``: readers/writers, quantized bases, weight-space
   arithmetic, method families. They receive the controller as an argument (duck-typed ``ctl``) and hand
   it ``plan.Plan`` objects; they never import it.
1. ``plan``, ``sites``, ``compose``, ``targeting``, ``profiles``, ``infer_roles``, ``context``, ``config``, ``component``,
   ``backends``: the vocabulary everything above shares.

Checked: (a) no cycle among module-level imports (with the submodules that ``methods/__init__`` and
``formats/peft`` import through ``importlib``); (b) no cycle at all among the library's modules (below the CLI)
when function-local imports count too, so no local import is left dodging a cycle (plugin discovery
excepted: ``formats.peft.converters()`` loads every ``formats/peft_*.py`` on first use, and those plugins import
``formats.peft``'s helpers, a registry rather than a dependency of the helpers on the plugins); (c) no module of layers 1-2
imports the controller, the CLI or the package root, even inside a function (``TYPE_CHECKING`` blocks are
exempt: they never run); (d) no module of layer 1 imports layer 2.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT = "adapterkit"

TOP = ("adapterkit.cli", "adapterkit.serve")
CONTROLLER = ("adapterkit", "adapterkit.controller", "adapterkit.trainer")
MIDDLE = ("adapterkit.formats", "adapterkit.quant", "adapterkit.merging", "adapterkit.methods")
BOTTOM = (
    "adapterkit.plan",
    "adapterkit.sites",
    "adapterkit.compose",
    "adapterkit.targeting",
    "adapterkit.profiles",
    "adapterkit.infer_roles",
    "adapterkit.context",
    "adapterkit.config",
    "adapterkit.component",
    "adapterkit.backends",
)
# modules that import siblings by name through importlib: (prefix of the modules they load, at module level?)
DYNAMIC = {
    "adapterkit.methods": ("adapterkit.methods.", True),  # registers every method family on import
    "adapterkit.formats.peft": ("adapterkit.formats.peft_", False),  # converters(), on first peft save/load
}
# modules lower layers still import in a way (c) forbids, waiting for another change; each must still do so
PENDING: dict[str, str] = {}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _targets(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The adapterkit modules one import statement loads (``from pkg import sub`` names the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            where = ".".join(base + ([node.module] if node.module else []))
        else:
            where = node.module or ""
        names = [f"{where}.{a.name}" if f"{where}.{a.name}" in MODULES else where for a in node.names]
    return {n for n in names if n in MODULES and n != mod}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """Module -> (module-level imports, function-local imports) of adapterkit modules."""
    out = {}
    for mod, (path, is_pkg) in MODULES.items():
        top: set[str] = set()
        local: set[str] = set()
        todo: list[tuple[ast.AST, bool]] = [(ast.parse(path.read_text(encoding="utf-8")), False)]
        while todo:
            node, in_function = todo.pop()
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    (local if in_function else top).update(_targets(mod, is_pkg, child))
                scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                todo.append((child, in_function or scope))
        if mod in DYNAMIC and DYNAMIC[mod][1]:  # lazy plugin discovery is not counted: see the docstring
            top.update(m for m in MODULES if m.startswith(DYNAMIC[mod][0]))
        out[mod] = (top, local)
    return out


IMPORTS = _imports()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(mod: str, layer: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in layer)


def _layer(mod: str) -> int:
    if _in(mod, TOP):
        return 4
    if mod in CONTROLLER:
        return 3
    if _in(mod, MIDDLE):
        return 2
    if _in(mod, BOTTOM):
        return 1
    raise AssertionError(f"{mod} is in no layer: add it to tests/test_layering.py (and DESIGN.md's layout)")


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_dynamic_imports_are_declared():
    """Modules calling ``importlib.import_module`` on adapterkit submodules are modelled in ``DYNAMIC``."""
    calling = {
        mod
        for mod, (path, _) in MODULES.items()
        if "import_module(" in path.read_text(encoding="utf-8") and mod != "adapterkit.config"
    }  # config's import_module loads torch module types named in config files, not adapterkit modules
    assert calling == set(DYNAMIC)


def _known(mod: str, targets: set[str]) -> set[str]:
    """``targets`` without the upward imports of ``PENDING`` modules (reported by the layer test instead)."""
    return {t for t in targets if mod not in PENDING or _layer(t) <= _layer(mod)}


def test_no_cycles_in_module_level_imports():
    assert _cycles({m: _known(m, top) for m, (top, _) in IMPORTS.items()}) == []


def test_no_cycles_counting_function_local_imports():
    graph = {m: _known(m, top | local) for m, (top, local) in IMPORTS.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("layer", [1, 2])
def test_lower_layers_import_only_downward(layer):
    bad = {}
    for mod, (top, local) in IMPORTS.items():
        if _layer(mod) != layer:
            continue
        up = sorted(t for t in top | local if _layer(t) > layer)
        if up:
            bad[mod] = up
    pending = {m: v for m, v in bad.items() if m in PENDING}
    assert {m: v for m, v in bad.items() if m not in PENDING} == {}
    if layer == 2:  # an entry of PENDING that no longer imports upward must leave the list
        assert sorted(pending) == sorted(PENDING), "remove the fixed modules from PENDING"
