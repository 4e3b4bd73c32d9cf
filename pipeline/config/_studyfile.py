"""The study file as text: YAML reading with duplicate-key detection, `--set` overrides, and the
wording of validation errors (key path, reason, allowed values, and what YAML made of a word).

YAML 1.1 silently keeps the last of two equal keys and reads unquoted yes/no/on/off as booleans;
both are named here, with the line numbers or the word as written, instead of surfacing as a
wrong value later.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic_core import ErrorDetails

from pipeline.core import ConfigError

Words = dict[tuple[str, ...], str]  # key path -> an unquoted scalar YAML typed, as written


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`; users write both)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


_TYPED = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
}


def parse(text: str, path: Path) -> tuple[Any, dict[tuple[str, ...], str]]:
    """YAML text -> (tree, words): `words` maps the key path of every unquoted scalar that YAML
    read as a boolean or number to the word as written (`off`, `2024`), for error hints.

    Raises:
        ConfigError: a key appears twice in one mapping (YAML would keep the last silently).
        yaml.YAMLError: a syntax error.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        words: dict[tuple[str, ...], str] = {}
        duplicates: list[str] = []
        _walk(node, (), words, duplicates)
        if duplicates:
            if len(duplicates) == 1:
                raise ConfigError(f"{path}: {duplicates[0]}")
            raise ConfigError(f"{path}: {len(duplicates)} duplicate keys:\n  " + "\n  ".join(duplicates))
        return loader.construct_document(node), words
    finally:
        loader.dispose()


def _walk(node: yaml.Node, at: tuple[str, ...], words: dict, duplicates: list[str]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                duplicates.append(
                    f"{'.'.join((*at, key))}: duplicate key (lines {seen[key]} and {line}); "
                    "YAML would keep only the last one: merge them or delete one"
                )
            seen.setdefault(key, line)
            _walk(value, (*at, key), words, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*at, str(i)), words, duplicates)
    elif isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in _TYPED:
        words[at] = node.value


def where(err: yaml.MarkedYAMLError) -> str:
    """'line L, column C: problem' plus where the unfinished construct started, 1-based."""

    def at(mark: yaml.Mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    text = f"{at(err.problem_mark)}: {err.problem}" if err.problem_mark else f"unknown position: {err.problem}"
    if err.context and err.context_mark and err.context_mark.line != getattr(err.problem_mark, "line", None):
        text += f" ({err.context} at {at(err.context_mark)})"
    return text


def apply_override(tree: dict, item: str, path: Path, words: dict[tuple[str, ...], str]) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set training.epochs=3")
    parts = key.strip().split(".")
    try:
        value, new_words = parse(raw, path)
    except yaml.YAMLError:
        value, new_words = raw, {}
    except ConfigError as err:  # a duplicate key inside a {...} value
        raise ConfigError(f"--set {key.strip()}: {str(err).removeprefix(f'{path}: ')}") from None
    for old in [w for w in words if w[: len(parts)] == tuple(parts)]:
        del words[old]
    words.update({(*parts, *sub): word for sub, word in new_words.items()})
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


def error_key(error: ErrorDetails) -> tuple[str, ...]:
    """The study-file key path of a pydantic error, without the union tag pydantic inserts
    (search_space.lr.float.low -> search_space.lr.low)."""
    raw_loc = list(error["loc"])
    return tuple(
        str(p)
        for i, p in enumerate(raw_loc)
        if not (i == 2 and raw_loc[0] == "search_space" and p in ("float", "int", "categorical"))
    )


def override_behind(key: tuple[str, ...], overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last `--set` item whose key path is `key`, above it or below it; None if the study
    file alone set it."""
    for item in reversed(overrides):
        path = tuple(item.partition("=")[0].strip().split("."))
        if key[: len(path)] == path or path[: len(key)] == key:
            return item
    return None


def describe(error: ErrorDetails, words: Words, allowed_keys: Callable[[tuple], list[str]]) -> str:
    """One line for one pydantic error: `key.path: reason (got value)`."""
    raw_loc = list(error["loc"])
    loc = list(error_key(error))
    word = words.get(tuple(loc))
    if error["type"] == "sweep" and error["ctx"]["at"]:
        loc += error["ctx"]["at"].split(".")
    key = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(tuple(raw_loc[:-1]))
        close = difflib.get_close_matches(str(raw_loc[-1]), allowed, n=1)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        hint += f"; did you mean {close[0]}?" if close else ""
        return f"{key}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "expected a mapping (key: value lines)"
    if error["type"] == "union_tag_invalid":
        msg = "type must be one of float, int, categorical"
    if error["type"] == "union_tag_not_found":
        msg = "missing 'type' (one of float, int, categorical)"
    value = error.get("input")
    # Our own messages quote the bad string already ("unknown arch 'resnet19'"): no second copy.
    if "input" in error and not isinstance(value, dict) and not (isinstance(value, str) and repr(value) in msg):
        msg += f" (got {error['input']!r}{_read_as(word, value, error['type'])})"
    return f"{key}: {msg}"


def _read_as(word: str | None, value: Any, kind: str) -> str:
    """'; YAML read the unquoted off as a boolean ...' when a YAML 1.1 boolean or number landed
    where it does not belong (YAML 1.1 reads yes/no/on/off as booleans)."""
    if isinstance(value, str) and kind in ("int_type", "float_type", "bool_type"):
        try:
            typed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            typed = None
        if isinstance(typed, (bool, int, float)):
            return ": quoted, it is text; remove the quotes"
    if word is None or not isinstance(value, (bool, int, float)):
        return ""
    what = "a boolean" if isinstance(value, bool) else "a number"
    if kind in ("string_type", "literal_error", "string_pattern_mismatch"):
        return f": YAML read the unquoted {word} as {what}; write it in quotes ('{word}') for the text"
    if isinstance(value, bool):
        return f": YAML read the unquoted {word} as {what}"
    return ""
