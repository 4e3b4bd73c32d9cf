"""The study loop on tiny data: trial states, MLflow parent/nested runs, resume."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.config import load_study, tracking_uri
from pipeline.search import epoch_history
from pipeline.stages import run_study

from conftest import study_dict, write_study


def _runs(cfg):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_run_study_creates_parent_and_nested_runs(sweep_home, study_file):
    cfg = load_study(study_file)
    outcome = run_study(cfg)
    trials = outcome.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert outcome.stop_reason == "n_trials reached"
    client, parents, children = _runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1"]
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep.state"] == "COMPLETE"
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [0, 1]
        trial = trials[int(run.data.tags["sweep.trial_number"])]
        assert [m.value for m in history] == pytest.approx([h["val_accuracy"] for h in epoch_history(trial.user_attrs)])
        assert trial.value == pytest.approx(max(m.value for m in history))
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study.yaml", "splits.json"} <= artifacts


def test_resume_reaches_n_trials_and_reuses_parent(sweep_home, study_file):
    cfg = load_study(study_file)
    first = run_study(cfg)
    more = load_study(study_file, ["study.n_trials=3"])
    second = run_study(more)
    assert second.parent_run_id == first.parent_run_id
    assert len(second.study.get_trials(states=(TrialState.COMPLETE,))) == 3
    _, parents, children = _runs(cfg)
    assert len(parents) == 1 and len(children) == 3


def test_each_resume_draws_new_parameters(sweep_home, tmp_path, image_root):
    # A sampler seeded once per process would replay trial 0's draw in every new process.
    tree = study_dict(image_root, study={"n_trials": 1}, training={"epochs": 1})
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    run_study(cfg)
    run_study(load_study(tmp_path / "study.yaml", ["study.n_trials=2"]))
    study = run_study(load_study(tmp_path / "study.yaml", ["study.n_trials=3"])).study
    params = [t.params for t in study.trials]
    assert len(params) == 3 and params[0] != params[1] and params[1] != params[2] and params[0] != params[2]
    # and the draws are a function of the trial count, so a fresh study repeats them exactly
    again = load_study(tmp_path / "study.yaml", ["study.n_trials=3", "study.name=again"])
    assert [t.params for t in run_study(again).study.trials] == params


def test_grid_study_stops_when_every_point_has_run(sweep_home, tmp_path, image_root):
    space = {
        "lr": {"type": "categorical", "choices": [0.01, 0.02]},
        "freeze_depth": {"type": "int", "low": 0, "high": 0},
    }
    tree = study_dict(
        image_root,
        study={"n_trials": 5, "sampler": {"type": "grid", "seed": 0}},
        training={"epochs": 1},
        search_space=space,
    )
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    outcome = run_study(cfg)
    assert outcome.stop_reason == "grid exhausted"
    assert sorted(t.params["lr"] for t in outcome.study.trials) == [0.01, 0.02]
    again = run_study(cfg)  # nothing left to run: no trial re-evaluates a grid point
    assert again.stop_reason == "grid exhausted" and len(again.study.trials) == 2


def test_timeout_stops_starting_trials(sweep_home, tmp_path, image_root):
    tree = study_dict(image_root, study={"n_trials": 50, "timeout": 0.5}, training={"epochs": 1})
    outcome = run_study(load_study(write_study(tmp_path / "study.yaml", tree)))
    assert outcome.stop_reason == "timeout"
    trials = outcome.study.trials
    start = trials[0].datetime_start
    ends = [(t.datetime_complete - start).total_seconds() for t in trials]
    # Optuna checks the timeout after each trial: every trial but the last ended inside it (so
    # another one was started), the last one ended past it (so none was started after it).
    assert all(end < 0.5 for end in ends[:-1]), ends
    assert (trials[-1].datetime_start - start).total_seconds() < 0.5
    assert len(trials) < 50
    assert all(t.state == TrialState.COMPLETE for t in outcome.study.trials)


def test_a_study_that_reached_n_trials_runs_no_more(sweep_home, study_file):
    cfg = load_study(study_file)
    run_study(cfg)
    again = run_study(cfg)
    assert again.stop_reason == "n_trials reached" and len(again.study.trials) == 2
    _, parents, children = _runs(cfg)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
