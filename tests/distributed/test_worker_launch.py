"""`--workers N` on one machine: thread/GPU shares, the SQLite refusal, launching and signal forwarding."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import pipeline
import pipeline.core
from pipeline.core import ConfigError, TrackingError
from pipeline.distributed import check_storage_for_workers, exit_code, launch_workers
from pipeline.distributed._workers import worker_env, worker_threads

ROOT = str(Path(pipeline.__file__).resolve().parents[1])


def test_cpu_threads_are_shared_out_without_oversubscription():
    shares = [int(worker_env(i, 3, 8, 0, base={})["SWEEP_THREADS"]) for i in range(3)]
    assert shares == [3, 3, 2] and sum(shares) == 8
    env = worker_env(1, 3, 8, 0, base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "SWEEP_THREADS": "3",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
        "SWEEP_WORKER_INDEX": "1",
        "SWEEP_WORKERS": "3",
    }
    assert [worker_env(i, 4, 2, 0, base={})["SWEEP_THREADS"] for i in range(4)] == ["1", "1", "1", "1"]


def test_one_gpu_per_worker_only_when_several_are_visible():
    assert [worker_env(i, 4, 16, 2, base={})["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "0", "1"]
    inherited = {"CUDA_VISIBLE_DEVICES": "3,5,7"}
    assert [worker_env(i, 3, 12, 3, base=inherited)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["3", "5", "7"]
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(0, 2, 8, 1, base={})
    assert worker_env(1, 2, 8, 1, base={"CUDA_VISIBLE_DEVICES": "2"})["CUDA_VISIBLE_DEVICES"] == "2"
    with pytest.raises(ValueError, match="worker 2 of 2 on 8 CPUs"):
        worker_env(2, 2, 8, 0)


def test_plain_sqlite_is_refused_for_several_workers():
    check_storage_for_workers("sqlite:////runs/optuna.db", 1)
    check_storage_for_workers("journal:///runs/optuna.journal", 4)
    check_storage_for_workers("postgresql://sweep:pw@db/optuna", 4)
    with pytest.raises(TrackingError) as info:
        check_storage_for_workers("sqlite:////runs/optuna.db", 3)
    assert str(info.value) == (
        "--workers 3 cannot share the SQLite storage sqlite:////runs/optuna.db: SQLite takes one writer at a time "
        "and Optuna advises against it for parallel workers; use a journal file "
        "(--storage journal:////runs/optuna.journal) or a database server (--storage postgresql://USER@HOST/DB)"
    )
    with pytest.raises(ConfigError, match=r"^--workers 0: give at least 1 worker process$"):
        check_storage_for_workers("postgresql://db/optuna", 0)


def test_worker_threads_reads_the_launchers_share():
    assert worker_threads({}) is None
    assert worker_threads({"SWEEP_THREADS": "3"}) == 3
    with pytest.raises(ConfigError) as info:
        worker_threads({"SWEEP_THREADS": "many"})
    assert str(info.value) == "SWEEP_THREADS='many': not a positive number of threads; unset it or give one like 4"


def test_exit_code_is_the_first_failure():
    assert exit_code([0, 0, 0]) == 0
    assert exit_code([0, 5, 2]) == 5
    assert exit_code([0, -signal.SIGKILL]) == 137


_REPORTING_WORKER = """
import json, os, sys
from pipeline.distributed import apply_worker_threads
applied = apply_worker_threads()
import torch
out = {"index": os.environ["SWEEP_WORKER_INDEX"], "applied": applied, "torch": torch.get_num_threads(),
       "omp": os.environ["OMP_NUM_THREADS"], "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
open(os.path.join(sys.argv[1], f"worker-{out['index']}.json"), "w").write(json.dumps(out))
sys.exit(int(out["index"]))
"""


def test_launch_starts_n_workers_with_their_shares_and_returns_exit_codes(tmp_path):
    codes = launch_workers(
        [sys.executable, "-c", _REPORTING_WORKER, str(tmp_path)],
        3,
        cpu_count=5,
        gpu_count=2,
        env={**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert codes == [0, 1, 2]
    reports = [json.loads((tmp_path / f"worker-{i}.json").read_text()) for i in range(3)]
    assert reports == [
        {"index": "0", "applied": 2, "torch": 2, "omp": "2", "gpu": "0"},
        {"index": "1", "applied": 2, "torch": 2, "omp": "2", "gpu": "1"},
        {"index": "2", "applied": 1, "torch": 1, "omp": "1", "gpu": "0"},
    ]


_STOPPABLE_WORKER = """
import os, signal, sys, time
folder, index = sys.argv[1], os.environ["SWEEP_WORKER_INDEX"]
def stop(signum, frame):
    open(os.path.join(folder, f"stopped-{index}"), "w").write(signal.Signals(signum).name)
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(os.path.join(folder, f"ready-{index}"), "w").close()
time.sleep(120)
sys.exit(9)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_is_forwarded_to_every_worker(tmp_path, sig):
    def send_when_ready() -> None:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)  # to the launcher (this process), as a terminal or an orchestrator would

    previous = signal.getsignal(sig)
    sender = threading.Thread(target=send_when_ready)
    sender.start()
    started = time.monotonic()
    codes = launch_workers([sys.executable, "-c", _STOPPABLE_WORKER, str(tmp_path)], 2, cpu_count=2, gpu_count=0)
    sender.join()
    assert codes == [3, 3]
    assert time.monotonic() - started < 60
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == ["stopped-0", "stopped-1"]
    assert {p.read_text() for p in tmp_path.glob("stopped-*")} == {sig.name}
    assert signal.getsignal(sig) is previous, "the launcher's handler is removed afterwards"


def test_a_worker_that_cannot_start_is_named(tmp_path):
    with pytest.raises(pipeline.core.SweepError) as info:
        launch_workers([str(tmp_path / "no-such-sweep")], 2, cpu_count=2, gpu_count=0)
    assert str(info.value) == (
        f"worker 0 of 2 could not be started: {tmp_path / 'no-such-sweep'}: No such file or directory"
    )
