"""A named lock per study, held in the study's own storage, so it works across machines.

`study_lock(storage, study, name)` serialises what must happen once per study however many workers
start together: the first start's bookkeeping (recording the split, making the parent run,
re-queuing dead trials) and the report stage.

The lock is a *study* named `<study>.lock.<name>` in the same storage. Creating a study is atomic in
every Optuna storage (the second `create_study` of a name raises `DuplicatedStudyError`: a unique
constraint in a database, the order of the log in a journal file, the database behind a gRPC
proxy), so whoever creates it holds the lock, whichever way each worker reaches the storage (a
PostgreSQL URL on one machine, `grpc://` on another: a database advisory lock would not be seen
through the proxy). The holder records a beat (host, pid, Unix seconds) in the lock study's user
attrs every `stale_after / 6` seconds and deletes the lock study on release.

A holder that dies leaves its lock study behind: once its beat is older than `stale_after` seconds
(compared with this host's clock: keep hosts' clocks within a few seconds, e.g. NTP), the next waiter
deletes it and takes the lock. Two waiters that judge the same lock stale in the same instant could
both take it; `stale_after` (default 60 s) well above the beat interval keeps that to dead holders.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage

from pipeline.core import TrackingError
from pipeline.distributed._recovery import host_name, keep_beating

BEAT_ATTR = "beat"


def lock_study_name(study_name: str, name: str) -> str:
    """Name of the study that is the lock `name` of study `study_name`."""
    return f"{study_name}.lock.{name}"


@contextlib.contextmanager
def study_lock(
    storage: BaseStorage,
    study_name: str,
    name: str,
    *,
    timeout: float = 3600.0,
    stale_after: float = 60.0,
    poll: float = 1.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the lock `name` of study `study_name` in `storage` while the block runs.

    Args:
        storage: the study's opened storage (`pipeline.distributed.open_storage`).
        study_name: the study the lock belongs to.
        name: what the lock guards, e.g. "start" or "report"; different names do not block each other.
        timeout: seconds to wait for the lock.
        stale_after: seconds without a beat after which the holder counts as dead.
        poll: seconds between looks at a held lock.
        on_wait: called once with one line naming the holder when another process holds the lock.

    Raises:
        TrackingError: the lock was not granted within `timeout` seconds (names the holder and how
            to remove a lock left behind).
    """
    lock = _acquire(storage, lock_study_name(study_name, name), timeout, stale_after, poll, on_wait)
    stop = threading.Event()
    beats = threading.Thread(target=_keep_beating, args=(lock, stop, stale_after / 6), daemon=True)
    beats.start()
    try:
        yield
    finally:
        stop.set()
        beats.join()
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=lock.study_name, storage=storage)


def holder(storage: BaseStorage, study_name: str, name: str) -> dict[str, object] | None:
    """The last beat of the lock's holder ({"host", "pid", "at"}), None when the lock is free or has
    no beat yet."""
    try:
        beat = optuna.load_study(study_name=lock_study_name(study_name, name), storage=storage).user_attrs
    except KeyError:
        return None
    found = beat.get(BEAT_ATTR)
    return found if isinstance(found, dict) else None


def _beat(lock: optuna.Study) -> None:
    lock.set_user_attr(BEAT_ATTR, {"host": host_name(), "pid": os.getpid(), "at": time.time()})


def _keep_beating(lock: optuna.Study, stop: threading.Event, interval: float) -> None:
    keep_beating(lambda: _beat(lock), stop, interval, f"lock {lock.study_name}")


def _acquire(
    storage: BaseStorage,
    lock_name: str,
    timeout: float,
    stale_after: float,
    poll: float,
    on_wait: Callable[[str], None] | None,
) -> optuna.Study:
    deadline = time.monotonic() + timeout
    first_seen: float | None = None  # when this waiter first saw the lock without a beat
    told = False
    while True:
        try:
            lock = optuna.create_study(study_name=lock_name, storage=storage)
            _beat(lock)
            return lock
        except DuplicatedStudyError:
            pass
        try:
            beat = optuna.load_study(study_name=lock_name, storage=storage).user_attrs.get(BEAT_ATTR)
        except KeyError:
            continue  # released between our two calls: try again at once
        now = time.monotonic()
        if beat is None:  # created an instant ago, or its holder died before its first beat
            first_seen = first_seen or now
            stale = now - first_seen > stale_after
        else:
            stale = time.time() - float(beat["at"]) > stale_after
        if stale:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=lock_name, storage=storage)
            continue
        if on_wait is not None and not told and beat is not None:
            on_wait(f"waiting for the lock '{lock_name}' held by {beat['host']} pid {beat['pid']}")
            told = True
        if now > deadline:
            held = f" (held by {beat['host']} pid {beat['pid']})" if beat else ""
            raise TrackingError(
                f"lock '{lock_name}'{held} not granted within {timeout:.0f} s; if no sweep holds it, "
                f"delete it: optuna delete-study --study-name '{lock_name}' --storage URL"
            )
        time.sleep(poll)
