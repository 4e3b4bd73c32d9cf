"""Search space -> Optuna: per-trial seeding, and one tiny study for each sampler and pruner the
study file accepts. Objectives are synthetic (no training), so every state and count is exact on
any CPU."""

from __future__ import annotations

import itertools
import math

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.config import load_study
from pipeline.search._samplers import TrialSeededSampler, grid, grid_exhausted, make_pruner, make_sampler, suggest

from conftest import study_dict, write_study

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    "freeze_depth": {"type": "int", "low": 0, "high": 4},
}


@pytest.fixture
def make_cfg(tmp_path):
    """Study config with the given sections (the data root is never read here)."""

    def make(**sections):
        return load_study(write_study(tmp_path / "study.yaml", study_dict(tmp_path / "images", **sections)))

    return make


def _bowl(cfg):
    """Objective on the config's space: best near lr=1e-2, momentum=0.9, freeze_depth=2."""

    def objective(trial):
        p = suggest(trial, cfg.search_space)
        return -((math.log10(p["lr"]) + 2) ** 2) - (p["momentum"] - 0.9) ** 2 - (p["freeze_depth"] - 2) ** 2 / 10

    return objective


def _study(cfg, storage=None, name="s"):
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        load_if_exists=True,
    )


def _drawn(study):
    return [tuple(sorted(t.params.items())) for t in study.trials]


# ---- seeding -------------------------------------------------------------------------------------


def test_each_trial_draws_from_seed_plus_its_number(make_cfg):
    cfg = make_cfg(study={"sampler": {"type": "random", "seed": 7}}, search_space=SPACE)
    study = _study(cfg)
    study.optimize(_bowl(cfg), n_trials=4)
    for trial in study.trials:
        alone = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7 + trial.number))
        alone.optimize(_bowl(cfg), n_trials=1)
        assert trial.params == alone.trials[0].params


def test_same_seed_reproduces_the_trials_and_another_seed_does_not(make_cfg):
    # 14 trials: past TPE's 10 random start-up trials, so the model-based draws are covered too.
    cfg = make_cfg(study={"sampler": {"type": "tpe", "seed": 3}}, search_space=SPACE)
    first, second = _study(cfg), _study(cfg)
    first.optimize(_bowl(cfg), n_trials=14)
    second.optimize(_bowl(cfg), n_trials=14)
    assert _drawn(first) == _drawn(second)
    other = _study(make_cfg(study={"sampler": {"type": "tpe", "seed": 1000}}, search_space=SPACE))
    other.optimize(_bowl(cfg), n_trials=14)
    assert not set(_drawn(other)) & set(_drawn(first))


@pytest.mark.parametrize("kind", ["tpe", "random", "cmaes"])
def test_resumed_study_and_two_workers_never_repeat_parameters(make_cfg, kind):
    cfg = make_cfg(study={"sampler": {"type": kind, "seed": 0}}, search_space=SPACE)
    storage = optuna.storages.InMemoryStorage()
    # Two workers: separate study objects with their own samplers on one storage, interleaved.
    workers = [_study(cfg, storage), _study(cfg, storage)]
    objective = _bowl(cfg)
    for _ in range(4):
        asked = [(w, w.ask()) for w in workers]
        for worker, trial in asked:
            worker.tell(trial, objective(trial))
    _study(cfg, storage).optimize(objective, n_trials=4)  # a resumed run: a new process, same seed
    drawn = _drawn(workers[0])
    assert len(drawn) == 12 and len(set(drawn)) == 12

    # The same scene with samplers seeded once per process repeats draws: the check above bites.
    plain = optuna.storages.InMemoryStorage()
    once = [
        optuna.create_study(
            study_name="p", storage=plain, load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0)
        )
        for _ in range(2)
    ]
    asked = [(w, w.ask()) for w in once]
    for worker, trial in asked:
        worker.tell(trial, objective(trial))
    assert _drawn(once[0])[0] == _drawn(once[0])[1]


def test_trial_seeded_sampler_is_used_for_tpe_random_cmaes_only(make_cfg):
    def kind(name, seed=0):
        space = {"lr": {"type": "categorical", "choices": [0.01, 0.1]}}
        return make_sampler(make_cfg(study={"sampler": {"type": name, "seed": seed}}, search_space=space))

    assert all(isinstance(kind(k), TrialSeededSampler) for k in ("tpe", "random", "cmaes"))
    assert isinstance(kind("grid"), optuna.samplers.GridSampler)
    assert isinstance(kind("qmc"), optuna.samplers.QMCSampler)
    assert isinstance(kind("tpe", seed=None), optuna.samplers.TPESampler)  # nothing to derive from


# ---- samplers ------------------------------------------------------------------------------------


def test_grid_sampler_visits_each_point_once_then_stops_the_study(make_cfg):
    space = {
        "lr": {"type": "categorical", "choices": [0.01, 0.1]},
        "momentum": {"type": "float", "low": 0.8, "high": 0.9, "step": 0.05},
        "freeze_depth": {"type": "int", "low": 0, "high": 2, "step": 2},
    }
    cfg = make_cfg(study={"sampler": {"type": "grid", "seed": 0}}, search_space=space)
    assert grid(cfg.search_space) == {"lr": [0.01, 0.1], "momentum": [0.8, 0.85, 0.9], "freeze_depth": [0, 2]}
    study = _study(cfg)
    assert not grid_exhausted(study, cfg)
    study.optimize(_bowl(cfg))  # no n_trials: the grid sampler stops the study itself
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12
    expected = itertools.product([0.01, 0.1], [0.8, 0.85, 0.9], [0, 2])
    assert sorted((t.params["lr"], t.params["momentum"], t.params["freeze_depth"]) for t in study.trials) == sorted(
        expected
    )
    assert grid_exhausted(study, cfg)


def test_cmaes_sampler_runs_a_study_within_bounds(make_cfg):
    cfg = make_cfg(study={"sampler": {"type": "cmaes", "seed": 0}}, search_space=SPACE)
    study = _study(cfg)
    study.optimize(_bowl(cfg), n_trials=10)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 10
    assert len(set(_drawn(study))) == 10
    for t in study.trials:
        assert 1e-4 <= t.params["lr"] <= 1e-1 and 0.5 <= t.params["momentum"] <= 0.99
        assert t.params["freeze_depth"] in range(5)


def test_qmc_sampler_continues_its_sequence_when_resumed(make_cfg):
    cfg = make_cfg(study={"sampler": {"type": "qmc", "seed": 0}}, search_space=SPACE)
    storage = optuna.storages.InMemoryStorage()
    _study(cfg, storage).optimize(_bowl(cfg), n_trials=4)
    resumed = _study(cfg, storage)  # a new process: a new sampler with the same base seed
    resumed.optimize(_bowl(cfg), n_trials=4)
    assert [t.state for t in resumed.trials] == [TrialState.COMPLETE] * 8
    straight = _study(cfg)
    straight.optimize(_bowl(cfg), n_trials=8)
    assert _drawn(resumed) == _drawn(straight)
    assert len(set(_drawn(resumed))) == 8


# ---- pruners -------------------------------------------------------------------------------------

CURVE_SPACE = {"lr": {"type": "float", "low": 0.01, "high": 1.0}}


def _curves(make_cfg, pruner: dict, qualities: list[float], epochs: int = 9):
    """A study whose trial `i` (enqueued with lr = quality) reports `q * (step + 1) / epochs`
    at steps 0..epochs-1; returns (state letter, steps reported) per trial."""
    cfg = make_cfg(
        study={"pruner": {"n_startup_trials": 2, "n_warmup_steps": 0, **pruner}},
        training={"epochs": epochs},
        search_space=CURVE_SPACE,
    )
    study = _study(cfg, name=f"curves-{pruner['type']}")  # hyperband's brackets hash the name
    for q in qualities:
        study.enqueue_trial({"lr": q})

    def objective(trial):
        q = suggest(trial, cfg.search_space)["lr"]
        for step in range(epochs):
            trial.report(q * (step + 1) / epochs, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return q

    study.optimize(objective, n_trials=len(qualities))
    return [(t.state.name, len(t.intermediate_values)) for t in study.trials]


def test_percentile_pruner_keeps_the_top_quarter(make_cfg):
    states = _curves(make_cfg, {"type": "percentile", "percentile": 25.0}, [0.9, 0.8, 0.95, 0.85, 0.1])
    # After 2 start-up trials, a trial survives a step only in the best 25% of the values there.
    assert states == [("COMPLETE", 9), ("COMPLETE", 9), ("COMPLETE", 9), ("PRUNED", 1), ("PRUNED", 1)]


def test_successive_halving_pruner_stops_the_weak_at_the_first_rung(make_cfg):
    states = _curves(make_cfg, {"type": "successive_halving"}, [0.9, 0.8, 0.1, 0.95, 0.2])
    assert states == [("COMPLETE", 9), ("COMPLETE", 9), ("PRUNED", 2), ("COMPLETE", 9), ("PRUNED", 2)]


def test_hyperband_pruner_prunes_within_its_brackets(make_cfg):
    states = _curves(make_cfg, {"type": "hyperband"}, [0.9, 0.8, 0.7, 0.1, 0.95, 0.2, 0.85, 0.05])
    # Three brackets (chosen from the study name and trial number) run successive halving apart,
    # with first rungs at epochs 1, 3 and 9. 0.7 (bracket 0, with 0.9) and 0.85 (bracket 1, with
    # 0.95) lose to a rival; 0.1 is the first trial of bracket 1; 0.2 and 0.05 share bracket 2,
    # whose only rung is the last epoch, with 0.8: nobody there is stopped early.
    assert states == [
        ("COMPLETE", 9),
        ("COMPLETE", 9),
        ("PRUNED", 2),
        ("COMPLETE", 9),
        ("COMPLETE", 9),
        ("COMPLETE", 9),
        ("PRUNED", 4),
        ("COMPLETE", 9),
    ]
