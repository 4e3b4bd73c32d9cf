"""The code's shape: no private names of other libraries, modules of one job (~350 lines at most).

The one-way module graph itself is checked by import-linter (`make lint`, contracts in
pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PIPELINE = REPO / "pipeline"
MAX_LINES = 350
# Private names of Optuna/MLflow objects this code once reached into; flagged even if some
# pipeline class happened to define an attribute of the same name.
KNOWN_PRIVATE = {
    "_storage",
    "_trial_id",
    "_study_id",
    "_rng",
    "_cma_rng",
    "_random_sampler",
    "_independent_sampler",
    "_cached_frozen_trial",
    "_stop_flag",
}


# Public APIs that start with an underscore: namedtuple's (so it cannot clash with field names)
# and `os._exit` (exit without running finalisers).
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults", "_exit"}


def _is_private(name: str) -> bool:
    if name in NAMEDTUPLE_API:
        return False
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_private_names(trees: list[ast.Module]) -> set[str]:
    """Private names this package defines: functions, classes, assigned names and attributes."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if _is_private(n)}


def private_uses(tree: ast.Module, own: set[str], where: str) -> list[str]:
    """`where:line: text` for each use of another library's private name in `tree`:
    `obj._name` (not on self/cls, not a name this package defines), `getattr(obj, "_name")`,
    and imports of private modules or names (`from optuna.samplers._x import Y`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not on_self and (node.attr in KNOWN_PRIVATE or node.attr not in own):
                found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
        ):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                name = node.args[1].value
                if isinstance(name, str) and _is_private(name):
                    found.append(f"{where}:{node.lineno}: {node.func.id}(..., {name!r})")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "pipeline" and (
                any(_is_private(p) for p in parts) or any(_is_private(a.name) for a in node.names)
            ):
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_is_private(p) for p in alias.name.split(".")):
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
    return found


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(PIPELINE.glob("*.py"))}


def test_no_private_names_of_other_libraries():
    modules = _modules()
    own = _own_private_names(list(modules.values()))
    found = [hit for name, tree in modules.items() for hit in private_uses(tree, own, f"pipeline/{name}")]
    assert found == []


def test_the_check_finds_what_it_looks_for():
    code = (
        "from optuna.samplers._lazy_random_state import LazyRandomState\n"
        "def f(trial, sampler):\n"
        "    frozen = trial.study._storage.get_trial(trial._trial_id)\n"
        "    rng = getattr(sampler, '_random_sampler', None)\n"
        "    self._inner = sampler._helper\n"
    )
    hits = private_uses(ast.parse(code), own={"_inner"}, where="x.py")
    assert sorted(hits) == [
        "x.py:1: from optuna.samplers._lazy_random_state import ...",
        "x.py:3: ._storage",
        "x.py:3: ._trial_id",
        "x.py:4: getattr(..., '_random_sampler')",
        "x.py:5: ._helper",
    ]


@pytest.mark.parametrize("path", sorted(PIPELINE.glob("*.py")), ids=lambda p: p.name)
def test_modules_stay_small(path: Path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name}: {lines} lines; split it by job (at most {MAX_LINES})"
