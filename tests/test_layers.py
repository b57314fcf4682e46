"""The import graph of fedgen's own modules: no cycle, and every import looks down the layers.

Imports inside functions count. The top-level folders install under one namespace
(pyproject.toml's package-dir: clients/ is fedgen.clients, ...), so module names are computed
from that mapping, not from the folder names.
"""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Layers, lowest first: a module may import its own layer or a lower one, never a higher one.
CORE, AUDIT_LIBRARY, APPS, ENGINES, CLI = range(5)
ENGINE_MODULES = (
    "fedgen.simulations",
    "fedgen.server.deploy",
    "fedgen.server.superlink",
    "fedgen.server.flower_cli",
    "fedgen.clients.deploy",
)


def package_dirs() -> dict[str, Path]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in package_dirs().items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    for path in (ROOT / "fedgen").rglob("*.py"):  # fedgen's own subpackages (data, models, cli, ...)
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(module: str, path: Path) -> list[str]:
    names = []
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for module, path in known.items():
        targets = {resolve(name, known) for name in imported_names(module, path)}
        graph[module] = {t for t in targets if t and t != module and t.startswith("fedgen")}
    return graph


def layer(module: str) -> int:
    if module == "fedgen.cli" or module.startswith("fedgen.cli.") or module == "fedgen.__main__":
        return CLI
    if any(module == m or module.startswith(m + ".") for m in ENGINE_MODULES):
        return ENGINES
    if module.startswith(("fedgen.clients", "fedgen.server")):
        return APPS
    if module.startswith("fedgen.audits"):
        return AUDIT_LIBRARY
    return CORE


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_graph_sees_the_namespace_mapping():
    graph = import_graph()
    assert "fedgen.clients.app" in graph and "fedgen.server.train_app" in graph
    assert "fedgen.protocol" in graph["fedgen.clients.app"]  # an import the test must see


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_import_looks_down_the_layers():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_the_checker_catches_a_cycle_and_an_upward_import():
    graph = {"fedgen.a": {"fedgen.b"}, "fedgen.b": {"fedgen.a"}, "fedgen.c": set()}
    assert cycles(graph) == [["fedgen.a", "fedgen.b"]]
    assert layer("fedgen.manifest") < layer("fedgen.audits.report") < layer("fedgen.clients.app")
    assert layer("fedgen.clients.app") < layer("fedgen.simulations.engine") < layer("fedgen.cli.run")


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's package list works editable and breaks a real install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {module for module, path in modules().items() if path.stem == "__init__"}
    assert on_disk == listed
