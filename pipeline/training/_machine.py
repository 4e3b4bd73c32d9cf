"""Size the work for the machine: CPU cores, intra-op threads, DataLoader workers, cache memory.

Rules (measured with the `trial` benchmark suite on a 2-core CPU machine, see reports/bench/trial.json):
- Intra-op threads: one per core this process may run on (`os.sched_getaffinity`), never more;
  torch's default counts the host's cores, which oversubscribes a process pinned to fewer.
- DataLoader workers only when they pay: a worker process competes with the intra-op threads
  for the same cores, so on the CPU a loader whose items are cheap (decoded images from the
  cache, cached features) runs in the main process. Features are tensors in memory: never workers.
- Cache memory: `cache.max_memory_mb`, or a quarter of the machine's RAM (psutil).
"""

from __future__ import annotations

import psutil
import torch

from pipeline.core import cpu_cores


def configure_threads() -> int:
    """Cap torch's intra-op threads at `cpu_cores()`; returns the thread count in force."""
    cores = cpu_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def cache_limit_bytes(max_memory_mb: int | None) -> int:
    """The cache cap in bytes: `max_memory_mb` MiB, or a quarter of physical RAM when None."""
    if max_memory_mb is None:
        return psutil.virtual_memory().total // 4
    return max_memory_mb * 2**20


def loader_workers(requested: int, device: torch.device, cheap_items: bool) -> int:
    """DataLoader worker processes for one loader.

    Args:
        requested: `data.num_workers` from the study file (the most that will be used).
        device: the training device.
        cheap_items: items need no decoding (decoded-image cache, cached features).

    Returns:
        0 on the CPU when items are cheap (workers would only take cores from the model);
        otherwise `requested`, capped at one less than the cores so the main process keeps one.
    """
    if cheap_items and device.type == "cpu":
        return 0
    return max(0, min(requested, cpu_cores() - 1)) if cpu_cores() > 1 else 0
