"""The per-study lock held in the study's storage: one holder at a time, whatever the route to it."""

from __future__ import annotations

import threading
import time

import optuna
import pytest

from pipeline.core import TrackingError
from pipeline.distributed import open_storage, study_lock
from pipeline.distributed._studylock import BEAT_ATTR, holder, lock_study_name


@pytest.fixture(params=["sqlite", "journal"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return f"journal:///{tmp_path / 'optuna.journal'}"


def test_one_holder_at_a_time_and_nothing_left_behind(url):
    spans: list[tuple[float, float]] = []
    said: list[str] = []

    def work(index: int) -> None:
        storage = open_storage(url)  # each "worker" with its own connection to the storage
        with study_lock(storage, "tiny", "report", poll=0.05, on_wait=said.append):
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    spans.sort()
    assert len(spans) == 3
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    assert said and said[0].startswith("waiting for the lock 'tiny.lock.report' held by ")
    assert optuna.get_all_study_names(open_storage(url)) == [], "the lock study is deleted on release"


def test_other_names_do_not_block(url):
    storage = open_storage(url)
    with study_lock(storage, "tiny", "start"), study_lock(storage, "tiny", "report"):
        assert holder(storage, "tiny", "report")["pid"] > 0
        assert sorted(optuna.get_all_study_names(storage)) == ["tiny.lock.report", "tiny.lock.start"]
    assert holder(storage, "tiny", "report") is None


def test_a_dead_holders_lock_is_taken_after_stale_after(url):
    storage = open_storage(url)
    left = optuna.create_study(study_name=lock_study_name("tiny", "report"), storage=storage)
    left.set_user_attr(BEAT_ATTR, {"host": "gone", "pid": 1, "at": time.time() - 5})  # its last beat
    with study_lock(storage, "tiny", "report", stale_after=2, poll=0.05):
        assert holder(storage, "tiny", "report")["host"] != "gone"


def test_a_live_holder_makes_others_time_out_with_its_name(url):
    storage = open_storage(url)
    other = open_storage(url)
    with (
        study_lock(storage, "tiny", "report"),
        pytest.raises(TrackingError) as err,
        study_lock(other, "tiny", "report", timeout=0.3, poll=0.05),
    ):
        pass
    beat_holder = str(err.value).split(" (held by ", 1)[1].split(")", 1)[0]
    assert str(err.value) == (
        f"lock 'tiny.lock.report' (held by {beat_holder}) not granted within 0 s; if no sweep holds it, delete it: "
        "optuna delete-study --study-name 'tiny.lock.report' --storage URL"
    )
