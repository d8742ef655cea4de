"""The package's shape: subpackages in data-flow order, each importing only from the steps
before it, no import circle, no module a newcomer has to fear, and a wheel that ships
every subpackage. See ARCHITECTURE.md."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pytest_sae_transfer"

#: The data flow, as import ranks: a module may import from its own step and earlier ones.
RANK = {
    "errors": 0, "config": 1, "zoo": 1, "loading": 2, "metrics": 3, "report": 4, "engine": 5,
    "thresholds": 6, "session": 7, "render": 7, "state": 8, "gate": 9, "assertions": 9, "plugin": 10,
    "__init__": 11,
}
MAX_MODULE_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "zoo/data" in path.as_posix():
            continue
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in the file but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(sub) for sub in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def step(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle() -> None:
    mods = modules()
    graph = {name: imported(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, [name]):
            break
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_each_step_imports_only_from_the_steps_before_it() -> None:
    mods = modules()
    bad = []
    for name, path in mods.items():
        here = step(name)
        assert here in RANK, f"{name}: a new top-level step; give it a rank here and a paragraph in ARCHITECTURE.md"
        for target in imported(name, path, set(mods)):
            there = step(target)
            if there != here and RANK[there] >= RANK[here]:
                bad.append(f"{name} imports {target} ({there} is not before {here})")
    assert not bad, "\n".join(bad)


def test_no_module_over_the_size_limit() -> None:
    big = {name: n for name, path in modules().items() if (n := path.read_text(encoding="utf-8").count("\n")) > MAX_MODULE_LINES}
    assert not big, big


def test_every_module_imports() -> None:
    """In one fresh interpreter, every module, deepest steps first (a late import of an early
    module is where a hidden circle would show)."""
    names = sorted(modules(), key=lambda n: -RANK[step(n)])
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_wheel_ships_every_subpackage() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    present = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert present <= listed, sorted(present - listed)
    assert "pytest_sae_transfer.profiles" in listed


@pytest.mark.parametrize("name", ["pytest_sae_transfer.plugin", "pytest_sae_transfer.state", "pytest_sae_transfer.gate"])
def test_the_plugin_imports_no_torch(name: str) -> None:
    code = f"import sys, {name}; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_public_api_names_resolve() -> None:
    import pytest_sae_transfer

    for name in pytest_sae_transfer.__all__:
        assert getattr(pytest_sae_transfer, name) is not None
    engine = importlib.import_module("pytest_sae_transfer.engine")
    for name in ("run_transfer", "run_transfer_many", "evaluate_transfer", "EngineOptions"):
        assert callable(getattr(engine, name))
