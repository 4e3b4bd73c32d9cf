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
- files: one `.npy` per entry under `<store folder>/cache/decoded/`, named by a digest of the
  absolute path, size, mtime (ns), working size, interpolation and `FORMAT_VERSION`. A resumed
  run, a second worker on the same machine, or a trial's DataLoader worker reads them instead of
  decoding again; a changed file gets a new name, so it is decoded again. Entries are written
  atomically (temporary file + `os.replace`); stale ones are never read and can be deleted any time.
When memory is full the rest are read from the files each epoch, and without a writable folder
they are decoded on the fly; one line says which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from pipeline.data import _splits as D
from pipeline.data import _imagefiles as IMG
from pipeline.data import _transforms as TX
from pipeline.core import DataError

FORMAT_VERSION = 1  # bump when load_rgb or the resizes change what an entry holds
SOURCE_SIDE = 4  # augmentation sources: short side at most SOURCE_SIDE x crop px
DISK_RESERVE = 512 * 2**20  # bytes left free on the store's disk before entries stop being written
log = logging.getLogger("sweep.cache")
_said: set[str] = set()


def notice(message: str) -> None:
    """Log `message` once per process (a fallback is stated once, not once per trial or batch)."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


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
    module notes).

    Counters (for benchmarks and tests): `decoded` files decoded by this process, `memory_hits`,
    `file_hits` (entries read from the folder). Returned tensors are shared: do not modify them.
    """

    def __init__(
        self, root: Path, pp: TX.Preprocess, budget: MemoryBudget, folder: Path | None, for_training: bool = False
    ):
        self.root, self.pp, self.budget = Path(root).resolve(), pp, budget
        self.folder = self._usable(folder)
        self.for_training = for_training
        self._resize = TX.working_size(pp)
        self._memory: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
        self.decoded = self.memory_hits = self.file_hits = 0

    def _usable(self, folder: Path | None) -> Path | None:
        if folder is None:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            notice(
                f"cache: cannot write decoded images under {folder} ({err.strerror or err}); "
                "images beyond cache.max_memory_mb are decoded on the fly"
            )
            return None
        return folder

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
            self._write(name, image)
        if self.budget.take(image.nbytes):
            self._memory[rel] = (stamp, image)
        else:
            where = f"read from {self.folder}" if self.folder else "decoded again"
            notice(
                f"cache: decoded images pass cache.max_memory_mb "
                f"({self.budget.limit / 2**20:.0f} MiB); the rest are {where} every epoch"
            )
        return image

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
        if self.folder is None:
            return None
        try:
            array = np.load(self.folder / name[:2] / name, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # absent (the usual miss) or unreadable: decode
            return None
        self.file_hits += 1
        return torch.from_numpy(array)

    def _write(self, name: str, image: torch.Tensor) -> None:
        if self.folder is None:
            return
        target = self.folder / name[:2] / name
        try:
            if shutil.disk_usage(self.folder).free < image.nbytes + DISK_RESERVE:
                notice(
                    f"cache: under {DISK_RESERVE // 2**20} MiB free on the disk of {self.folder}; "
                    "decoded images are no longer written there"
                )
                return
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.save(handle, image.numpy(), allow_pickle=False)
            os.replace(tmp, target)  # readers see a whole entry or none
        except OSError as err:
            notice(
                f"cache: cannot write decoded images under {self.folder} ({err.strerror or err}); "
                "images beyond cache.max_memory_mb are decoded on the fly"
            )
            self.folder = None

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
    root: Path, pp: TX.Preprocess, memory: MemoryBudget, folder: Path | None = None, for_training: bool = False
) -> DecodedImages:
    """The process-wide cache of `root` for `pp` (eval inputs, or augmentation sources when
    `for_training`), so every trial reuses it.

    Args:
        folder: where entries are written; default `default_folder()` at the time of the call.
    """
    folder = folder if folder is not None else default_folder()
    key = (str(Path(root).resolve()), pp.resize, pp.crop, pp.interpolation, str(folder), id(memory), for_training)
    if key not in _CACHES:
        _CACHES[key] = DecodedImages(root, pp, memory, folder, for_training)
    return _CACHES[key]


def totals() -> dict[str, int]:
    """`DecodedImages.stats()` summed over every cache of this process (benchmarks, reports)."""
    out: dict[str, int] = {}
    for cache in _CACHES.values():
        for key, value in cache.stats().items():
            out[key] = out.get(key, 0) + value
    return out


def clear() -> None:
    """Forget every in-memory cache and budget of this process (the files stay)."""
    for cache in _CACHES.values():
        for _, image in cache._memory.values():
            cache.budget.give(image.nbytes)
    _CACHES.clear()
    _BUDGETS.clear()
    _said.clear()


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
