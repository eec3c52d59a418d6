"""The layering rules of docs/architecture.md, checked on the code as it is.

Each rule imports in a fresh interpreter and reads ``sys.modules``, so what
a device process or the pure core really loads is what is checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedge", "clients", "strategies", "experiments")


def _loaded(modules: str) -> set[str]:
    code = f"import sys; import {modules}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(out.stdout.split())


def _offenders(loaded: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        {m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")}
    )


def test_the_core_imports_neither_flower_nor_mlflow_nor_torch() -> None:
    loaded = _loaded(
        "fedge.core.orchestrator, fedge.core.pool, fedge.core.clustering, fedge.core.triggers,"
        " fedge.core.records, fedge.core.state"
    )
    assert _offenders(loaded, ("flwr", "mlflow", "torch", "fedge.server", "fedge.tracking")) == []


def test_a_device_process_loads_only_device_code() -> None:
    loaded = _loaded("clients.client_app")
    forbidden = (
        "fedge.server",
        "fedge.core",
        "fedge.tracking",
        "fedge.scenarios",
        "fedge.deploy",
        "strategies",
        "experiments",
        "mlflow",
        "sklearn",
        "scipy",
        "pandas",
    )
    assert _offenders(loaded, forbidden) == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (also inside functions)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        # Imports for type checkers only never run.
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(filter(None, (resolve(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    found = resolve(f"{node.module}.{alias.name}") or resolve(node.module)
                    if found:
                        targets.add(found)
        targets.discard(name)
        # A package's own __init__ is not a dependency of its modules.
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other_even_inside_functions() -> None:
    assert _cycles(_import_graph()) == []


def test_devices_never_import_the_server_side_even_lazily() -> None:
    graph = _import_graph()
    device = {m for m in graph if m.startswith("clients")}
    allowed = ("clients", "fedge.contracts", "fedge.privacy.audit", "fedge.privacy.accounting",
               "fedge.privacy.secagg_protocol", "fedge.privacy", "fedge")
    wrong = {
        (m, t) for m in device for t in graph[m]
        if not any(t == a or t.startswith(a + ".") for a in allowed) or t == "fedge.privacy.report"
    }
    assert sorted(wrong) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_longer_than_a_reader_can_hold(package: str) -> None:
    long = {
        _module_name(p): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 650
    }
    assert long == {}
