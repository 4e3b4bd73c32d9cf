"""Many workers, one study: `sweep run --workers N` on PostgreSQL, and two processes on the embedded
SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from pipeline.cli import _commands as cli

from conftest import study_dict, write_study


def test_workers_launched_together_on_fresh_postgres_share_one_study_and_one_parent_run(tmp_path, image_root, postgres):
    # Fresh databases, no schema created beforehand: the workers' first opens race through Optuna's
    # and MLflow's schema creation, which the storages' creation lock serialises.
    storage, tracking = postgres("optuna"), postgres("mlflow")
    tree = study_dict(image_root, study={"n_trials": 6}, training={"epochs": 2})
    study_file = write_study(tmp_path / "study.yaml", tree)
    env = {**os.environ, "SWEEP_HOME": str(tmp_path / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(study_file),
        "--workers",
        "2",
        "--no-report",
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "2 workers ended with exit codes 0, 0" in lines

    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # A worker starts a trial only while finished + running + queued < n_trials; two that check in
    # the same instant can each start one.
    assert 6 <= len(finished) <= 7 and len(finished) == len(trials)
    assert f"study 'tiny' after 2 workers: {len(finished)} complete, 0 pruned, 0 failed" in lines
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers ran trials"
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {t.user_attrs["pid"] for t in trials}
    assert optuna.get_all_study_names(storage) == ["tiny"]

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, "the workers agree on one parent run"
    assert parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["sweep.trial_number"]) for r in nested) == [t.number for t in trials]
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[0].info.run_id}


def test_several_workers_on_the_default_sqlite_store_are_refused(tmp_path, image_root, sweep_home):
    study_file = write_study(tmp_path / "study.yaml", study_dict(image_root))
    result = CliRunner().invoke(cli.app, ["run", str(study_file), "--workers", "3"])
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        f"error: --workers 3 cannot share the SQLite storage sqlite:///{(sweep_home / 'optuna.db').resolve()}: "
        "SQLite takes one writer at a time and Optuna advises against it for parallel workers; use a journal file "
        f"(--storage journal:///{(sweep_home / 'optuna.journal').resolve()}) or a database server "
        "(--storage postgresql://USER@HOST/DB)"
    ]
    assert not sweep_home.exists(), "nothing written"


def test_two_workers_on_a_new_sqlite_store_both_run_distinct_trials(tmp_path, image_root):
    # Both create the embedded stores at once: their schema migrations must not collide.
    study_file = write_study(
        tmp_path / "study.yaml", study_dict(image_root, study={"n_trials": 6}, training={"epochs": 2})
    )
    env = {**os.environ, "SWEEP_HOME": str(tmp_path / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "pipeline", "run", str(study_file), "--no-report", "--quiet"]
    workers = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials
    assert 6 <= len(trials) <= 7 and all(t.state == TrialState.COMPLETE for t in trials)
    # Each trial's sampler is seeded from its trial number, unique across workers: no replays,
    # not even of the first draws of two processes starting in the same instant.
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1


def test_workers_with_baselines_and_reruns_add_each_once_and_keep_n_trials(tmp_path, image_root):
    # Issue 8's selection with issue 12's workers: the probe is fitted and the seed recipe enqueued
    # once (under the study's start lock), the re-runs are enqueued once (under its re-runs lock),
    # and neither counts toward n_trials.
    selection = {"baselines": {"linear_probe": True, "seed_recipe": True}, "top_k": 2, "reruns": 1}
    tree = study_dict(image_root, study={"n_trials": 4}, training={"epochs": 1}, selection=selection)
    study_file = write_study(tmp_path / "study.yaml", tree)
    storage = f"journal:///{tmp_path / 'optuna.journal'}"
    env = {**os.environ, "SWEEP_HOME": str(tmp_path / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "pipeline", "run", str(study_file), "--workers", "2", "--no-report"]
    done = subprocess.run(
        [*cmd, "--storage", storage], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 workers ended with exit codes 0, 0" in done.stdout.splitlines()

    from pipeline.distributed import open_storage
    from pipeline.search._selection import top_candidates
    from pipeline.search._stopping import counted

    study = optuna.load_study(study_name="tiny", storage=open_storage(storage))
    trials = study.get_trials()
    roles = [t.user_attrs.get("baseline") for t in trials]
    assert roles.count("linear_probe") == 1 and roles.count("seed_recipe") == 1
    reruns = [(t.user_attrs["rerun_of"], t.user_attrs["seed_index"]) for t in trials if "rerun_of" in t.user_attrs]
    top = top_candidates([t for t in trials if "rerun_of" not in t.user_attrs], 2, "maximize")
    expected = {(t.number, 1) for t in top if t.user_attrs.get("baseline") != "linear_probe"}
    assert expected and sorted(reruns) == sorted(expected), "the top 2 re-run once each (not the probe), no pair twice"
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert 4 <= counted(study) <= 5, "re-runs and the probe are not counted; at most one overshoot"
    assert len(trials) == counted(study) + 1 + len(expected)


@pytest.mark.parametrize(("codes", "expected"), [([0, 3], 3), ([130, 130], 130), ([-15, 0], 143)])
def test_the_launcher_exits_with_the_first_failing_workers_code(
    tmp_path, image_root, sweep_home, monkeypatch, codes, expected
):
    # typer.Exit raised by the launcher is the command's own exit code, not an unexpected error.
    from pipeline import distributed as workers

    monkeypatch.setattr(workers, "launch_workers", lambda command, count: codes)
    study_file = write_study(tmp_path / "study.yaml", study_dict(image_root))
    storage = f"journal:///{tmp_path / 'optuna.journal'}"
    result = CliRunner().invoke(cli.app, ["run", str(study_file), "--workers", "2", "--storage", storage])
    assert result.exit_code == expected, result.output
    assert result.stdout.splitlines() == [f"2 workers ended with exit codes {', '.join(map(str, codes))}"]
    assert "unexpected" not in result.stderr
