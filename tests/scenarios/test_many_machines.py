"""Many machines, real components: PostgreSQL (a role that logs in with a password), `sweep
storage-proxy` (Optuna's gRPC proxy), `mlflow server --serve-artifacts` with a PostgreSQL backend, and
three `sweep run` workers started together on fresh databases, one of them on another "host" (its
own SWEEP_HOST and SWEEP_HOME, through the proxy) killed with SIGKILL mid-trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from typer.testing import CliRunner

import pipeline
from pipeline.cli import _commands as cli
from pipeline.config import load_study
from pipeline.core import DataError
from pipeline.stages import run_study

from conftest import make_folder, study_dict, write_study

ROOT = str(Path(pipeline.__file__).resolve().parents[1])
PASSWORD = "Pw-s3cret-4217"  # distinctive: finding it anywhere is a leak
TRACK_PASSWORD = "Tk-s3cret-9931"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweeper_db(postgres):
    """`make(name) -> URL` of a new database owned by the role `sweeper`, which must log in with its
    password (scram-sha-256 for that role; the server trusts the test's superuser)."""
    admin = postgres("many_admin")
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE sweeper LOGIN PASSWORD '{PASSWORD}'"))
        hba = Path(conn.execute(sqlalchemy.text("SHOW hba_file")).scalar())
        hba.write_text(f"host all sweeper 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        conn.execute(sqlalchemy.text("SELECT pg_reload_conf()"))
    base = admin.rsplit("/", 1)[0].replace("postgres@", f"sweeper:{PASSWORD}@")

    def make(name: str) -> str:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name} OWNER sweeper"))
        return f"{base}/{name}"

    yield make
    engine.dispose()


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url}: no answer within {timeout} s")


def _kill_mid_trial(proc: subprocess.Popen, storage: str, host: str, timeout: float = 240) -> int:
    """SIGKILL `proc` while it runs a trial: stop it as soon as one of its trials runs, check the
    trial is still RUNNING (a stopped process cannot finish it), then kill it. Returns the trial number."""
    deadline = time.monotonic() + timeout
    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
    rdb = None  # opened once the workers have created the schema: this test must not race them
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker to kill ended on its own before running a trial"
        if rdb is None:
            with engine.connect() as conn:
                ready = conn.execute(sqlalchemy.text("SELECT to_regclass('public.studies')")).scalar() and (
                    conn.execute(sqlalchemy.text("SELECT count(*) FROM studies WHERE study_name = 'tiny'")).scalar()
                )
            rdb = optuna.storages.RDBStorage(storage) if ready else None
        if rdb is not None:
            study = optuna.load_study(study_name="tiny", storage=rdb)
            mine = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.user_attrs.get("host") == host]
            if mine:
                os.kill(proc.pid, signal.SIGSTOP)
                again = study.get_trials()[mine[0].number]
                if again.state == TrialState.RUNNING and again.user_attrs.get("host") == host:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return mine[0].number
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.1)
    pytest.fail(f"no trial of {host} was seen running within {timeout} s")


def _leaks(text: str) -> bool:
    return PASSWORD in text or TRACK_PASSWORD in text


@pytest.fixture
def procs():
    """Processes a test starts, by name; whatever still runs at teardown is stopped (its session)."""
    started: dict[str, subprocess.Popen] = {}
    yield started
    for proc in started.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_three_workers_one_killed_on_another_host(tmp_path, image_root, sweeper_db, procs, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # this test's own MLflow client: fail fast
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    storage, tracking_db = sweeper_db("many_optuna"), sweeper_db("many_mlflow")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(storage.replace(PASSWORD, "wrong")).connect()
    n_trials = 6
    study = {
        "n_trials": n_trials,
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "heartbeat_interval": 1,
        "grace_period": 3,
        "max_retries": 1,
    }
    study_file = write_study(tmp_path / "study.yaml", study_dict(image_root, study=study, training={"epochs": 2}))
    proxy_port, mlflow_port = free_port(), free_port()
    tracking = f"http://tracker:{TRACK_PASSWORD}@127.0.0.1:{mlflow_port}"
    grpc = f"grpc://127.0.0.1:{proxy_port}"
    env = {**os.environ, "PYTHONPATH": ROOT, "MLFLOW_DISABLE_TELEMETRY": "true", "SWEEP_THREADS": "1"}
    home_a, home_c = tmp_path / "host-a" / "mlruns", tmp_path / "host-c" / "mlruns"
    sweep = [sys.executable, "-m", "pipeline"]
    run = [*sweep, "run", str(study_file), "--no-report", "--quiet", "--tracking-uri", tracking]
    logs = {name: tmp_path / f"{name}.log" for name in ("mlflow", "proxy", "a", "b", "c", "report1", "report2")}
    started = time.monotonic()
    server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_db, "--serve-artifacts"]
    server += ["--artifacts-destination", str(tmp_path / "served-artifacts"), "--host", "127.0.0.1"]
    procs["mlflow"] = _start([*server, "--port", str(mlflow_port), "--workers", "1"], logs["mlflow"], env)
    _wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs["mlflow"], logs["mlflow"])
    # The proxy and the three workers start in the same instant on the fresh study database:
    # two workers reach it directly, the third (another host) through the proxy.
    procs["proxy"] = _start([*sweep, "storage-proxy", storage, "--port", str(proxy_port)], logs["proxy"], env)
    for name in ("a", "b"):
        procs[name] = _start([*run, "--storage", storage], logs[name], {**env, "SWEEP_HOME": str(home_a)})
    procs["c"] = _start(
        [*run, "--storage", grpc], logs["c"], {**env, "SWEEP_HOME": str(home_c), "SWEEP_HOST": "host-c"}
    )
    killed = _kill_mid_trial(procs["c"], storage, "host-c")
    codes = {name: procs[name].wait(timeout=600) for name in ("a", "b")}
    assert codes == {"a": 0, "b": 0}, {n: logs[n].read_text()[-3000:] for n in ("a", "b", "c")}
    workers_done = time.monotonic()
    # Two report stages at once, through both routes: one runs, the other waits and finds it recorded.
    report = [*sweep, "report", str(study_file), "--tracking-uri", tracking]
    for name, url in (("report1", storage), ("report2", grpc)):
        procs[name] = _start([*report, "--storage", url], logs[name], {**env, "SWEEP_HOME": str(home_a)})
    assert [procs[n].wait(timeout=600) for n in ("report1", "report2")] == [0, 0], [
        logs[n].read_text()[-3000:] for n in ("report1", "report2")
    ]
    outputs = {name: log.read_text() for name, log in logs.items()}

    # One study (no lock study left), all trials accounted for.
    assert optuna.get_all_study_names(storage) == ["tiny"]
    stored = optuna.load_study(study_name="tiny", storage=storage)
    trials = stored.get_trials()
    states = Counter(t.state for t in trials)
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and dead.user_attrs["host"] == "host-c"
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed]
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].state in FINISHED and retries[0].params == dead.params
    assert retries[0].user_attrs["host"] != "host-c", "a surviving worker re-ran it"
    finished = [t for t in trials if t.state in FINISHED]
    overshoot = len(finished) - n_trials
    assert 0 <= overshoot <= 1, "at most one trial per other surviving worker beyond n_trials"
    # Every trial's parameters appear exactly once among the finished trials (TPE start-up trials
    # of different workers included: seeds come from the trial number).
    drawn = Counter(json.dumps(t.params, sort_keys=True) for t in finished)
    assert all(drawn[json.dumps(t.params, sort_keys=True)] == 1 for t in trials)
    assert {t.user_attrs["pid"] for t in finished} == {procs["a"].pid, procs["b"].pid}
    assert "sweep_splits" in stored.user_attrs

    # MLflow: one experiment, one parent run, one nested run per trial with the trial's state.
    client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["tiny"]
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = {int(r.data.tags["sweep.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(nested) == [t.number for t in trials]
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    assert {n: r.info.status for n, r in nested.items()} == {t.number: status[t.state] for t in trials}
    assert nested[retries[0].number].data.tags["sweep.retry_of"] == str(killed)
    # The parent run was made by whichever worker started first: its storage URL, masked.
    assert parents[0].data.tags["sweep.storage"] in (storage.replace(PASSWORD, "***"), grpc)

    # The report table has every trial; the stage ran once (one test evaluation, one model version).
    table = (tmp_path / "host-a" / "reports" / "tiny" / "trials.csv").read_text().splitlines()
    assert len(table) - 1 == len(trials)
    summaries = outputs["report1"] + outputs["report2"]
    assert summaries.count("(evaluated now)") == 1 and summaries.count("(stored evaluation, not re-run)") == 1
    assert summaries.count("version 1 registered") == 1 and summaries.count("version 1 already registered") == 1
    markdown = (tmp_path / "host-a" / "reports" / "tiny" / "report.md").read_text()
    assert f"trial {killed} as trial {retries[0].number}" in markdown
    assert ("overshoot:" in markdown) == (overshoot > 0)

    # No password anywhere: process output, MLflow params/tags, artifacts, report files, study attrs.
    assert not [name for name, text in outputs.items() if name != "mlflow" and _leaks(text)]
    for r in runs:
        assert not _leaks(json.dumps({**r.data.params, **r.data.tags})), r.info.run_name
    parent_id = parents[0].info.run_id
    artifacts = Path(client.download_artifacts(parent_id, "", str(tmp_path / "downloaded")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert {"study.yaml", "splits.json"} <= {p.name for p in files}
    assert not [p for p in files if _leaks(p.read_bytes().decode("utf-8", "replace"))]
    report_files = list((tmp_path / "host-a" / "reports").rglob("*"))
    assert not [p for p in report_files if p.is_file() and _leaks(p.read_bytes().decode("utf-8", "replace"))]
    assert not _leaks(json.dumps(stored.user_attrs)) and not _leaks(json.dumps([t.user_attrs for t in trials]))

    print(
        f"\nworkers 3 (1 killed); trials {states[TrialState.COMPLETE]} complete / {states[TrialState.PRUNED]} "
        f"pruned / {states[TrialState.FAIL]} failed / {len(retries)} retried; nested runs {len(nested)}; parent "
        f"runs {len(parents)}; duplicated parameter sets {sum(n - 1 for n in drawn.values())}; overshoot "
        f"{overshoot}; workers {workers_done - started:.0f} s, total {time.monotonic() - started:.0f} s"
    )


def test_a_worker_whose_data_folder_differs_stops_naming_the_files(sweep_home, tmp_path):
    root = make_folder(tmp_path / "images")
    tree = study_dict(root, study={"n_trials": 1}, training={"epochs": 1})
    run_study(load_study(write_study(tmp_path / "study.yaml", tree)))
    (root / "train" / "ants" / "img_0.png").unlink()  # this "machine" lacks one file and has another
    (root / "val" / "bees" / "img_0.png").rename(root / "val" / "bees" / "extra.png")
    with pytest.raises(DataError) as err:
        run_study(load_study(tmp_path / "study.yaml", ["study.n_trials=2"]))
    assert str(err.value) == (
        f"{root}: differs from the split recorded for study 'tiny' by its first worker (3 file(s)): missing here: "
        "train/ants/img_0.png, val/bees/img_0.png; extra here: val/bees/extra.png; make this data folder hold the "
        "same files as on the other machines, then start again"
    )
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_home / 'optuna.db'}")
    assert len(study.trials) == 1, "no trial started"


@pytest.mark.parametrize("which", ["database", "tracking server"])
def test_an_unreachable_store_is_one_masked_message_and_nothing_written(which, sweep_home, study_file, sweeper_db):
    closed = free_port()
    if which == "database":
        storage, tracking = f"postgresql+psycopg://sweeper:{PASSWORD}@127.0.0.1:{closed}/optuna", None
    else:
        storage, tracking = sweeper_db(f"untouched_{closed}"), f"http://tracker:{TRACK_PASSWORD}@127.0.0.1:{closed}"
    args = ["run", str(study_file), "--no-report", "--quiet", "--storage", storage]
    result = CliRunner().invoke(cli.app, args + (["--tracking-uri", tracking] if tracking else []))
    assert result.exit_code == 5
    [line] = result.stderr.splitlines()
    if which == "database":
        assert line.startswith(
            f"error: Optuna storage postgresql+psycopg://sweeper:***@127.0.0.1:{closed}/optuna: cannot connect ("
        )
        assert not (sweep_home / "mlflow.db").exists(), "the tracking store was not touched"
    else:
        assert line == (
            f"error: MLflow tracking server http://tracker:***@127.0.0.1:{closed} cannot be used: connection refused "
            "(is the tracking server running?)"
        )
        assert optuna.get_all_study_names(storage) == [], "no study was stored"
    assert not _leaks(result.output)
