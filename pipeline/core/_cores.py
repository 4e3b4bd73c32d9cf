"""How many cores this process may use: what thread pools and loaders are sized by."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS): all logical cores
        return max(1, os.cpu_count() or 1)
