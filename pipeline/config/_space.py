"""How a study searches: sampler and pruner settings, and the search space (tunable names, and
float/int/categorical entries).

Every search-space entry is validated by building the Optuna distribution the sampler will use
(`optuna.distributions`, plain value classes): a range Optuna refuses fails when the study file is
loaded, not inside the sampler in every trial. This is the one study-file module that imports
Optuna (import-linter contract in pyproject.toml).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config._schema import Bool, Float, Frozen, Int, fail
from pipeline.core import first_line

if TYPE_CHECKING:  # imported where used: importing optuna adds ~0.5 s to start-up
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

# Search-space names -> where the sampled value lands in the study tree.
TUNABLE: dict[str, tuple[str, str]] = {
    "lr": ("training", "lr"),
    "momentum": ("training", "momentum"),
    "weight_decay": ("training", "weight_decay"),
    "nesterov": ("training", "nesterov"),
    "label_smoothing": ("training", "label_smoothing"),
    "freeze_depth": ("training", "freeze_depth"),
    "aug_strength": ("training", "aug_strength"),
    "epochs": ("training", "epochs"),
    "optimizer": ("training", "optimizer"),
    "step_size": ("training.scheduler", "step_size"),
    "gamma": ("training.scheduler", "gamma"),
    "batch_size": ("data", "batch_size"),
    "head_lr_mult": ("training", "head_lr_mult"),
}


class SamplerConfig(Frozen):
    type: Literal["tpe", "random", "grid", "cmaes", "qmc"] = "tpe"
    seed: Int | None = 0


class PrunerConfig(Frozen):
    type: Literal["median", "percentile", "successive_halving", "hyperband", "none"] = "median"
    n_startup_trials: Int = Field(2, ge=0)
    n_warmup_steps: Int = Field(1, ge=0)
    percentile: Float = Field(25.0, gt=0, lt=100)


class FloatParam(Frozen):
    type: Literal["float"]
    low: Float
    high: Float
    log: Bool = False
    step: Float | None = Field(None, gt=0)

    def distribution(self) -> FloatDistribution:
        """The `optuna.distributions.FloatDistribution` that `trial.suggest_float` builds."""
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise fail("step", "step cannot be combined with log: true")
        _optuna_accepts(self)
        return self


class IntParam(Frozen):
    type: Literal["int"]
    low: Int
    high: Int
    log: Bool = False
    step: Int = Field(1, ge=1)

    def distribution(self) -> IntDistribution:
        """The `optuna.distributions.IntDistribution` that `trial.suggest_int` builds."""
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        _optuna_accepts(self)
        return self


class CategoricalParam(Frozen):
    type: Literal["categorical"]
    choices: tuple[str | int | float | bool, ...] = Field(min_length=1)

    def distribution(self) -> CategoricalDistribution:
        """The `optuna.distributions.CategoricalDistribution` of `trial.suggest_categorical`."""
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    @model_validator(mode="after")
    def _optuna(self) -> CategoricalParam:
        _optuna_accepts(self)
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


def _optuna_accepts(p: FloatParam | IntParam | CategoricalParam) -> None:
    """Build the Optuna distribution now, so a range Optuna refuses (an int `log: true` with a step)
    fails here and not inside the sampler in every trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a high off the step grid: Optuna rounds it down (reachable_high)
        try:
            p.distribution()
        except ValueError as err:
            raise fail("", f"Optuna cannot sample this distribution: {first_line(err)}") from None


def _check_range(low: float, high: float, log: bool) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise fail("", f"low and high must be finite numbers (got low={low}, high={high})")
    if low > high:
        raise fail("low", f"{low} is greater than high ({high}); swap them")
    if log and low <= 0:
        raise fail("low", f"a log range must be > 0, but low is {low}; raise low or set log: false")


def reachable_high(p: FloatParam | IntParam) -> float:
    """The largest value the sampler can return (Optuna rounds `high` down onto the step grid)."""
    if p.step is None or p.log:
        return p.high
    n = math.floor((p.high - p.low) / p.step + 1e-9)
    return type(p.high)(p.low + n * p.step) if isinstance(p, IntParam) else round(p.low + n * p.step, 12)
