"""Storage URLs -> Optuna storages: RDB (SQLite, PostgreSQL), journal files; concurrent first opens."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

import pipeline
from pipeline.core import TrackingError
from pipeline.distributed import creation_lock, heartbeat_supported, journal_path, open_storage, storage_kind
from pipeline.distributed._storages import grpc_address

WORKERS = 4
ROOT = str(Path(pipeline.__file__).resolve().parents[1])  # so subprocesses import this checkout's pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open_at_once(url: str, barrier, results, schema_lock: bool) -> None:
    """Child process: wait for the others, then open the storage and create-or-load one study."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    barrier.wait(timeout=120)
    try:
        storage = open_storage(url, heartbeat_interval=5, schema_lock=schema_lock)
        optuna.create_study(storage=storage, study_name="shared", load_if_exists=True)
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the parent, which shows it in the assertion
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.parametrize("schema_lock", [True, False], ids=["advisory-lock", "retry-only"])
def test_workers_opening_a_fresh_postgres_at_once_all_succeed(postgres, schema_lock):
    url = postgres(f"fresh_{'lock' if schema_lock else 'retry'}")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(url, barrier, results, schema_lock)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * WORKERS
    assert [p.exitcode for p in procs] == [0] * WORKERS
    assert [s.study_name for s in optuna.get_all_study_summaries(storage=url)] == ["shared"]
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:  # one schema: one version row, one alembic stamp
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM version_info")).scalar() == 1
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_unreachable_postgres_names_the_storage_with_the_password_masked():
    port = free_port()
    url = f"postgresql+psycopg://sweep:s3cret@127.0.0.1:{port}/optuna"
    with pytest.raises(TrackingError) as info:
        open_storage(url, connect_timeout=5)
    message = str(info.value)
    assert "s3cret" not in message
    assert message.startswith(
        f"Optuna storage postgresql+psycopg://sweep:***@127.0.0.1:{port}/optuna: cannot connect ("
    )
    assert "Connection refused" in message
    assert message.endswith(
        "); start the database server, or fix the host, user or password in --storage / study.storage"
    )
    assert info.value.exit_code == 5


def test_unknown_storage_url_is_refused_with_the_accepted_forms():
    with pytest.raises(TrackingError) as info:
        storage_kind("redis://:pw@cache:6379/0")
    assert str(info.value) == (
        "Optuna storage redis://:***@cache:6379/0: not a storage URL; use sqlite:///FILE, "
        "postgresql://USER@HOST/DB, mysql://USER@HOST/DB, grpc://HOST:PORT (a running `sweep storage-proxy`) "
        "or journal:///FILE.journal"
    )


def test_url_forms():
    assert [
        storage_kind(u)
        for u in (
            "sqlite:///a.db",
            "postgresql+psycopg://h/db",
            "mysql+pymysql://h/db",
            "grpc://proxy:13000",
            "journal:///a.journal",
            "runs/a.journal",
            "/abs/optuna.log",
        )
    ] == ["rdb", "rdb", "rdb", "grpc", "journal", "journal", "journal"]
    assert [heartbeat_supported(u) for u in ("postgresql://h/db", "grpc://p:1", "x.journal")] == [True, False, False]
    assert journal_path("journal:///runs/x.journal") == journal_path("runs/x.journal")
    assert str(journal_path("journal:////abs/x.journal")) == "/abs/x.journal"
    assert grpc_address("grpc://proxy") == ("proxy", 13000)
    assert grpc_address("grpc://10.0.0.7:13001") == ("10.0.0.7", 13001)
    assert grpc_address("grpc://[::1]:13002") == ("[::1]", 13002)
    with pytest.raises(TrackingError, match=r"^Optuna storage grpc://:13000: no host; write it as grpc://HOST:PORT$"):
        grpc_address("grpc://:13000")


def test_sqlite_storage_gets_the_heartbeat_settings(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'new' / 'optuna.db'}", heartbeat_interval=7, grace_period=21)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 7
    assert (tmp_path / "new" / "optuna.db").is_file()


def test_unwritable_sqlite_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError, match=r"cannot write there"):
        open_storage(f"sqlite:///{blocker / 'optuna.db'}")


_HANGING_WORKER = """
import sys, time, optuna
from pipeline.distributed import open_storage
storage = open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2)
study = optuna.load_study(study_name="hb", storage=storage)
def objective(trial):
    trial.suggest_float("x", 0.0, 1.0)
    print("started", flush=True)
    time.sleep(600)
study.optimize(objective, n_trials=1)
"""


def test_killed_workers_trial_is_failed_by_heartbeat_and_retried_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    storage = open_storage(url, heartbeat_interval=1, grace_period=2, stale_trial_callback=retry)
    study = optuna.create_study(storage=storage, study_name="hb")
    worker = subprocess.Popen(
        [sys.executable, "-c", _HANGING_WORKER, url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        assert worker.stdout.readline().strip() == "started"
        time.sleep(1.5)  # at least one heartbeat recorded
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=30)
    time.sleep(2.5)  # past the grace period
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0


def _journal_worker(path: str, barrier, n_trials: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(path)
    barrier.wait(timeout=120)
    study = optuna.create_study(
        storage=storage,
        study_name="journal",
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=os.getpid()),
    )

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("pid", os.getpid())
        return trial.suggest_float("x", -1.0, 1.0) ** 2

    study.optimize(objective, n_trials=n_trials)


@pytest.mark.parametrize("form", ["url", "bare-path"])
def test_two_processes_share_one_journal_file(tmp_path, form):
    path = tmp_path / "runs" / "optuna.journal"
    path.parent.mkdir()
    url = f"journal:///{path}" if form == "url" else str(path)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_journal_worker, args=(url, barrier, 8)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    storage = open_storage(url)
    assert isinstance(storage, optuna.storages.JournalStorage)
    trials = optuna.load_study(study_name="journal", storage=storage).get_trials()
    assert sorted(t.number for t in trials) == list(range(16))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == {p.pid for p in procs}


def _create_mlflow_store_at_once(url: str, barrier, results) -> None:
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.tracking import MlflowClient

    barrier.wait(timeout=120)
    try:
        with creation_lock(url, "mlflow-schema"):
            MlflowClient(url).search_experiments()
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the parent, which shows it in the assertion
        results.put(f"{type(err).__name__}: {err}")


def test_creation_lock_also_serialises_mlflow_store_creation(postgres):
    # Without the lock, 3 of 4 MLflow clients on a fresh PostgreSQL fail the same way Optuna's do
    # (UniqueViolation on pg_type_typname_nsp_index): the same lock, another name, fixes it.
    url = postgres("fresh_mlflow")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_create_mlflow_store_at_once, args=(url, barrier, results)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok"] * WORKERS
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_a_user_without_create_rights_is_told_so_not_retried(postgres):
    url = postgres("no_create")
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:  # PostgreSQL >= 15: only the owner may create in schema public
        conn.execute(sqlalchemy.text("CREATE ROLE reader LOGIN"))
    admin.dispose()
    reader = url.replace("postgres@", "reader@")
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        open_storage(reader)
    message = str(info.value)
    assert message.startswith(f"Optuna storage {reader}: cannot create its tables (")
    assert "permission denied for schema public" in message
    assert message.endswith(
        "); give the user the right to create tables in that database, or create the schema once as its owner"
    )
    assert time.monotonic() - started < 5, "no retries with backoff"
