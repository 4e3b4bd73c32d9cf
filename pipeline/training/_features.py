"""Frozen-prefix features: the frozen stages' output per image, computed once and reused.

A trial with `freeze_depth = k` runs its fixed prefix (pipeline/prefix.py) over the validation
images once, on the first epoch, and later epochs run only the trainable suffix on the stored
output; with `aug_strength = 0` the train inputs are fixed too and are cached the same way. Entries
are keyed by a digest of the prefix's tensors (so trials sharing weights and k share them), the
cut, the preprocessing, the split's file list and the numeric setup (device, AMP, layout), and
live in a per-process LRU bounded by the same `MemoryBudget` as the decoded images. An entry
that does not fit (after evicting entries no running trial uses) is not computed: that split
runs the prefix every epoch, and one line says so.

Features are stored as float32 on the CPU (under AMP the prefix output is exactly representable)
and are computed in file order with the eval transform, so values match recomputing them within
float rounding (batch composition can change the last bits of a convolution).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core import image_pass
from pipeline.data import CachedImageList, ImageList, MemoryBudget, notice
from pipeline.models import Split
from pipeline.training._train import autocast


def digest(modules: Iterable[nn.Module], extra: object = ()) -> str:
    """Hex digest of the modules' parameters and buffers (values, shapes, dtypes) plus `extra`."""
    h = hashlib.blake2b(repr(extra).encode(), digest_size=20)
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            t = t.detach().to("cpu").contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureStore:
    """Computed prefix outputs by key, least recently used evicted first, within a budget.

    `reserve` before use and `release` after: a reserved entry is never evicted.
    """

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._values: dict[str, torch.Tensor] = {}
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self.computed = 0  # entries computed by this process

    def reserve(self, key: str, nbytes: int) -> bool:
        """Hold room for `nbytes` under `key`; False when it cannot fit even after evictions."""
        with self._lock:
            if key not in self._sizes:
                if nbytes > self.budget.limit:
                    return False  # never fits: evicting others would only lose them
                while not self.budget.take(nbytes):
                    victim = next((k for k in self._sizes if not self._pins.get(k)), None)
                    if victim is None:
                        return False
                    self._drop(victim)
                self._sizes[key] = nbytes
            self._sizes.move_to_end(key)
            self._pins[key] = self._pins.get(key, 0) + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            self._pins[key] = max(0, self._pins.get(key, 0) - 1)

    def _drop(self, key: str) -> None:
        self.budget.give(self._sizes.pop(key))
        self._values.pop(key, None)
        self._pins.pop(key, None)

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The stored tensor of a reserved `key`, computed by `compute()` on first use."""
        value = self._values.get(key)
        if value is None:
            value = compute()
            self._values[key] = value
            self.computed += 1
        return value

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._values),
            "computed": self.computed,
            "bytes": sum(self._sizes[k] for k in self._values),
        }


_STORES: dict[int, FeatureStore] = {}


def shared_store(budget: MemoryBudget) -> FeatureStore:
    """The process-wide store drawing on `budget`."""
    return _STORES.setdefault(id(budget), FeatureStore(budget))


def clear() -> None:
    """Forget every store of this process."""
    for store in _STORES.values():
        for key in list(store._sizes):
            store._drop(key)
    _STORES.clear()


def compute(
    cut: Split, images: ImageList | CachedImageList, batch_size: int, device: torch.device, amp: bool = False
) -> torch.Tensor:
    """Run the prefix over every item of `images` (eval-transformed `(3, H, W)` float32, in order).

    Returns:
        `(N, *cut.feature_shape)` float32 on the CPU.
    """
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
    start = 0
    # Called lazily, possibly inside `evaluate`'s inference mode: these must be normal tensors
    # so that a trainable first suffix layer can save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        size = len(images)  # type: ignore[arg-type,unused-ignore]  # map-style datasets define __len__
        out = torch.empty((size, *cut.feature_shape), dtype=torch.float32)
        with image_pass("frozen features", size) as progress:
            for batch, _ in loader:
                with autocast(device, amp):
                    features = cut.prefix(batch.to(device))
                out[start : start + len(batch)] = features.float().cpu()
                start += len(batch)
                progress.advance(len(batch))
    return out


class FeatureList(Dataset):
    """(prefix output, label) of one split; the features are computed on first access, so the
    first epoch pays for them. Indexed in batches (`__getitems__`) for speed."""

    def __init__(self, store: FeatureStore, key: str, labels: list[int], compute_fn: Callable[[], torch.Tensor]):
        self.store, self.key, self.compute_fn = store, key, compute_fn
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.store.get(self.key, self.compute_fn)[index], self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.store.get(self.key, self.compute_fn)[i], int(self.labels[i])


def _batch(items: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return items  # `__getitems__` already returns the stacked batch


def feature_loader(dataset: FeatureList, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches in exactly the order `data.loader` gives the image dataset with the same
    `batch_size`, `shuffle` and `seed` (same sampler, same seeded generator)."""
    # torch types collate_fn as taking a list of samples; with `__getitems__` it gets the batch.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_batch,  # type: ignore[arg-type]  # torch types collate_fn over list[Any] only
    )


def nbytes(cut: Split, n: int) -> int:
    """Bytes of `n` images' float32 features."""
    per = 4
    for side in cut.feature_shape:
        per *= side
    return per * n


def too_big(split_name: str, size: int, budget: MemoryBudget) -> None:
    notice(
        f"cache: frozen-stage features of the {split_name} split ({size / 2**20:.0f} MiB) do not fit "
        f"cache.max_memory_mb ({budget.limit / 2**20:.0f} MiB); the frozen stages run every epoch "
        "for it (raise cache.max_memory_mb to cache them)"
    )
