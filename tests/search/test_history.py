"""The per-epoch record of a trial in Optuna: one short user attr per epoch, read back in order."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.search import epoch_history
from pipeline.search._history import epoch_attr, stale_keys
from pipeline.training import EpochResult


def _epoch(epoch: int) -> EpochResult:
    return EpochResult(
        epoch,
        train_loss=0.336123456,
        train_accuracy=0.90163934,
        val_loss=0.18473219,
        val_accuracy=71 / 76,
        lr=0.001 * 0.1 ** (epoch // 7),
        seconds=12.4321,
    )


def test_one_rounded_attr_per_epoch_keyed_in_epoch_order():
    key, value = epoch_attr(_epoch(3))
    assert key == "epoch_03"
    assert value == {
        "train_loss": 0.3361,
        "train_acc": 0.9016,
        "val_loss": 0.184732,
        "val_acc": 0.934211,
        "lr": 0.001,
        "seconds": 12.4,
    }
    # what optuna-dashboard prints on one line for it stays short, however many epochs a trial runs
    assert len(f"{key} {json.dumps(value)}") <= 125
    assert sorted(epoch_attr(_epoch(e))[0] for e in (0, 2, 10, 11)) == ["epoch_00", "epoch_02", "epoch_10", "epoch_11"]


def test_history_reads_the_epochs_back_in_order_from_a_stored_trial():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    for epoch in (10, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9):  # stored out of order
        trial.set_user_attr(*epoch_attr(_epoch(epoch)))
    trial.set_user_attr("epochs_run", 11)
    study.tell(trial, 0.9)
    history = epoch_history(study.trials[0].user_attrs)
    assert [h["epoch"] for h in history] == list(range(11))
    rounded = {"train_loss": 0.3361, "train_accuracy": 0.9016, "val_loss": 0.184732, "val_accuracy": 0.934211}
    assert history[7] == {**dataclasses.asdict(_epoch(7)), **rounded, "lr": 1e-4, "seconds": 12.4}
    assert history[7]["lr"] == pytest.approx(1e-4) and history[7]["val_accuracy"] == pytest.approx(71 / 76, rel=1e-6)
    assert study.trials[0].state == TrialState.COMPLETE


def test_older_studies_single_history_list_is_read_as_before():
    legacy = [dataclasses.asdict(_epoch(0)), dataclasses.asdict(_epoch(1))]
    assert epoch_history({"history": legacy, "epochs_run": 2}) == legacy
    assert epoch_history({"epochs_run": 0}) == []


def test_a_retried_trials_inherited_epochs_are_reset_and_skipped():
    inherited = {"epoch_00": epoch_attr(_epoch(0))[1], "epoch_01": epoch_attr(_epoch(1))[1], "history": [], "host": "a"}
    assert stale_keys(inherited) == ["epoch_00", "epoch_01", "history"]
    reset = {**inherited, **dict.fromkeys(stale_keys(inherited)), "epoch_00": epoch_attr(_epoch(0))[1]}
    assert stale_keys({"epoch_00": None, "history": None}) == []
    assert [h["epoch"] for h in epoch_history(reset)] == [0]
