"""The MLflow observer and reconciliation against a temporary SQLite tracking store."""

from __future__ import annotations

import json

import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from pipeline.config import load_study
from pipeline.core import TrackingError
from pipeline.data import Splits, build_splits
from pipeline.search import TrialEnded, TrialStarted
from pipeline.search._history import epoch_attr
from pipeline.tracking import MLflowObserver, Tracker, input_context, log_study, reconcile, split_inputs
from pipeline.tracking import _mlflow_runs as mlflow_runs
from pipeline.tracking._datasets import split_digest
from pipeline.tracking._track import run_params, study_params
from pipeline.training import EpochResult

from conftest import make_folder, study_dict, write_study


@pytest.fixture
def store(tmp_path):
    """(tracking URI, tracker with an open parent run `s`) on a fresh SQLite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp", tmp_path / "artifacts")
    tracker.open_parent("s", None, {"sweep.arch": "resnet18"})
    return uri, tracker


@pytest.fixture
def cfg(tmp_path):
    return load_study(write_study(tmp_path / "study.yaml", study_dict(tmp_path / "images")))


def _epoch(epoch: int, acc: float) -> EpochResult:
    return EpochResult(
        epoch, train_loss=1.0 - acc, train_accuracy=acc, val_loss=1.5 - acc, val_accuracy=acc, lr=0.01, seconds=0.5
    )


def _ended(number, state, epochs_run, best=None, best_epoch=None, reason=None, interrupted=False):
    return TrialEnded(number, state, "val_accuracy", best, best_epoch, epochs_run, 2.04, reason, interrupted)


def _nested(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = {int(r.data.tags["sweep.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return client, parents, nested


def _splits(tmp_path) -> Splits:
    root = make_folder(tmp_path / "images", {"train": 3, "val": 4})
    return build_splits(root, "train", "val", None, 0.5, 0)


def test_observer_mirrors_each_trial_onto_a_nested_run(store, cfg, tmp_path):
    uri, tracker = store
    splits = _splits(tmp_path)
    observer = MLflowObserver(tracker, "s", split_inputs(splits, ("train", "val")))
    scripts = [  # (state, accuracies per epoch, reason, interrupted)
        ("COMPLETE", [0.5, 0.75], None, False),
        ("PRUNED", [0.25], None, False),
        ("FAIL", [], "non-finite loss: training loss became nan", False),
        ("FAIL", [0.5], "interrupted (SIGTERM)", True),
    ]
    recorded = {}
    for number, (state, accs, reason, interrupted) in enumerate(scripts):
        attrs: dict = {}
        returned = observer.trial_started(
            TrialStarted(
                number,
                {"lr": 0.01},
                cfg.with_params({"lr": 0.01}),
                retry_of=2 if number == 3 else None,
                record=attrs.__setitem__,
            )
        )
        assert returned is None and list(attrs) == ["mlflow_run_id"]  # kept on the trial through `record`
        recorded[number] = attrs["mlflow_run_id"]
        for epoch, acc in enumerate(accs):
            observer.epoch_finished(number, _epoch(epoch, acc))
        best = max(accs) if accs else None
        best_epoch = accs.index(best) if state == "COMPLETE" else None
        observer.trial_ended(_ended(number, state, len(accs), best, best_epoch, reason, interrupted))

    client, parents, nested = _nested(uri)
    assert len(parents) == 1 and parents[0].info.run_id == tracker.parent_id
    assert sorted(nested) == [0, 1, 2, 3]
    assert {n: r.info.run_id for n, r in nested.items()} == recorded
    assert [nested[n].info.status for n in range(4)] == ["FINISHED", "KILLED", "FAILED", "KILLED"]
    assert [nested[n].data.tags["sweep.state"] for n in range(4)] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert {r.data.tags["mlflow.parentRunId"] for r in nested.values()} == {tracker.parent_id}
    # the runs table tells a pruned trial from a failed one by its name
    assert [r.info.run_name for _, r in sorted(nested.items())] == [
        "trial-0",
        "trial-1 (pruned)",
        "trial-2 (failed)",
        "trial-3 (interrupted)",
    ]

    done = nested[0]
    history = client.get_metric_history(done.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(done.info.run_id, "best_val_accuracy")] == [(1, 0.75)]
    # the per-epoch rate after the schedule is `epoch_lr`; `lr` is only the param (the sampled rate)
    assert [(m.step, m.value) for m in client.get_metric_history(done.info.run_id, "epoch_lr")] == [
        (0, 0.01),
        (1, 0.01),
    ]
    assert "lr" not in done.data.metrics
    assert done.data.tags["sweep.best_epoch"] == "1" and done.data.tags["sweep.seconds"] == "2.0"
    assert done.data.params == {k: str(v) for k, v in run_params(cfg.with_params({"lr": 0.01})).items()}
    assert done.data.params["lr"] == "0.01" and done.data.params["freeze_depth"] == "0"
    # best_val_accuracy on every trial that ran an epoch: pruned and interrupted ones too
    assert [nested[n].data.metrics.get("best_val_accuracy") for n in range(4)] == [0.75, 0.25, None, 0.5]
    assert "sweep.best_epoch" not in nested[1].data.tags and "best_epoch" not in nested[1].data.metrics
    # every trial's run records the train and val splits it saw, never the sealed test split
    expected = {(f"images/{s}", split_digest(splits, s), c) for s, c in (("train", "training"), ("val", "validation"))}
    for run in nested.values():
        seen = {(i.dataset.name, i.dataset.digest, input_context(i)) for i in run.inputs.dataset_inputs}
        assert seen == expected
    assert nested[2].data.tags["sweep.fail_reason"] == "non-finite loss: training loss became nan"
    assert nested[3].data.tags["sweep.fail_reason"] == "interrupted (SIGTERM)"
    assert nested[3].data.tags["sweep.retry_of"] == "2"


def test_a_trial_that_failed_before_its_run_started_logs_nothing(store):
    uri, tracker = store
    MLflowObserver(tracker, "s").trial_ended(_ended(0, "FAIL", 0, reason="ConfigError: bad value"))
    assert _nested(uri)[2] == {}


def test_open_parent_reuses_the_run_of_the_study(store):
    uri, tracker = store
    tracker.close_parent("KILLED")
    again = Tracker(uri, "exp")
    assert again.open_parent("s", tracker.parent_id, {}) == tracker.parent_id
    client, parents, _ = _nested(uri)
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"


def test_a_brief_outage_at_start_makes_no_second_parent_run(store, monkeypatch):
    uri, tracker = store
    tracker.close_parent("KILLED")
    monkeypatch.setattr(mlflow_runs, "RETRY_DELAYS", (0.01, 0.01))
    again = Tracker(uri, "exp")
    real, calls = again.client.get_run, []

    def flaky(run_id):
        calls.append(run_id)
        if len(calls) == 1:  # what MLflow raises when the server does not answer
            raise MlflowException(
                "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/get failed with "
                "exception ConnectionError('Connection refused')"
            )
        return real(run_id)

    monkeypatch.setattr(again.client, "get_run", flaky)
    assert again.open_parent("s", tracker.parent_id, {}) == tracker.parent_id
    assert len(calls) == 2
    _, parents, _ = _nested(uri)
    assert [p.info.run_id for p in parents] == [tracker.parent_id]


def test_a_store_that_stays_down_is_an_error_not_a_new_parent_run(store, monkeypatch):
    uri, tracker = store
    monkeypatch.setattr(mlflow_runs, "RETRY_DELAYS", (0.01, 0.01))
    again = Tracker(uri, "exp")

    def down(run_id):  # what MLflow's SQL store raises while the database is locked
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(again.client, "get_run", down)
    with pytest.raises(TrackingError) as err:
        again.open_parent("s", tracker.parent_id, {})
    assert str(err.value) == (
        f"MLflow tracking store {uri} did not answer for the study's parent run {tracker.parent_id}: "
        "(sqlite3.OperationalError) database is locked; run the same command again once it is back"
    )
    assert len(_nested(uri)[1]) == 1


def test_a_parent_run_the_store_does_not_have_is_replaced(store):
    uri, tracker = store
    tracker.close_parent("FINISHED")
    again = Tracker(uri, "exp")
    new = again.open_parent("s", "0" * 32, {})  # e.g. the study's run lives in another store
    assert new != tracker.parent_id
    assert len(_nested(uri)[1]) == 2


def test_store_errors_mid_study_warn_once_and_bugs_propagate(store, monkeypatch):
    _, tracker = store
    warnings = []
    tracker.warn = warnings.append
    run_id = tracker.start_nested_run("s", 0, {})
    real = tracker.client.log_batch

    def down(*args, **kwargs):
        raise MlflowException("API request failed with exception ConnectionError")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    tracker.log_metrics(run_id, {"val_accuracy": 0.5}, step=0)
    tracker.log_metrics(run_id, {"val_accuracy": 0.6}, step=1)
    assert not tracker.healthy and len(warnings) == 1
    assert warnings[0].startswith(f"MLflow store {tracker.uri} failed (API request failed with exception")
    monkeypatch.setattr(tracker.client, "log_batch", real)
    assert tracker.start_nested_run("s", 1, {}) is not None  # a probe: the store answers again
    assert tracker.healthy and warnings[1] == f"MLflow store {tracker.uri} answers again; logging resumed"

    def bug(*args, **kwargs):
        raise TypeError("log_batch() got an unexpected keyword argument 'metric'")

    monkeypatch.setattr(tracker.client, "log_batch", bug)
    with pytest.raises(TypeError):
        tracker.log_metrics(run_id, {"val_accuracy": 0.5}, step=0)


def _trial(study, state, history, **attrs):
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-3, 1e-1)},
            value=max(h["val_accuracy"] for h in history) if state == TrialState.COMPLETE else None,
            intermediate_values={h["epoch"]: h["val_accuracy"] for h in history},
            user_attrs={**dict(epoch_attr(EpochResult(**h)) for h in history), **attrs},
        )
    )


def test_reconcile_closes_stale_runs_and_rebuilds_missing_ones(store, cfg, tmp_path):
    uri, tracker = store
    splits = _splits(tmp_path)
    log_study(tracker, tracker.parent_id, cfg, splits)
    history = [vars(_epoch(0, 0.5)), vars(_epoch(1, 0.75))]
    observer = MLflowObserver(tracker, "s")
    # Trials 0, 2 and 3 had runs that were left RUNNING (the store went down, or the process
    # died); trial 1 never reached MLflow.
    for number in (0, 2, 3):
        observer.trial_started(TrialStarted(number, {"lr": 0.01}, cfg, None))
    observer.epoch_finished(0, _epoch(0, 0.5))
    study = optuna.create_study(direction="maximize")
    _trial(study, TrialState.COMPLETE, history)
    _trial(study, TrialState.FAIL, history[:1], fail_reason="non-finite loss: training loss became nan")
    _trial(study, TrialState.FAIL, history[:1])  # its process died: no reason recorded
    _trial(study, TrialState.RUNNING, history[:1])
    trials = study.get_trials()

    assert reconcile(tracker, trials, "s") == [1]
    client, _, nested = _nested(uri)
    assert [nested[n].info.status for n in range(4)] == ["FINISHED", "FAILED", "FAILED", "RUNNING"]
    assert [(m.step, m.value) for m in client.get_metric_history(nested[0].info.run_id, "val_accuracy")] == [
        (0, 0.5),
        (1, 0.75),
    ]  # epoch 1 backfilled from Optuna's record
    assert nested[1].data.tags["sweep.synced"] == "true"
    assert nested[1].data.tags["sweep.fail_reason"] == "non-finite loss: training loss became nan"
    assert [nested[n].info.run_name for n in range(4)] == ["trial-0", "trial-1 (failed)", "trial-2 (failed)", "trial-3"]
    assert [nested[n].data.metrics.get("best_val_accuracy") for n in range(4)] == [0.75, 0.5, 0.5, None]
    # the rebuilt run records the train and val splits the parent run recorded
    rebuilt = {(i.dataset.digest, input_context(i)) for i in nested[1].inputs.dataset_inputs}
    assert rebuilt == {(split_digest(splits, "train"), "training"), (split_digest(splits, "val"), "validation")}
    assert [m.step for m in client.get_metric_history(nested[1].info.run_id, "val_accuracy")] == [0]
    assert nested[2].data.tags["sweep.fail_reason"] == "stale: the process running this trial stopped (heartbeat lost)"

    assert reconcile(tracker, trials, "s") == [], "a second reconcile changes nothing"
    again = _nested(uri)[2]
    assert {n: (r.info.run_id, r.info.status) for n, r in again.items()} == {
        n: (r.info.run_id, r.info.status) for n, r in nested.items()
    }


def test_parent_run_records_study_settings_and_the_three_splits(store, tmp_path, image_root):
    uri, tracker = store
    tree = study_dict(
        image_root,
        study={"sampler": {"type": "tpe", "seed": 3}, "pruner": {"type": "percentile", "percentile": 40}},
        search_space={
            "lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
            "freeze_depth": {"type": "int", "low": 0, "high": 2},
            "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
            "momentum": {"type": "float", "low": 0.5, "high": 0.9, "step": 0.1},
        },
    )
    cfg = load_study(write_study(tmp_path / "s.yaml", tree))
    splits = build_splits(image_root, "train", "val", None, 0.5, 0)
    log_study(tracker, tracker.parent_id, cfg, splits)
    run = MlflowClient(uri).get_run(tracker.parent_id)
    params = run.data.params
    assert params == {k: str(v) for k, v in study_params(cfg).items()}
    assert (params["arch"], params["weights"], params["n_trials"]) == ("resnet18", "none", "2")
    assert params["sampler"] == "tpe (seed=3)"
    assert params["pruner"] == "percentile (n_startup_trials=2, n_warmup_steps=1, percentile=40)"
    assert params["metric"] == "val_accuracy (maximize)"
    assert params["space.lr"] == "float [0.001, 0.05] log"
    assert params["space.freeze_depth"] == "int [0, 2]"
    assert params["space.optimizer"] == "categorical ['sgd', 'adamw']"
    assert params["space.momentum"] == "float [0.5, 0.9] step 0.1"
    inputs = {input_context(i): i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    assert inputs["test"].name == "images/test" and inputs["test"].digest == split_digest(splits, "test")
    profile = json.loads(inputs["training"].profile)
    assert profile == {
        "num_rows": 16,
        "images_per_class": {"ants": 8, "bees": 8},
        "class_to_idx": {"ants": 0, "bees": 1},
    }

    # resumed with more trials: the first params stay (MLflow params never change), the change is tagged
    more = load_study(tmp_path / "s.yaml", ["study.n_trials=5"])
    log_study(tracker, tracker.parent_id, more, splits)
    again = MlflowClient(uri).get_run(tracker.parent_id)
    assert again.data.params["n_trials"] == "2"
    assert json.loads(again.data.tags["sweep.changed_params"]) == {"n_trials": "2 -> 5"}
    assert len(again.inputs.dataset_inputs) == 3, "logging the same splits again adds no input"
