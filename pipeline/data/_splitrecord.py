"""The split of a study, recorded once and read back by every worker and by the report.

Workers on different machines list their own data folders; a folder that differs (a file missing, an
extra one, an image that does not decode there) or a library that carves val differently would
give each worker another split. So the first worker records its split in the study (written under
the study's start lock) and every later worker, and the report, use that record: file lists and
`class_to_idx` as recorded, with paths relative to the local `data.root`. A worker whose folder
holds other files than the record stops before training, naming them (`adopt`).

The record is `Splits.to_json()` as a dict: `root` (of the first worker, informative), `class_to_idx`,
`test_source`, `counts`, `train`/`val`/`test` as `[path relative to root, class index]` pairs and
`skipped` (paths of unreadable images left out).

How it is stored: every file path in one user attr grew the study's attrs by megabytes at 100k
files, fetched by every reader of the study and passed through the gRPC storage proxy, whose
messages are capped (4 MiB by default). So the record is compressed (LZMA of its compact JSON:
100k generated ImageFolder paths, 3.6 MB, become 40 kB; zlib gave 5x, bz2 18x) and split into
`CHUNK_CHARS`-character base64 chunks, one user attr each (`sweep_splits_chunk:<digest>:<i>`);
`SPLITS_ATTR` holds only the header: the format, the sha256 digest of the record's JSON (checked
on every read), the chunk count and the counts per split. Chunks are written before the header,
so a reader that sees the header sees every chunk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import lzma
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data._splits import Splits
from pipeline.core import DataError

SPLITS_ATTR = "sweep_splits"  # study user attr holding the record's header
CHUNK_PREFIX = "sweep_splits_chunk"  # f"{CHUNK_PREFIX}:{digest[:16]}:{i}": one chunk of the record
CHUNK_CHARS = 512 * 1024  # base64 characters per chunk attr (each well under a gRPC message)
FORMAT = 2  # 1: the whole record as the attr's value
SHOWN = 10  # paths named per kind of difference


def to_record(splits: Splits) -> dict[str, Any]:
    """The JSON-ready record of `splits` (see the module doc)."""
    record: dict[str, Any] = json.loads(splits.to_json())
    return record


def _payload(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def chunk_key(digest: str, index: int) -> str:
    """The user attr holding chunk `index` of the record with sha256 `digest`."""
    return f"{CHUNK_PREFIX}:{digest[:16]}:{index}"


def store_record(record: Mapping[str, Any], set_attr: Callable[[str, Any], None]) -> dict[str, Any]:
    """Write `record` through `set_attr` (`optuna.Study.set_user_attr`): its chunks, then the header.

    Returns:
        The header written as `SPLITS_ATTR`: format, digest (sha256 hex of the record's compact
        JSON), chunks, stored_bytes (base64 characters over all chunks), counts.
    """
    payload = _payload(record)
    digest = hashlib.sha256(payload).hexdigest()
    text = base64.b64encode(lzma.compress(payload)).decode("ascii")
    chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    for i, chunk in enumerate(chunks):
        set_attr(chunk_key(digest, i), chunk)
    header = {
        "format": FORMAT,
        "digest": digest,
        "chunks": len(chunks),
        "stored_bytes": len(text),
        "counts": record.get("counts"),
    }
    set_attr(SPLITS_ATTR, header)
    return header


def load_record(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record stored in a study's user `attrs` (`store_record`, or a format-1 whole record);
    None when the study has none yet.

    Raises:
        DataError: a chunk is missing or the chunks do not match the header's digest (a store
            edited or cut short by hand); names what to do.
    """
    header = attrs.get(SPLITS_ATTR)
    if header is None or header.get("format") != FORMAT:
        return header  # none yet, or a format-1 record: the record itself
    digest = header["digest"]
    keys = [chunk_key(digest, i) for i in range(header["chunks"])]
    absent = [k for k in keys if k not in attrs]
    payload = b""
    if not absent:
        payload = lzma.decompress(base64.b64decode("".join(attrs[k] for k in keys)))
    if absent or hashlib.sha256(payload).hexdigest() != digest:
        raise DataError(
            f"study user attr '{SPLITS_ATTR}': the recorded split (digest {digest[:16]}) is "
            f"{'missing chunk(s) ' + ', '.join(absent) if absent else 'corrupt'}; record it again with "
            "`sweep run --accept-changes`"
        )
    record: dict[str, Any] = json.loads(payload)
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
