"""The code's shape: no private names of other libraries, subpackages entered through their
`__init__`, functions of one job (about 60 lines of code at most).

The one-way subpackage graph itself is checked by import-linter (`make lint`, contracts in
pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PIPELINE = REPO / "pipeline"
MAX_CODE_LINES = 60  # per function: lines that are not blank, comments or the docstring
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


SOURCES = sorted(PIPELINE.rglob("*.py"))


def _where(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _modules() -> dict[str, ast.Module]:
    return {_where(p): ast.parse(p.read_text(), str(p)) for p in SOURCES}


def test_no_private_names_of_other_libraries():
    modules = _modules()
    own = _own_private_names(list(modules.values()))
    found = [hit for name, tree in modules.items() for hit in private_uses(tree, own, name)]
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


def foreign_private_imports(tree: ast.Module, own_subpackage: str, where: str) -> list[str]:
    """`where:line: module` for each import of another subpackage's private module
    (`pipeline.search._tune`, `from pipeline.search import _tune`): callers go through the
    subpackage's `__init__`, its public surface."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "pipeline" or len(parts) < 2 or parts[1] == own_subpackage:
                continue
            names = [a.name for a in node.names] if len(parts) == 2 else []
            if any(_is_private(p) for p in parts[2:]) or any(_is_private(n) for n in names):
                found.append(f"{where}:{node.lineno}: {node.module}")
    return found


def test_subpackages_are_entered_through_their_init():
    found = []
    for path in SOURCES:
        parts = path.relative_to(PIPELINE).parts
        own = parts[0] if len(parts) > 1 else ""
        found += foreign_private_imports(ast.parse(path.read_text()), own, _where(path))
    assert found == []


def test_the_init_check_finds_what_it_looks_for():
    code = (
        "from pipeline.search._tune import open_study\n"
        "from pipeline.search import _tune as tune\n"
        "from pipeline.search import open_study\n"
        "from pipeline.report._markdown import table\n"
    )
    hits = foreign_private_imports(ast.parse(code), own_subpackage="report", where="x.py")
    assert hits == ["x.py:1: pipeline.search._tune", "x.py:2: pipeline.search"]


def code_lines(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of `node` (a function, nested functions included) that are not blank, comment-only
    or its docstring."""
    docstring: set[int] = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    return sum(
        1
        for number, line in enumerate(lines, start=node.lineno)
        if line.strip() and not line.strip().startswith("#") and number not in docstring
    )


def long_functions(source: str, where: str, limit: int = MAX_CODE_LINES) -> list[str]:
    """`where:line: name (N lines of code)` for each function longer than `limit`."""
    tree = ast.parse(source)
    return [
        f"{where}:{node.lineno}: {node.name} ({code_lines(source, node)} lines of code)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(source, node) > limit
    ]


def test_the_length_check_counts_code_not_docstrings_or_comments():
    source = 'def f():\n    """Doc\n    more doc."""\n    # why\n\n    a = 1\n    return a\n'
    assert long_functions(source, "x.py", limit=3) == []
    assert long_functions(source, "x.py", limit=2) == ["x.py:1: f (3 lines of code)"]


@pytest.mark.parametrize("path", SOURCES, ids=_where)
def test_functions_stay_short(path: Path):
    found = long_functions(path.read_text(), _where(path))
    assert found == [], f"split by job (at most {MAX_CODE_LINES} lines of code a function): {found}"


def bare_attr_keys(tree: ast.Module, where: str) -> list[str]:
    """`where:line: 'key'` for each trial/study user attr read or written with a string literal key
    (`user_attrs.get("k")`, `user_attrs["k"]`, `set_user_attr("k", ...)`): keys are named once, as
    constants beside their reading (`pipeline.search.TrialRecord`, the distributed and tracking ones)."""
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            owner = node.func.value
            reads = node.func.attr == "get" and isinstance(owner, ast.Attribute) and owner.attr == "user_attrs"
            if reads or node.func.attr == "set_user_attr":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
            key = node.slice if node.value.attr == "user_attrs" else None
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.append(f"{where}:{node.lineno}: {key.value!r}")
    return found


def test_user_attr_keys_are_named_once():
    found = [hit for path in SOURCES for hit in bare_attr_keys(ast.parse(path.read_text()), _where(path))]
    assert found == []


def test_the_attr_key_check_finds_what_it_looks_for():
    code = (
        'a = trial.user_attrs.get("seconds")\n'
        'b = trial.user_attrs["best_epoch"]\n'
        'trial.set_user_attr("fail_reason", "x")\n'
        "c = trial.user_attrs.get(SECONDS_ATTR)\n"
        'd = params.get("lr")\n'
    )
    assert bare_attr_keys(ast.parse(code), "x.py") == [
        "x.py:1: 'seconds'",
        "x.py:2: 'best_epoch'",
        "x.py:3: 'fail_reason'",
    ]
