"""Progress inside a long pass over images (a training epoch, a val pass, frozen features, the
linear probe's feature pass, the sealed test pass): the loops say how many images are done, and
whoever listens shows it (`sweep run` / `sweep report`: a live line in a terminal with images/s
and the time left). Nothing listens by default; a pass then costs one list check per batch.
Listeners are process-wide, as `logging` handlers are: a worker process has its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# (what, images done, images in the pass): called at 0, after each batch, and at the end
Listener = Callable[[str, int, int], None]
_listeners: list[Listener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every pass's progress to `listener` while inside."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class ImagePass:
    """One pass over `total` images named `what` ("train", "val", "test", "probe features"...)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self._tell()

    def advance(self, images: int) -> None:
        self.done = min(self.done + images, self.total)
        self._tell()

    def close(self) -> None:
        """The pass ended (also early, e.g. a trial stopped): listeners see it complete."""
        if self.done < self.total:
            self.done = self.total
            self._tell()

    def _tell(self) -> None:
        for listener in list(_listeners):
            listener(self.what, self.done, self.total)


@contextlib.contextmanager
def image_pass(what: str, total: int | None) -> Iterator[ImagePass]:
    """An `ImagePass` closed on exit; `total` None (a loader of unknown size) counts as 0."""
    step = ImagePass(what, total or 0)
    try:
        yield step
    finally:
        step.close()
