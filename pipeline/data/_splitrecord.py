"""The split of a study, recorded once and read back by every worker and by the report.

Workers on different machines list their own data folders; a folder that differs (a file missing, an
extra one, an image that does not decode there) or a library that carves val differently would
give each worker another split. So the first worker records its split in the study (a study user
attr, `SPLITS_ATTR`, written under the study's start lock) and every later worker, and the report,
use that record: file lists and `class_to_idx` as recorded, with paths relative to the local
`data.root`. A worker whose folder holds other files than the record stops before training, naming
them (`adopt`).

The record is `Splits.to_json()` as a dict: `root` (of the first worker, informative), `class_to_idx`,
`test_source`, `counts`, `train`/`val`/`test` as `[path relative to root, class index]` pairs and
`skipped` (paths of unreadable images left out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data._splits import Splits
from pipeline.core import DataError

SPLITS_ATTR = "sweep_splits"  # study user attr holding the record
SHOWN = 10  # paths named per kind of difference


def to_record(splits: Splits) -> dict[str, Any]:
    """The JSON-ready record of `splits` (see the module doc)."""
    record: dict[str, Any] = json.loads(splits.to_json())
    return record


def from_record(record: dict[str, Any], root: str | Path) -> Splits:
    """The recorded split with this machine's `root`."""

    def samples(key: str) -> list[tuple[str, int]]:
        return [(str(path), int(index)) for path, index in record[key]]

    return Splits(
        root=Path(root),
        class_to_idx={str(k): int(v) for k, v in record["class_to_idx"].items()},
        train=samples("train"),
        val=samples("val"),
        test=samples("test"),
        test_source=str(record["test_source"]),
        skipped=[str(p) for p in record.get("skipped", [])],
    )


@dataclass(frozen=True)
class Differences:
    """Paths (relative to the data root) where a local folder differs from the record."""

    missing: list[str]  # recorded, not in this folder
    extra: list[str]  # in this folder, not recorded
    unreadable: list[str]  # recorded as usable images, unreadable here

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.unreadable)

    def describe(self) -> str:
        """'missing here: a, b; extra here: c (and 3 more)' for the kinds that occur."""
        parts = []
        for label, paths in (
            ("missing here", self.missing),
            ("extra here", self.extra),
            ("unreadable here", self.unreadable),
        ):
            if paths:
                more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
                parts.append(f"{label}: {', '.join(paths[:SHOWN])}{more}")
        return "; ".join(parts)


def differences(record: dict[str, Any], local: Splits) -> Differences:
    """Compare the files of the recorded split with those this machine found."""
    recorded = from_record(record, local.root)
    used_there = {p for p, _ in recorded.train + recorded.val + recorded.test}
    used_here = {p for p, _ in local.train + local.val + local.test}
    there, here = used_there | set(recorded.skipped), used_here | set(local.skipped)
    return Differences(
        missing=sorted(there - here), extra=sorted(here - there), unreadable=sorted(used_there & set(local.skipped))
    )


def adopt(record: dict[str, Any], local: Splits, study_name: str) -> Splits:
    """The recorded split, when this machine's folder holds exactly the recorded files.

    Args:
        record: the study's `SPLITS_ATTR`.
        local: the split this machine built from its own folder (pre-flight).
        study_name: named in the message.

    Returns:
        The recorded split (assignment to train/val/test and `class_to_idx` as recorded) rooted at
        `local.root`.

    Raises:
        DataError: the folder differs; names every differing path (up to `SHOWN` per kind).
    """
    diff = differences(record, local)
    if diff:
        count = len(diff.missing) + len(diff.extra) + len(diff.unreadable)
        raise DataError(
            f"{local.root}: differs from the split recorded for study '{study_name}' by its first worker "
            f"({count} file(s)): {diff.describe()}; make this data folder hold the same files as on the "
            "other machines, then start again"
        )
    return from_record(record, local.root)
