"""Every module imports on its own (no import loops), and the core does not import frameworks."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gradroute

MODULES = sorted(m.name for m in pkgutil.walk_packages(gradroute.__path__, "gradroute.")
                 if not m.name.endswith("__main__"))
FRAMEWORKS = ("transformers", "peft", "trl", "sae_lens", "datasets", "accelerate")
CORE = ("gradroute.projection", "gradroute.subspace", "gradroute.model", "gradroute.orientation", "gradroute.router.attribution",
        "gradroute.plan", "gradroute.router", "gradroute.attribution", "gradroute.monitor", "gradroute.policy",
        "gradroute.interventions", "gradroute.anchoring")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_each_module_imports_alone():
    # one interpreter per module would take minutes; a fresh interpreter that imports each module
    # after clearing gradroute from sys.modules catches loops just the same
    code = (
        "import importlib, sys\n"
        f"mods = {MODULES!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'gradroute' or k.startswith('gradroute.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", res.stdout
    assert len(MODULES) > 20


def test_core_modules_do_not_import_frameworks():
    code = (
        "import sys\n"
        f"import {', '.join(CORE)}\n"
        f"print(sorted(k for k in {FRAMEWORKS!r} if k in sys.modules))\n"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


# ------------------------------------------------------------------ the import graph, read from the source
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

SRC = Path(gradroute.__file__).parent
#: what the core may not import (at module level or inside a function): the layers above it
UPPER = ("gradroute.integrations", "gradroute.experiments", "gradroute.cli", "gradroute.report",
         "gradroute.demo", "gradroute.claims", "gradroute.toyworld")
#: the only upward imports allowed, each a documented delegator kept for users' code:
#: (module, function) -> the upper module it imports
ALLOWED_UPWARD = {
    ("gradroute.router.core", "save_adapter"): "gradroute.integrations.peft",       # deprecated, removed in 0.3
    ("gradroute.router.core", "save_discarded"): "gradroute.integrations.discard",  # deprecated, removed in 0.3
    ("gradroute.router.core", "callback"): "gradroute.integrations.trainer",        # deprecated, removed in 0.3
    # Subspace.from_sae (DESIGN's public surface) reads SAEs with sae-lens, which only integrations may load
    ("gradroute.subspace.importers", "from_sae"): "gradroute.integrations.sae_lens",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = SRC.parent / Path(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, str | None, bool]]:
    """(imported gradroute module, enclosing function or None, at module level) for every import."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, str | None, bool]] = []

    def visit(node: ast.AST, func: str | None, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never executed
            if isinstance(child, ast.Import):
                out.extend((a.name, func, top) for a in child.names if a.name.startswith("gradroute"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if not target.startswith("gradroute"):
                    continue
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    out.append((sub if _is_module(sub) else target, func, top))
            visit(child, func, top)

    visit(tree, None, True)
    return out


def _core_files() -> list[Path]:
    core = []
    for name in CORE + ("gradroute.layers", "gradroute.errors", "gradroute.distributed", "gradroute._io",
                        "gradroute.probe"):
        p = SRC.parent / Path(*name.split("."))
        core += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return [p for p in core if p.is_file()]


def test_the_core_never_imports_the_layers_above_it():
    bad = []
    for path in _core_files():
        mod = _module_name(path)
        for target, func, _ in _imports(path):
            if target.startswith(UPPER) and ALLOWED_UPWARD.get((mod, func)) != target:
                bad.append(f"{mod} ({func or 'module level'}) imports {target}")
    assert not bad, "\n".join(bad)
    assert len(_core_files()) > 25


def test_experiments_are_built_on_the_library_never_the_reverse():
    bad = [f"{_module_name(p)} imports {t}" for p in SRC.rglob("*.py")
           if not _module_name(p).startswith(("gradroute.experiments", "gradroute.cli", "gradroute.demo",
                                              "gradroute.claims", "gradroute.toyworld"))
           for t, _, _ in _imports(p) if t.startswith("gradroute.experiments")]
    assert not bad, "\n".join(bad)


def test_no_import_loops_at_module_level():
    """What runs at import time forms no cycle between gradroute modules (a package's __init__
    importing its own submodules is the package, not a loop)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = _module_name(path)
        graph[mod] = {t for t, _, top in _imports(path) if top and t != mod}
    # importing a submodule runs its parent package first: an edge back into an ancestor package
    # that itself (transitively) imports the submodule is how loops show up
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(cycle)
            elif nxt in graph and state.get(nxt) is None:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            dfs(m, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
