"""Decoded images, once per study: each file is decoded (and resized) once, not every epoch.

What is cached, as uint8 `(3, H, W)` tensors, per use:
- eval inputs (val, and train at aug_strength 0): `imagefiles.load_rgb(file)` resized by
  `transforms.working_size(preprocess)` (short side `preprocess.resize` px, aspect kept, PIL
  antialiased). Eval transforms then only centre-crop and normalise it: bit-identical to
  decoding on the fly.
- augmentation sources (train at aug_strength > 0): `imagefiles.load_rgb(file)` at the file's own
  resolution, its short side only brought down to `SOURCE_SIDE x crop` when larger (PIL
  antialiased). Random crops are then taken from the same pixels as on the fly: even the
  smallest RandomResizedCrop box (8 % of the area, 0.28 of the short side) keeps at least the
  crop's side in source pixels. (Crops from the working-size image instead lost 2 points of val
  accuracy on hymenoptera; the `augmentation` benchmark suite checks this every run.)

Two tiers:
- memory: a dict per process, shared by every trial of the study, bounded by one `MemoryBudget`
  (`cache.max_memory_mb`, shared with the frozen-feature cache);
- files (`_diskcache.DiskTier`): one `.npy` per entry under `<store folder>/cache/decoded/`, named
  by a digest of the absolute path, size, mtime (ns), working size, interpolation and
  `FORMAT_VERSION`, within `cache.max_disk_mb` (least recently used entries of earlier runs are
  evicted). A resumed run, a second worker on the same machine, or a trial's DataLoader worker
  reads them instead of decoding again; a changed file gets a new name, so it is decoded again.
  Entries are written atomically (temporary file + `os.replace`); stale ones are never read and
  can be deleted any time (`sweep cache --clear`).
When memory is full the rest are read from the files each epoch, and without a writable folder
(or past the disk budget) they are decoded on the fly; one line says which. DataLoader worker
processes use the file tier only: a memory tier there would be a copy per worker, outside the
budget, and gone when the worker ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from pipeline.data import _splits as D
from pipeline.data import _imagefiles as IMG
from pipeline.data import _transforms as TX
from pipeline.data import _diskcache as DC
from pipeline.data._notices import forget as _forget_notices
from pipeline.data._notices import notice
from pipeline.core import DataError

FORMAT_VERSION = 1  # bump when load_rgb or the resizes change what an entry holds
SOURCE_SIDE = 4  # augmentation sources: short side at most SOURCE_SIDE x crop px

class MemoryBudget:
    """Bytes of RAM the caches of this process may hold together (thread-safe counter)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes`; False (nothing reserved) when that would pass the limit."""
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "used": self.used}  # a spawned DataLoader worker gets its own lock

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])  # type: ignore[misc]
        self.used = state["used"]


_BUDGETS: dict[int, MemoryBudget] = {}


def budget(limit: int) -> MemoryBudget:
    """The process-wide budget for a cap of `limit` bytes (one per distinct cap)."""
    return _BUDGETS.setdefault(limit, MemoryBudget(limit))


def default_folder() -> Path:
    """`<store folder>/cache/decoded` (`pipeline.config.home()`: `$SWEEP_HOME` or `./mlruns`)."""
    from pipeline.config import home

    return home() / "cache" / "decoded"


class DecodedImages:
    """uint8 `(3, H, W)` images of the files under `root`, decoded at most once.

    `for_training=False`: eval inputs at the working size; True: augmentation sources (see the
    module notes). `folder`: the file tier's folder (None: memory only), within `max_disk_mb` MiB
    (None: `_diskcache.default_limit`).

    Counters (for benchmarks and tests): `decoded` files decoded by this process, `memory_hits`,
    `file_hits` (entries read from the folder). Returned tensors are shared: do not modify them.
    """

    def __init__(
        self,
        root: Path,
        pp: TX.Preprocess,
        budget: MemoryBudget,
        folder: Path | None,
        for_training: bool = False,
        max_disk_mb: int | None = None,
    ):
        self.root, self.pp, self.budget = Path(root).resolve(), pp, budget
        self.disk = DC.tier(folder, max_disk_mb) if folder is not None and max_disk_mb != 0 else None
        self.for_training = for_training
        self._resize = TX.working_size(pp)
        self._memory: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        self.decoded = self.memory_hits = self.file_hits = 0

    @property
    def folder(self) -> Path | None:
        """Where entries are written; None without a usable file tier."""
        return None if self.disk is None else self.disk.folder

    def entry_name(self, path: Path, stamp: tuple[int, int]) -> str:
        """Digest naming the entry of `path` with (size bytes, mtime ns) `stamp` at this working size."""
        size = ["source", SOURCE_SIDE * self.pp.crop] if self.for_training else ["working", self.pp.resize]
        record = [str(path), *stamp, *size, self.pp.interpolation, FORMAT_VERSION]
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:40] + ".npy"

    def get(self, rel: str) -> torch.Tensor:
        """The working-size uint8 `(3, H, W)` image of `root/rel`.

        Raises:
            DataError: the file is gone or cannot be decoded (mid-training).
        """
        path = self.root / rel
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"{path}: cannot be read mid-training ({err.strerror or err})") from None
        stamp = (st.st_size, st.st_mtime_ns)
        held = self._memory.get(rel)
        if held is not None:
            if held[0] == stamp:
                self.memory_hits += 1
                return held[1]
            del self._memory[rel]  # the file changed: its old pixels must not be used again
            self.budget.give(held[1].nbytes)
        name = self.entry_name(path, stamp)
        image = self._read(name)
        if image is None:
            image = self._decode(path)
            if self.disk is not None:
                self.disk.write(name, image.numpy())
        self._hold(rel, stamp, image)
        return image

    def _hold(self, rel: str, stamp: tuple[int, int], image: torch.Tensor) -> None:
        if get_worker_info() is not None:  # a DataLoader worker: file tier only (module notes)
            return
        if self.budget.take(image.nbytes):
            self._memory[rel] = (stamp, image)
        else:
            where = f"read from {self.folder}" if self.folder else "decoded again"
            notice(
                f"cache: decoded images pass cache.max_memory_mb "
                f"({self.budget.limit / 2**20:.0f} MiB); the rest are {where} every epoch"
            )

    def _decode(self, path: Path) -> torch.Tensor:
        try:
            image = IMG.load_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot be decoded mid-training ({err})") from None
        self.decoded += 1
        if not self.for_training:
            image = self._resize(image)
        elif min(image.size) > SOURCE_SIDE * self.pp.crop:
            side = SOURCE_SIDE * self.pp.crop
            image = TF.resize(image, side, interpolation=self._resize.interpolation, antialias=True)
        return TF.pil_to_tensor(image).contiguous()

    def _read(self, name: str) -> torch.Tensor | None:
        array = None if self.disk is None else self.disk.read(name)
        if array is None:
            return None
        self.file_hits += 1
        return torch.from_numpy(array)

    def stats(self) -> dict[str, int]:
        """Counters plus `memory_bytes` / `memory_entries` held by this cache."""
        return {
            "decoded": self.decoded,
            "memory_hits": self.memory_hits,
            "file_hits": self.file_hits,
            "memory_entries": len(self._memory),
            "memory_bytes": sum(t.nbytes for _, t in self._memory.values()),
        }


_CACHES: dict[tuple, DecodedImages] = {}


def shared(
    root: Path,
    pp: TX.Preprocess,
    memory: MemoryBudget,
    folder: Path | None = None,
    for_training: bool = False,
    max_disk_mb: int | None = None,
) -> DecodedImages:
    """The process-wide cache of `root` for `pp` (eval inputs, or augmentation sources when
    `for_training`), so every trial reuses it.

    Args:
        folder: where entries are written; default `default_folder()` at the time of the call.
        max_disk_mb: `cache.max_disk_mb` (None: `_diskcache.default_limit`).
    """
    folder = folder if folder is not None else default_folder()
    key = (str(Path(root).resolve()), pp.resize, pp.crop, pp.interpolation, str(folder), id(memory), for_training)
    if key not in _CACHES:
        _CACHES[key] = DecodedImages(root, pp, memory, folder, for_training, max_disk_mb)
    return _CACHES[key]


def totals() -> dict[str, int]:
    """`DecodedImages.stats()` summed over every cache of this process (benchmarks, reports)."""
    out: dict[str, int] = {}
    for cache in _CACHES.values():
        for key, value in cache.stats().items():
            out[key] = out.get(key, 0) + value
    return out


def clear() -> None:
    """Forget every in-memory cache, budget and disk tier of this process (the files stay)."""
    for cache in _CACHES.values():
        for _, image in cache._memory.values():
            cache.budget.give(image.nbytes)
    _CACHES.clear()
    _BUDGETS.clear()
    DC.forget()
    _forget_notices()


class CachedImageList(Dataset):
    """(image, label) pairs like `data.ImageList`, images taken from a `DecodedImages` cache.

    `transform` gets the cached uint8 `(3, H, W)` tensor: use `transforms.cached_eval_transform` or
    `transforms.cached_train_transform`.
    """

    def __init__(self, images: DecodedImages, samples: list[D.Sample], transform: TX.Transform) -> None:
        self.images, self.samples, self.transform = images, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        return self.transform(self.images.get(rel)), label
