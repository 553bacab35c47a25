"""The package's layers, one way: read every module's imports and check them.

    testing -> entry -> supervision -> roles -> app -> domain -> providers | store
    -> foundation

A module may import its own layer or a lower one, never a higher one, and
the module graph has no cycle. `import_module("daemon....")` string literals
count as imports. The supervisor's own modules import no application or
domain code (they receive it as hooks), except the alert records. And
tests/ and bench/ import nothing of each other (both use daemon.testing).
See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOT = REPO / "daemon"

# Layer of a module: the longest matching prefix wins.
LAYERS = {
    "daemon": "foundation",
    "daemon.store": "store",
    "daemon.providers": "providers",
    "daemon.domain": "domain",
    "daemon.app": "app",
    "daemon.roles": "roles",
    "daemon.supervision": "supervision",
    "daemon.cli": "entry",
    "daemon.commands": "entry",
    "daemon.demo": "entry",
    "daemon.status": "entry",
    "daemon.watch": "entry",
    "daemon.campaign_report": "entry",
    "daemon.__main__": "entry",
    # The end-to-end harness tests and benchmarks share; nothing imports it.
    "daemon.testing": "testing",
}
RANK = {
    "foundation": 0,
    "store": 1,
    "providers": 1,
    "domain": 2,
    "app": 3,
    "roles": 4,
    "supervision": 5,
    "entry": 6,
    "testing": 7,
}
# The supervisor's process code: no business logic (issue 14).
SUPERVISOR_MODULES = (
    "daemon.supervision.supervisor",
    "daemon.supervision.child",
    "daemon.supervision.zygote",
    "daemon.supervision.tree",
    "daemon.supervision.hooks",
    "daemon.supervision.role_alerts",
    "daemon.supervision.systemd",
    "daemon.supervision.states",
    "daemon.supervision.reload",
    "daemon.supervision.alerting",
    "daemon.supervision.status_requests",
    "daemon.supervision.jobs",
)
SUPERVISOR_MAY_IMPORT = ("daemon.domain.alerts",)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path = ROOT) -> dict[str, str]:
    return {module_name(p, root): p.read_text() for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, source: str, known: set[str], is_package: bool) -> set[str]:
    """The project modules `source` imports (any depth, lazy ones included)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The module itself if known, else its closest known parent package.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                add(full if full in known else module)
        elif isinstance(node, ast.Call):
            func = node.func
            called = getattr(func, "id", None) or getattr(func, "attr", None)
            if called == "import_module" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value)
    return {m for m in found if m.split(".")[0] == "daemon"}


def graph(modules: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    known = set(modules)
    return {
        name: imports_of(name, source, known, name in packages)
        for name, source in modules.items()
    }


def layer_of(module: str) -> str:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(
            best
        ):
            best = prefix
    return LAYERS[best]


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports against the rule: to a higher layer, or sideways between layers."""
    out = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = layer_of(source), layer_of(target)
            if a != b and RANK[b] >= RANK[a]:
                out.append(f"{source} ({a}) imports {target} ({b})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _project_graph() -> dict[str, set[str]]:
    modules = read_modules()
    packages = {
        module_name(p, ROOT) for p in ROOT.rglob("__init__.py") if p.parent != ROOT
    } | {"daemon"}
    return graph(modules, packages)


def test_no_import_against_the_layers():
    assert violations(_project_graph()) == []


def test_no_import_cycle():
    assert cycles(_project_graph()) == []


def test_every_module_has_a_layer():
    for module in _project_graph():
        assert layer_of(module) in RANK


def test_the_supervisor_imports_no_business_logic():
    edges = _project_graph()
    bad = [
        f"{source} imports {target}"
        for source in SUPERVISOR_MODULES
        for target in sorted(edges[source])
        if layer_of(target) in ("domain", "app") and target not in SUPERVISOR_MAY_IMPORT
    ]
    assert bad == []


# ------------------------------------------------------- the checker itself

# The import cycle before issue 14, in small: runtime (foundation) imports
# run_role from the CLI, which reaches the roles through import_module, and
# the supervisor imports the tasks to release leases.
BEFORE = {
    "daemon.runtime": "def standby():\n    from daemon.cli import run_role\n",
    "daemon.cli": (
        "import importlib\n"
        "from daemon import runtime\n"
        "def run(cfg):\n"
        "    importlib.import_module('daemon.roles.worker').main(cfg)\n"
    ),
    "daemon.roles.worker": "from daemon.runtime import Heartbeat\n",
    "daemon.supervision.supervisor": (
        "from daemon.app.tasks import Tasks\nfrom daemon import runtime\n"
    ),
    "daemon.app.tasks": "from daemon.domain import campaigns\n",
    "daemon.domain.campaigns": "from daemon.store.models import Message\n",
    "daemon.store.models": "",
}
PACKAGES = {"daemon", "daemon.roles", "daemon.app", "daemon.domain", "daemon.store"}


def test_checker_reads_import_module_strings_and_relative_imports():
    modules = {
        "daemon.cli": "import importlib\nimportlib.import_module('daemon.roles.web')\n",
        "daemon.roles.web": "from . import api\nfrom .api import x\n",
        "daemon.roles.web.api": "from daemon.domain import campaigns\n",
        "daemon.domain.campaigns": "",
    }
    edges = graph(modules, {"daemon.roles.web", "daemon.domain"})
    assert edges["daemon.cli"] == {"daemon.roles.web"}
    assert edges["daemon.roles.web"] == {"daemon.roles.web.api"}
    assert edges["daemon.roles.web.api"] == {"daemon.domain.campaigns"}


def test_checker_catches_the_cycle_of_before_issue_14():
    edges = graph(BEFORE, PACKAGES)
    assert cycles(edges) == [["daemon.cli", "daemon.roles.worker", "daemon.runtime"]]
    assert "daemon.runtime (foundation) imports daemon.cli (entry)" in violations(edges)


@pytest.mark.parametrize(
    "source, target, ok",
    [
        ("daemon.domain.campaigns", "daemon.store.models", True),
        ("daemon.store.models", "daemon.domain.campaigns", False),
        ("daemon.providers.meta", "daemon.store.models", False),  # sideways
        ("daemon.supervision.supervisor", "daemon.roles.leader", True),
        ("daemon.roles.worker", "daemon.supervision.child", False),
    ],
)
def test_checker_rule(source, target, ok):
    assert (violations({source: {target}}) == []) is ok


# ------------------------------------------------------- tests and bench


def top_level_imports(source: str) -> set[str]:
    """The first name of every module `source` imports (lazy ones included),
    `import_module("...")` strings too; relative imports are left out."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            func = node.func
            called = getattr(func, "id", None) or getattr(func, "attr", None)
            arg = node.args[0] if node.args else None
            if called == "import_module" and isinstance(arg, ast.Constant):
                found.add(str(arg.value).split(".")[0])
    return found


def crossing_imports(sources: dict[str, str]) -> list[str]:
    """Files of tests/ importing bench, or of bench/ importing tests."""
    other = {"tests": "bench", "bench": "tests"}
    return [
        f"{path} imports {other[path.split('/')[0]]}"
        for path, source in sorted(sources.items())
        if other[path.split("/")[0]] in top_level_imports(source)
    ]


def test_tests_and_bench_import_nothing_of_each_other():
    sources = {
        str(path.relative_to(REPO)): path.read_text()
        for folder in ("tests", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
    }
    assert crossing_imports(sources) == []


def test_checker_catches_tests_and_bench_importing_each_other():
    sources = {
        "tests/e2e/test_chaos.py": "from bench.chaos import run_scenario\n",
        "bench/chaos.py": "def f():\n    from tests.e2e import chaos_helpers\n",
        "bench/other.py": "import importlib\nimportlib.import_module('tests.x')\n",
        "tests/fine.py": "import daemon.testing\nfrom . import helpers\n",
    }
    assert crossing_imports(sources) == [
        "bench/chaos.py imports tests",
        "bench/other.py imports tests",
        "tests/e2e/test_chaos.py imports bench",
    ]
