"""The lines docs/architecture.md draws between the parts, checked on every import.

Every `import` and `from ... import` in a module counts, also inside functions: a
late import crosses a line as surely as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers", "schedules", "sdk/leasehold_client")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "sdk"]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from app import ledger` imports the module app.ledger.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            graph[_module(path)] = _imports(path)
    return graph


GRAPH = _graph()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# (who, what it may never import, why)
RULES: list[tuple[str, tuple[str, ...], str]] = [
    (
        "app.ledger",
        ("app.api", "app.queue", "workers", "schedules", "fastapi", "starlette", "celery"),
        "the ledger changes state and knows no HTTP and no queue: callers enqueue after commit",
    ),
    (
        "app.authority",
        ("app.api", "app.ledger", "app.queue", "app.core.db", "workers", "schedules", "fastapi"),
        "policy, scope and identity decisions are pure: the ledger's callers consult them",
    ),
    (
        "app.issuers",
        ("app.api", "app.ledger", "app.queue", "app.core.db", "workers", "schedules", "fastapi"),
        "issuers talk to their backend only; the ledger records what they did",
    ),
    (
        "app.core",
        (
            "app.api",
            "app.ledger",
            "app.queue",
            "app.issuers",
            "app.proxy",
            "app.authority",
            "app.observability",
            "app.local",
            "workers",
            "schedules",
        ),
        "the core (settings, database, tables, logs, sealing) depends on nothing above it",
    ),
    (
        "leasehold_client",
        ("app", "workers", "schedules", "fastapi", "sqlmodel", "sqlalchemy"),
        "the client is a separate distribution that talks HTTP only",
    ),
    (
        "app.proxy",
        ("app.api", "app.queue", "workers", "schedules"),
        "the proxy reads state and writes only audit entries: it enqueues nothing",
    ),
    ("workers", ("app.api", "fastapi", "starlette"), "workers are not the API"),
    ("schedules", ("app.api", "fastapi", "starlette"), "the scheduler is not the API"),
]

# app/ never reaches into workers/ or schedules/ (it enqueues by name through app.queue),
# except the entry points that run them: the CLI, and POST /v1/sweeps, which runs the
# reconciliation in the API process.
ENTRY_POINTS = {"app.cli", "app.api.sweeps"}


@pytest.mark.parametrize(("who", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_no_import_crosses_a_line(who: str, forbidden: tuple[str, ...], why: str) -> None:
    modules = [m for m in GRAPH if _under(m, who)]
    assert modules, f"no module {who}: the rule names a part that does not exist"
    crossings = sorted(
        f"{module} imports {name}"
        for module in modules
        for name in GRAPH[module]
        if any(_under(name, f) for f in forbidden)
    )
    assert not crossings, f"{why}:\n" + "\n".join(crossings)


def test_app_enqueues_by_name_and_never_imports_workers_or_schedules() -> None:
    crossings = sorted(
        f"{module} imports {name}"
        for module, names in GRAPH.items()
        if _under(module, "app") and module not in ENTRY_POINTS
        for name in names
        if _under(name, "workers") or _under(name, "schedules")
    )
    assert not crossings, "\n".join(crossings)


def test_the_rules_see_real_imports() -> None:
    """The scan itself: a known import is found, a late import too."""
    assert "app.ledger" in GRAPH["workers.mint"]
    assert "schedules.reconcile" in GRAPH["app.api.sweeps"]  # inside a function
