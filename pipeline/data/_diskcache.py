"""The decoded-image cache's file tier: one `.npy` per entry, within a disk budget.

Entries live under `<folder>/<2 hex>/<40 hex>.npy` (the name is a digest, see `_imagecache`).
Each entry's mtime is its last use: written, or read by any process (reads touch the file), so
least recently used is oldest mtime, and studies that share the folder share one order.

The budget (`cache.max_disk_mb`, default `default_limit`) is kept without thrashing: when an entry
does not fit, entries that no run used since this process opened the tier are deleted, least
recently used first; entries this run uses are never deleted for it. When nothing more can be
freed, new entries are no longer written (one line says so) and the images beyond the memory tier
are decoded again each epoch, which is what the cache does without a folder.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data._notices import notice

DEFAULT_CAP = 10 * 2**30  # bytes: the default budget's ceiling (10 GiB)
DISK_RESERVE = 512 * 2**20  # bytes always left free on the disk, whatever the budget says
STALE_TMP = 3600.0  # seconds after which a leftover `.tmp` of a killed writer is removed
EVICT_TO = 0.9  # an eviction frees down to this fraction of the budget, so it runs rarely


@dataclass(frozen=True)
class Usage:
    """What a cache folder holds: `entries` files, `bytes` on disk, and the last use (POSIX
    seconds) of the most (`newest`) and least (`oldest`) recently used entry (0.0 when empty)."""

    folder: Path
    entries: int
    bytes: int
    oldest: float
    newest: float


def _entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every entry; leftover temporary files older than STALE_TMP go."""
    found: list[tuple[float, int, Path]] = []
    now = time.time()
    try:
        shards = [d for d in os.scandir(folder) if d.is_dir(follow_symlinks=False)]
    except OSError:
        return found
    for shard in shards:
        try:
            files = list(os.scandir(shard.path))
        except OSError:
            continue
        for f in files:
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:  # removed by another process meanwhile
                continue
            if f.name.endswith(".npy"):
                found.append((st.st_mtime, st.st_size, Path(f.path)))
            elif f.name.endswith(".tmp") and now - st.st_mtime > STALE_TMP:
                _remove(Path(f.path))
    return found


def _remove(path: Path) -> int:
    """Delete `path`; its size in bytes, 0 when it was already gone."""
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return 0
    return size


def usage(folder: Path) -> Usage:
    """What `folder` holds (an absent folder holds nothing)."""
    found = _entries(folder)
    times = [t for t, _, _ in found]
    return Usage(folder, len(found), sum(s for _, s, _ in found), min(times, default=0.0), max(times, default=0.0))


def clear(folder: Path, unused_for: float | None = None) -> Usage:
    """Delete the entries of `folder` (all, or those not used for `unused_for` seconds).

    A run using the folder meanwhile only decodes those images again. Returns what was deleted.
    """
    cutoff = None if unused_for is None else time.time() - unused_for
    gone = [(t, s, p) for t, s, p in _entries(folder) if cutoff is None or t < cutoff]
    freed = sum(_remove(p) for _, _, p in gone)
    times = [t for t, _, _ in gone]
    return Usage(folder, len(gone), freed, min(times, default=0.0), max(times, default=0.0))


def _existing(folder: Path) -> Path:
    """`folder` or its nearest existing parent (for disk usage before the folder exists)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def default_limit(folder: Path, held: int = 0) -> int:
    """The budget when `cache.max_disk_mb` is null, in bytes: a quarter of what the cache could
    have (the disk's free space plus the `held` bytes it already uses), at most DEFAULT_CAP."""
    free = shutil.disk_usage(_existing(folder)).free
    return min(DEFAULT_CAP, (free + held) // 4)


def limit_bytes(max_disk_mb: int | None, folder: Path, held: int = 0) -> int:
    """`cache.max_disk_mb` in bytes, or `default_limit` when it is None."""
    return default_limit(folder, held) if max_disk_mb is None else max_disk_mb * 2**20


class DiskTier:
    """Entries of one folder for this process: `read`, `write`, and the bytes used (`used`).

    `max_disk_mb` None: `default_limit`. A folder that cannot be created leaves the tier off
    (`folder` None), with one line saying so.
    """

    def __init__(self, folder: Path, max_disk_mb: int | None = None):
        self.started = time.time()
        self.folder: Path | None = self._usable(Path(folder))
        self.used = usage(self.folder).bytes if self.folder else 0
        self.limit = limit_bytes(max_disk_mb, Path(folder), self.used)
        self.full = False
        self.evicted = 0  # entries this process deleted to stay within the budget
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # a spawned DataLoader worker gets its own lock
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _usable(folder: Path) -> Path | None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            notice(
                f"cache: cannot write decoded images under {folder} ({err.strerror or err}); "
                "images beyond cache.max_memory_mb are decoded on the fly"
            )
            return None
        return folder

    def path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name[:2] / name

    def read(self, name: str) -> np.ndarray | None:
        """The entry's array, touched as used now; None when absent or unreadable."""
        target = self.path(name)
        if target is None:
            return None
        try:
            array = np.load(target, allow_pickle=False)
            os.utime(target)
        except (OSError, ValueError, EOFError):  # absent (the usual miss) or unreadable: decode
            return None
        return array

    def write(self, name: str, array: np.ndarray) -> None:
        """Store `array` under `name` (atomically: readers see a whole entry or none), when the
        budget and the disk allow; otherwise nothing is written and one line says why."""
        target = self.path(name)
        if target is None or self.full:
            return
        size = array.nbytes + 128  # the .npy header
        with self._lock:
            if self.used + size > self.limit and not self._make_room(size):
                self.full = True
                notice(
                    f"cache: {self.folder} is at cache.max_disk_mb ({self.limit / 2**20:.0f} MiB) with "
                    "entries this run uses; images not yet written there are decoded again every epoch "
                    "beyond cache.max_memory_mb (raise cache.max_disk_mb, or `sweep cache --clear`)"
                )
                return
            self.used += size
        self._store(target, name, array)

    def _make_room(self, size: int) -> bool:
        """Evict entries unused since this tier opened, least recently used first, until `size`
        more bytes fit under EVICT_TO of the budget. False when they cannot fit in the budget."""
        assert self.folder is not None
        found = sorted(_entries(self.folder))
        self.used = sum(s for _, s, _ in found)  # other processes write here too
        goal = int(self.limit * EVICT_TO)
        for last_use, _, path in found:
            if self.used + size <= goal or last_use >= self.started:
                break
            self.used -= _remove(path)
            self.evicted += 1
        return self.used + size <= self.limit

    def _store(self, target: Path, name: str, array: np.ndarray) -> None:
        assert self.folder is not None
        try:
            if shutil.disk_usage(self.folder).free < array.nbytes + DISK_RESERVE:
                notice(
                    f"cache: under {DISK_RESERVE // 2**20} MiB free on the disk of {self.folder}; "
                    "decoded images are no longer written there"
                )
                self.full = True
                return
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            os.replace(tmp, target)
        except OSError as err:
            notice(
                f"cache: cannot write decoded images under {self.folder} ({err.strerror or err}); "
                "images beyond cache.max_memory_mb are decoded on the fly"
            )
            self.folder = None


_TIERS: dict[tuple[str, int | None], DiskTier] = {}


def tier(folder: Path, max_disk_mb: int | None = None) -> DiskTier:
    """The process-wide tier of `folder` under that budget (one scan of the folder per process)."""
    key = (str(Path(folder).resolve()), max_disk_mb)
    if key not in _TIERS:
        _TIERS[key] = DiskTier(folder, max_disk_mb)
    return _TIERS[key]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def summary(folder: Path, max_disk_mb: int | None = None) -> str:
    """One line on what `folder` holds against its budget (`sweep cache`, the end of `sweep run`)."""
    held = usage(folder)
    if max_disk_mb == 0:
        budget = "cache.max_disk_mb 0: not written"
    elif max_disk_mb is None:
        budget = f"budget {limit_bytes(None, folder, held.bytes) / 2**20:.0f} MiB, the default"
    else:
        budget = f"budget {max_disk_mb} MiB, cache.max_disk_mb"
    used = f"{held.entries} decoded image(s), {held.bytes / 2**20:.1f} MiB"
    if held.entries:
        used += f", used {_when(held.oldest)} .. {_when(held.newest)}"
    return f"cache {folder.resolve()}: {used} ({budget}; `sweep cache --clear` frees it)"


def forget() -> None:
    """Drop this process's tiers (the files stay)."""
    _TIERS.clear()
