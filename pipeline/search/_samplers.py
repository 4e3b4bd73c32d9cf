"""Search space -> Optuna: suggestions, the full grid, samplers and pruners by name.

Seeding (../shared/DESIGN.md, "many machines"): a sampler seeded once per process would replay
the same draws in every process, so each resume would re-try trial 0's parameters and two
workers would duplicate each other. TPE, random and CMA-ES therefore run behind
`TrialSeededSampler`, which builds a fresh sampler seeded with `seed + trial.number` for each
trial: one worker's study is reproducible (same seed, same machine kind -> same trials) and
concurrent workers draw differently because trial numbers are unique across the study. Grid and
QMC samplers keep their base seed: both index their sequence by trial number already.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import CategoricalParam, FloatParam, IntParam, StudyConfig
from pipeline.core import ConfigError

SearchSpace = Mapping[str, FloatParam | IntParam | CategoricalParam]
GridValue = str | int | float | bool


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """Sample every search-space entry with the matching `trial.suggest_*` call.

    Returns:
        {parameter name: sampled value}, in the order of the search space.
    """
    params: dict[str, Any] = {}
    for name, p in space.items():
        if isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        else:
            params[name] = trial.suggest_categorical(name, list(p.choices))
    return params


def grid(space: SearchSpace) -> dict[str, list[GridValue]]:
    """The full grid for `GridSampler`: int and stepped-float ranges enumerated, choices as given.

    Raises:
        ConfigError: a float entry has no `step` (study-file validation refuses that already).
    """
    out: dict[str, list[GridValue]] = {}
    for name, p in space.items():
        if isinstance(p, CategoricalParam):
            out[name] = list(p.choices)
        elif isinstance(p, IntParam):
            out[name] = list(range(p.low, p.high + 1, p.step))
        elif p.step is None:
            raise ConfigError(f"search_space.{name}: the grid sampler needs a `step` on float parameters")
        else:
            n = int(math.floor((p.high - p.low) / p.step + 1e-9))
            out[name] = [round(p.low + i * p.step, 12) for i in range(n + 1)]
    return out


class TrialSeededSampler(BaseSampler):
    """Delegates to a fresh sampler per trial, seeded with `(seed + trial.number) % 2**32`.

    Optuna calls `before_trial` first for every trial, so the inner sampler is built there; the
    other hooks reuse it while they are called for the same trial and build the right one
    otherwise (e.g. `after_trial` on a trial that another process started). One trial at a
    time: `study.optimize(n_jobs=1)`, which is how `sweep` runs (workers are processes).
    Seeds `s` and `s + 1` give the same draws shifted by one trial: choose seeds far apart.

    Args:
        factory: builds the inner sampler from a seed (e.g. `lambda s: TPESampler(seed=s)`).
        seed: the study file's `study.sampler.seed`.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._number: int | None = None
        self._inner = factory(seed % 2**32)

    def seed_for(self, number: int) -> int:
        """The seed of trial `number`'s sampler: `(seed + number) % 2**32`."""
        return (self._seed + number) % 2**32

    def _sampler_for(self, trial: FrozenTrial) -> BaseSampler:
        if trial.number != self._number:
            self._inner = self._factory(self.seed_for(trial.number))
            self._number = trial.number
        return self._inner

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler_for(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler_for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler_for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler_for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._sampler_for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def _sampler_factory(cfg: StudyConfig) -> Callable[[int | None], BaseSampler]:
    kind = cfg.study.sampler.type
    if kind == "tpe":
        # constant_liar: a worker's running trials count as bad, so parallel workers spread out.
        return lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "random":
        return lambda seed: optuna.samplers.RandomSampler(seed=seed)
    if kind == "cmaes":
        return lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if kind == "grid":
        space = grid(cfg.search_space)
        return lambda seed: optuna.samplers.GridSampler(space, seed=seed)
    return lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def make_sampler(cfg: StudyConfig) -> BaseSampler:
    """Sampler by name (`study.sampler.type`): tpe (default), random, grid, cmaes, qmc.

    Seeded by `study.sampler.seed`; tpe, random and cmaes per trial (`TrialSeededSampler`),
    grid and qmc once (their sequences are indexed by trial number). A null seed draws from
    the operating system's entropy: nothing is reproducible then.
    """
    factory = _sampler_factory(cfg)
    seed = cfg.study.sampler.seed
    if seed is None or cfg.study.sampler.type in ("grid", "qmc"):
        return factory(seed)
    return TrialSeededSampler(factory, seed)


def grid_exhausted(study: optuna.Study, cfg: StudyConfig) -> bool:
    """True for a grid study whose every grid point has a finished trial (any state)."""
    if cfg.study.sampler.type != "grid":
        return False
    sampler = optuna.samplers.GridSampler(grid(cfg.search_space), seed=cfg.study.sampler.seed)
    return sampler.is_exhausted(study)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruner by name (`study.pruner.type`): median (default), percentile, successive_halving,
    hyperband, none. Steps are epochs: hyperband's resources run from 1 to `training.epochs`."""
    p, epochs = cfg.study.pruner, cfg.training.epochs
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()
