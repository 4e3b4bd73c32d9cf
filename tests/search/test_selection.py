"""Selection over synthetic FrozenTrials: top candidates, missing re-runs, the candidate table and
the champion, with exact numbers."""

from __future__ import annotations

import math

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from pipeline.search import _selection as S

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def trial(
    number: int, value: float | None, curve=(), state=TrialState.COMPLETE, lr: float = 0.01, **attrs
) -> FrozenTrial:
    """A FrozenTrial numbered `number`; `curve` gives intermediate values for steps 0, 1, ..."""
    made = optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"lr": lr},
        distributions=LR,
        user_attrs=attrs,
        intermediate_values=dict(enumerate(curve)),
    )
    made.number = number
    return made


def rerun(
    number: int, of: int, index: int, value: float | None, curve=(), state=TrialState.COMPLETE, lr: float = 0.01
) -> FrozenTrial:
    return trial(number, value, curve, state, lr, **S.rerun_attrs(of, index))


def today(trials, direction="maximize"):
    """Selection before this module: best COMPLETE trial by value, ties to the lower number."""
    sign = -1 if direction == "maximize" else 1
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    return min(done, key=lambda t: (sign * t.value, t.number)).number


# ---- top candidates -------------------------------------------------------------------------------


def test_top_candidates_by_value_ties_to_lower_number_without_reruns_with_baselines():
    trials = [
        trial(0, 0.80),
        trial(1, 0.90, baseline="linear_probe"),
        trial(2, 0.95),
        trial(3, None, state=TrialState.PRUNED),
        trial(4, 0.90),
        rerun(5, 2, 1, 0.99),
        trial(6, None, state=TrialState.FAIL),
        trial(7, 0.85, baseline="seed_recipe"),
    ]
    assert [t.number for t in S.top_candidates(trials, 3)] == [2, 1, 4]
    assert [t.number for t in S.top_candidates(trials, 10)] == [2, 1, 4, 7, 0]
    assert [t.number for t in S.top_candidates(trials, 2, "minimize")] == [0, 7]


def test_bad_k_r_and_direction_are_named():
    with pytest.raises(ValueError, match="k \\(candidates to re-run\\) must be at least 1, got 0"):
        S.top_candidates([], 0)
    with pytest.raises(ValueError, match="r \\(seed re-runs per candidate\\) must be at least 0, got -1"):
        S.rerun_plan([], 3, -1)
    with pytest.raises(ValueError, match="direction must be 'maximize' or 'minimize', got 'max'"):
        S.top_candidates([], 1, "max")
    with pytest.raises(ValueError, match="seed_index of a re-run starts at 1"):
        S.rerun_attrs(3, 0)


# ---- re-run plan ----------------------------------------------------------------------------------


def test_rerun_plan_lists_only_missing_reruns_and_skips_the_probe():
    trials = [
        trial(0, 0.80),
        trial(1, 0.97, baseline="linear_probe"),
        trial(2, 0.95),
        trial(3, 0.90),
        trial(4, 0.85, baseline="seed_recipe"),
    ]
    assert S.rerun_plan(trials, 3, 2) == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert S.rerun_plan(trials, 3, 0) == []
    assert S.rerun_plan(trials, 4, 1) == [(2, 1), (3, 1), (4, 1)]
    assert S.rerun_plan(trials, 3, 1, seedless=()) == [(1, 1), (2, 1), (3, 1)]

    # Done, running, queued and pruned re-runs are present; a failed one is missing again.
    trials += [
        rerun(5, 2, 1, 0.93),
        rerun(6, 2, 2, None, state=TrialState.FAIL),
        rerun(7, 3, 1, None, state=TrialState.RUNNING),
        rerun(8, 3, 2, None, state=TrialState.WAITING),
    ]
    assert S.rerun_plan(trials, 3, 2) == [(2, 2)]
    trials.append(rerun(9, 2, 2, None, state=TrialState.WAITING))  # the retry of trial 6
    assert S.rerun_plan(trials, 3, 2) == []
    assert S.rerun_plan(trials, 3, 3) == [(2, 3), (3, 3)]


def test_reruns_never_change_the_candidates_they_belong_to():
    trials = [trial(0, 0.90), trial(1, 0.80), rerun(2, 1, 1, 0.99), rerun(3, 1, 2, 0.99)]
    assert [t.number for t in S.top_candidates(trials, 1)] == [0]
    assert S.rerun_plan(trials, 1, 2) == [(0, 1), (0, 2)]


# ---- candidate table and champion -----------------------------------------------------------------


def test_candidate_table_exact_numbers():
    trials = [
        trial(0, 0.96, curve=(0.90, 0.96, 0.94), lr=0.08),  # lucky: its re-runs are worse
        trial(1, 0.94, curve=(0.92, 0.94, 0.94), lr=0.002),
        trial(2, 0.93, baseline="linear_probe"),
        trial(3, 0.70, curve=(0.70, 0.60, 0.65)),
        rerun(4, 0, 1, 0.90, curve=(0.88, 0.90, 0.86), lr=0.08),
        rerun(5, 0, 2, 0.92, curve=(0.92, 0.91, 0.90), lr=0.08),
        rerun(6, 1, 1, 0.95, curve=(0.90, 0.95, 0.95), lr=0.002),
        rerun(7, 1, 2, 0.93, curve=(0.91, 0.93, 0.93), lr=0.002),
        rerun(8, 1, 2, 0.10, curve=(0.10,), lr=0.002),  # a second worker ran seed 2 again: ignored
        rerun(9, 0, 3, None, state=TrialState.FAIL, lr=0.08),
    ]
    table = S.candidate_table(trials, k=3)
    assert list(table.columns) == list(S.TABLE_COLUMNS)
    assert table["number"].tolist() == [1, 2, 0]
    row = table.set_index("number")
    assert row.loc[1, "seed_values"] == (0.94, 0.95, 0.93)
    assert row.loc[0, "seed_values"] == (0.96, 0.90, 0.92)
    assert row.loc[1, "mean"] == pytest.approx(0.94) and row.loc[1, "std"] == pytest.approx(0.01)
    assert row.loc[0, "mean"] == pytest.approx(0.926666666667)
    assert row.loc[0, "std"] == pytest.approx(0.030550504633)
    assert (row.loc[0, "min"], row.loc[0, "max"], row.loc[0, "value"]) == (0.90, 0.96, 0.96)
    assert row.loc[0, "n_seeds"] == 3 and row.loc[2, "n_seeds"] == 1
    # best steps: trial 1 seeds (1, 1, 1); trial 0 seeds (1, 1, 0) -> mean 2/3
    assert row.loc[1, "mean_best_epoch"] == 1.0
    assert row.loc[0, "mean_best_epoch"] == pytest.approx(2 / 3)
    # mean curves: trial 1 (0.91, 0.94, 0.94) peaks at step 1, the tie keeps fewer epochs -> 2
    #              trial 0 (0.9, 0.923, 0.9) -> 2
    assert row.loc[1, "refit_epochs"] == 2 and row.loc[0, "refit_epochs"] == 2
    assert row.loc[2, "kind"] == "baseline" and row.loc[2, "baseline"] == "linear_probe"
    assert row.loc[1, "kind"] == "trial" and row.loc[1, "baseline"] == ""
    assert math.isnan(row.loc[2, "std"]) and math.isnan(row.loc[2, "mean_best_epoch"])
    assert row.loc[2, "refit_epochs"] is pd.NA
    assert row.loc[0, "params"] == {"lr": 0.08}
    # The search's winner (trial 0, 0.96) loses on the mean to trial 1 (0.94 > 0.9267 and > 0.93).
    assert S.choose_champion(table) == 1
    assert today(trials) == 0


def test_refit_epochs_uses_steps_every_seed_reported():
    trials = [trial(0, 0.9, curve=(0.5, 0.6, 0.9, 0.95)), rerun(1, 0, 1, 0.8, curve=(0.5, 0.8, 0.7))]
    table = S.candidate_table(trials, k=1)
    # common steps 0..2, mean curve (0.5, 0.7, 0.8) -> peak at step 2 -> 3 epochs
    assert table["refit_epochs"].tolist() == [3]


def test_ties_on_the_mean_go_to_lower_std_then_lower_number():
    trials = [
        trial(0, 0.90),
        trial(1, 0.90),
        trial(2, 0.90),
        rerun(3, 0, 1, 0.90),
        rerun(4, 1, 1, 0.94),
        rerun(5, 1, 2, 0.86),
        rerun(6, 2, 1, 0.92),
        rerun(7, 2, 2, 0.88),
    ]
    table = S.candidate_table(trials, k=3)
    # all means 0.90; stds: trial 0 -> 0, trial 2 -> 0.02, trial 1 -> 0.04
    assert table["number"].tolist() == [0, 2, 1]
    assert S.choose_champion(table) == 0
    # Equal means in exact arithmetic tie in floats too: mean(0.7, 0.8, 0.9) == 0.7999999999999999.
    float_tie = S.candidate_table(
        [trial(0, 1.0), rerun(1, 0, 1, 0.6), trial(2, 0.7), rerun(3, 2, 1, 0.8), rerun(4, 2, 2, 0.9)], k=2
    )
    assert float_tie["mean"].tolist() == [0.7999999999999999, 0.8]
    assert float_tie["number"].tolist() == [2, 0]  # std 0.1 beats std 0.283
    probe_tie = S.candidate_table([trial(0, 0.9), rerun(1, 0, 1, 0.9), trial(2, 0.9, baseline="linear_probe")])
    assert probe_tie["number"].tolist() == [0, 2]  # single seed counts as std 0: the number decides


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_r0_without_baselines_selects_as_before(direction):
    values = [0.81, 0.93, 0.88, 0.93, None, 0.79, 0.93, 0.90]
    states = [TrialState.COMPLETE] * 4 + [TrialState.PRUNED] + [TrialState.COMPLETE] * 3
    trials = [trial(i, v, state=s) for i, (v, s) in enumerate(zip(values, states, strict=True))]
    trials.append(trial(8, None, state=TrialState.FAIL))
    assert S.rerun_plan(trials, 3, 0, direction) == []
    for k in (1, 3, None):
        champion = S.choose_champion(S.candidate_table(trials, k, direction), direction)
        assert champion == today(trials, direction) == (1 if direction == "maximize" else 5)


def test_empty_study_has_no_champion():
    table = S.candidate_table([trial(0, None, state=TrialState.PRUNED)], k=3)
    assert table.empty and list(table.columns) == list(S.TABLE_COLUMNS)
    with pytest.raises(ValueError, match="no candidate to choose from: the study has no COMPLETE trial"):
        S.choose_champion(table)
