"""One typed reading of what a trial stores: `TrialRecord.from_frozen` over real stored trials."""

from __future__ import annotations

import math

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline.search import TrialRecord
from pipeline.search._history import epoch_attr
from pipeline.training import EpochResult


def _stored(**kwargs) -> optuna.trial.FrozenTrial:
    """The trial as read back from a real (in-memory) storage, so numbers and states are the storage's."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(**kwargs))
    return study.get_trials()[-1]


def test_a_complete_trial_reads_every_key_it_stored():
    epochs = [EpochResult(i, 0.5 - 0.1 * i, 0.7 + 0.1 * i, 0.4, 0.75 + 0.05 * i, 0.01, 3.25) for i in range(2)]
    attrs = dict(epoch_attr(e) for e in epochs)
    attrs |= {"best_epoch": 1, "epochs_run": 2, "seconds": 7.5, "mlflow_run_id": "abc", "retry_of": 4}
    attrs |= {"rerun_of": 2, "seed_index": 1, "fail_reason": None, "interrupted": False}
    r = TrialRecord.from_frozen(
        _stored(
            state=TrialState.COMPLETE,
            value=0.8,
            params={"lr": 0.01},
            distributions={"lr": FloatDistribution(1e-4, 0.1, log=True)},
            user_attrs=attrs,
        )
    )
    assert (r.number, r.state, r.value, r.params) == (0, "COMPLETE", 0.8, {"lr": 0.01})
    assert (r.best_epoch, r.epochs_run, r.seconds, r.mlflow_run_id, r.retry_of) == (1, 2, 7.5, "abc", 4)
    assert (r.rerun_of, r.seed_index, r.baseline, r.fail_reason, r.interrupted) == (2, 1, None, None, False)
    assert r.is_rerun and not r.is_probe and r.role == "rerun of 2 seed 1"
    assert r.roles() == {"rerun_of": 2, "seed_index": 1}
    assert [h["val_accuracy"] for h in r.history] == [0.75, 0.8]
    assert [h["epoch"] for h in r.history] == [0, 1]


def test_a_failed_trial_of_an_older_study_reads_with_defaults():
    # Older studies stored one `history` list and no epochs_run / seconds.
    history = [{"epoch": 0, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 0.9, "val_accuracy": 0.5}]
    r = TrialRecord.from_frozen(
        _stored(
            state=TrialState.FAIL,
            user_attrs={"history": history, "fail_reason": "non-finite loss", "interrupted": True},
        )
    )
    assert (r.state, r.value, r.best_epoch, r.seconds, r.mlflow_run_id) == ("FAIL", None, None, None, None)
    assert (r.epochs_run, r.fail_reason, r.interrupted) == (1, "non-finite loss", True)
    assert r.history == tuple(history) and r.role == "search" and r.roles() == {}


def test_the_probe_reads_as_the_probe():
    epoch = EpochResult(0, math.nan, 0.9, 0.3, 0.875, 0.0, 12.0)
    attrs = {"baseline": "linear_probe", "checkpoint": "/store/linear-probe-1.pt", **dict([epoch_attr(epoch)])}
    r = TrialRecord.from_frozen(_stored(state=TrialState.COMPLETE, value=0.875, user_attrs=attrs))
    assert r.is_probe and r.role == "linear_probe" and r.roles() == {"baseline": "linear_probe"}
    assert r.checkpoint == "/store/linear-probe-1.pt" and r.epochs_run == 1
    assert r.history[0]["val_accuracy"] == 0.875 and math.isnan(r.history[0]["train_loss"])
