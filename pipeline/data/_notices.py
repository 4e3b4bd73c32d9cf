"""One line per fallback and process: a cache that cannot do its job says so once, not once per
trial or batch."""

from __future__ import annotations

import logging

log = logging.getLogger("sweep.cache")
_said: set[str] = set()


def notice(message: str) -> None:
    """Log `message` (warning, logger `sweep.cache`) once per process."""
    if message not in _said:
        _said.add(message)
        log.warning(message)


def forget() -> None:
    """Allow every line to be said again (a new run in the same process, tests)."""
    _said.clear()
