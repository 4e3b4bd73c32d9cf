"""Trials table, compute accounting, selection and checkpoint clean-up on hand-made trials (no training)."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from pipeline.champion import _comparison as C
from pipeline.config import StudyConfig
from pipeline.core import RegistryError

from conftest import study_dict

LR = {"lr": FloatDistribution(0.001, 0.1, log=True)}


def _study_with(values_states: list[tuple[float | None, TrialState]], folder: Path | None = None) -> optuna.Study:
    """An in-memory study; with `folder`, each trial records a checkpoint file there."""
    study = optuna.create_study()
    for number, (value, state) in enumerate(values_states):
        extra = {"intermediate_values": {0: value}} if state == TrialState.PRUNED else {}
        attrs = {}
        if folder is not None:
            (folder / f"trial-{number}.pt").write_bytes(b"x")
            attrs["checkpoint"] = str(folder / f"trial-{number}.pt")
        study.add_trial(
            create_trial(state=state, value=value, params={"lr": 0.01}, distributions=LR, user_attrs=attrs, **extra)
        )
    return study


def test_selection_ties_go_to_the_lower_trial_number_and_follow_direction():
    Co, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
    study = _study_with([(0.8, Co), (0.9, Co), (0.9, Co), (1.0, P), (None, F)])
    assert C.ranked_complete(study.trials, "maximize")[0].number == 1
    assert [t.number for t in C.ranked_complete(study.trials, "maximize")] == [1, 2, 0]
    assert C.ranked_complete(study.trials, "minimize")[0].number == 0
    assert [t.number for t in C.ranked_complete(study.trials, "minimize")] == [0, 1, 2]


def test_no_complete_trial_message_counts_states():
    study = _study_with([(0.5, TrialState.PRUNED), (None, TrialState.FAIL), (None, TrialState.FAIL)])
    with pytest.raises(RegistryError) as err:
        C.require_complete(study.trials, "s")
    assert str(err.value) == (
        "study 's' has no COMPLETE trial (1 pruned, 2 failed): nothing to test or register; "
        "run `sweep run` with this study file to add trials (raise --n-trials)"
    )
    with pytest.raises(RegistryError, match=r"^study 'e' has no COMPLETE trial \(no trials\)"):
        C.require_complete([], "e")


@pytest.mark.parametrize("keep_top_k, kept", [(0, [2]), (1, [2]), (2, [0, 2]), (9, [0, 1, 2])])
def test_clean_checkpoints_keeps_top_k_complete_and_selected(tmp_path, keep_top_k, kept):
    Co, P = TrialState.COMPLETE, TrialState.PRUNED
    study = _study_with([(0.8, Co), (0.7, Co), (0.9, Co), (1.0, P)], tmp_path)
    trials = study.get_trials()
    selected = C.ranked_complete(trials, "maximize")[0]
    result = C.clean_checkpoints(trials, selected, "maximize", keep_top_k, "unused")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"trial-{n}.pt" for n in kept] + ["trial-3.pt"])  # the PRUNED trial's file untouched
    assert sorted(p.name for p in result.kept) == [f"trial-{n}.pt" for n in kept]
    assert sorted(p.name for p in result.deleted) == [f"trial-{n}.pt" for n in (0, 1, 2) if n not in kept]
    again = C.clean_checkpoints(trials, selected, "maximize", keep_top_k, "unused")
    assert again.deleted == () and sorted(p.name for p in again.kept) == [f"trial-{n}.pt" for n in kept]


def test_best_of_history_keeps_the_earlier_epoch_on_ties():
    h = [
        {"epoch": i, "val_accuracy": a, "val_loss": loss}
        for i, (a, loss) in enumerate([(0.5, 0.9), (0.8, 0.4), (0.8, 0.4), (0.7, 0.6)])
    ]
    assert C.best_of_history(h, "val_accuracy", "maximize") == (0.8, 1)
    assert C.best_of_history(h, "val_loss", "minimize") == (0.4, 1)
    value, epoch = C.best_of_history([], "val_accuracy", "maximize")
    assert math.isnan(value) and epoch is None


def test_trials_frame_of_a_val_loss_study_sorts_ascending_and_puts_unfinished_last(tmp_path):
    tree = study_dict(tmp_path, study={"name": "loss", "metric": "val_loss", "direction": "minimize"})
    cfg = StudyConfig.model_validate(tree)
    study = optuna.create_study(direction="minimize")
    dist = {"lr": FloatDistribution(0.001, 0.05, log=True), "freeze_depth": IntDistribution(0, 2)}
    for loss, acc in [(0.6, 0.7), (0.3, 0.9), (0.9, 0.5)]:
        history = [
            {"epoch": 0, "val_loss": loss + 0.1, "val_accuracy": acc - 0.1},
            {"epoch": 1, "val_loss": loss, "val_accuracy": acc},
        ]
        study.add_trial(
            create_trial(
                value=loss,
                params={"lr": 0.01, "freeze_depth": 1},
                distributions=dist,
                user_attrs={"history": history, "epochs_run": 2, "seconds": 1.0},
            )
        )
    # a FAIL trial whose one epoch beats every finished trial still sorts last
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"lr": 0.02, "freeze_depth": 0},
            distributions=dist,
            user_attrs={"history": [{"epoch": 0, "val_loss": 0.1, "val_accuracy": 0.95}]},
        )
    )
    frame = C.trials_frame(study, cfg)
    assert list(frame.columns) == [
        "number",
        "state",
        "role",
        "lr",
        "freeze_depth",
        "best_val_loss",
        "best_val_accuracy",
        "best_epoch",
        "epochs_run",
        "seconds",
        "mlflow_run_id",
    ]
    assert list(frame["number"]) == [1, 0, 2, 3]
    assert list(frame["best_val_loss"]) == [0.3, 0.6, 0.9, 0.1]
    assert list(frame["best_epoch"]) == [1, 1, 1, 0]
    assert list(frame["epochs_run"]) == [2, 2, 2, 1]  # no `epochs_run` attr: the history's length


def _trial(
    number: int,
    state: TrialState,
    seconds: float | None = None,
    history: list | None = None,
    epochs_run: int | None = None,
    params: dict | None = None,
    duration_s: float | None = None,
) -> FrozenTrial:
    start = dt.datetime(2025, 1, 1, 12, 0, 0)
    attrs: dict = {"history": history or []}
    if seconds is not None:
        attrs["seconds"] = seconds
    if epochs_run is not None:
        attrs["epochs_run"] = epochs_run
    params = params or {}
    return FrozenTrial(
        number=number,
        state=state,
        value=0.5 if state == TrialState.COMPLETE else None,
        datetime_start=start,
        datetime_complete=None if duration_s is None else start + dt.timedelta(seconds=duration_s),
        params=params,
        distributions={k: IntDistribution(1, 10) for k in params},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def test_trial_seconds_prefers_the_recorded_time_then_optunas_duration():
    assert C.trial_seconds(_trial(0, TrialState.COMPLETE, seconds=7.5, duration_s=99.0)) == 7.5
    assert C.trial_seconds(_trial(1, TrialState.FAIL, duration_s=42.0)) == 42.0
    assert math.isnan(C.trial_seconds(_trial(2, TrialState.RUNNING)))


def test_compute_spent_prices_each_pruned_trials_missing_epochs():
    epochs = [{"epoch": i, "seconds": s} for i, s in enumerate([2.0, 4.0])]
    trials = [
        _trial(0, TrialState.COMPLETE, seconds=30.0, epochs_run=5),
        # pruned after 2 of 5 epochs; per-epoch times recorded: mean 3 s
        _trial(1, TrialState.PRUNED, seconds=6.5, history=epochs, epochs_run=2),
        # pruned after 1 of its own 4 epochs (it sampled `epochs`); no per-epoch times: 8 s / 1 epoch
        _trial(2, TrialState.PRUNED, seconds=8.0, epochs_run=1, params={"epochs": 4}),
        _trial(3, TrialState.FAIL, epochs_run=0, duration_s=1.5),
        _trial(4, TrialState.RUNNING, epochs_run=1),  # no time known yet: counts 0 s
    ]
    c = C.compute_spent(trials, planned_epochs=5)
    assert (c.trial_epochs, c.pruned_trials, c.epochs_saved) == (9, 2, 6)
    assert c.seconds == pytest.approx(30.0 + 6.5 + 8.0 + 1.5)
    assert c.seconds_saved == pytest.approx(3 * 3.0 + 3 * 8.0)
    assert c.saved_fraction == pytest.approx(6 / 15)
    assert C.compute_spent([], 5).saved_fraction == 0.0
