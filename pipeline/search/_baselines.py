"""Baselines and seed re-runs as Optuna trials (public Optuna API only; no MLflow here).

- **Linear probe** (`add_linear_probe`): computed once per study (`pipeline.training`) and added as a
  COMPLETE trial (`optuna.trial.create_trial` + `study.add_trial`) with no params and no
  intermediate values, so samplers that model params skip it and it never enters a pruner's
  per-step statistics (it does count as one COMPLETE trial toward a pruner's `n_startup_trials`).
  Its value is its val metric; its checkpoint is a `TrialCheckpoint` like any trial's. It does not
  count toward `n_trials` (`stopping.counted`) and gets no re-runs (its val value has no seed).
- **Seed recipe** (`enqueue_seed_recipe`): lr 0.001, momentum 0.9, freeze_depth 0,
  aug_strength 1 (the names the search space has) enqueued as the study's first trial; it is a
  point of the search like any other and counts toward `n_trials`.
- **Re-runs** (`run_reruns`): once `n_trials` is reached, the top `selection.top_k` candidates get
  `selection.reruns` further seeds as enqueued trials with the same params and user attrs
  `rerun_of`, `seed_index` (`selection.rerun_plan` says what is missing, so a resumed study or a
  second worker enqueues only what nobody has: the plan and the enqueue run under the study's
  "reruns" lock in its storage, `pipeline.distributed`). They are never pruned and not counted.

`add_baselines` runs under the study's start lock (`pipeline.stages`), so with many workers one
fits the probe and enqueues the seed recipe before any worker samples a trial.
Trials made here reach MLflow like any other: the observer for enqueued ones, `track.reconcile`
for the probe (a finished trial without a run gets one).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from pipeline import models as M
from pipeline import training as TR
from pipeline.config import TUNABLE, StudyConfig, checkpoint_dir
from pipeline.core import DataError
from pipeline.distributed import study_lock
from pipeline.search._events import TrialObserver
from pipeline.search._history import epoch_attr
from pipeline.search._record import (
    BASELINE_ATTR,
    BEST_EPOCH_ATTR,
    CHECKPOINT_ATTR,
    EPOCHS_RUN_ATTR,
    PROBE_ATTR,
    SECONDS_ATTR,
    record,
)
from pipeline.search._selection import rerun_attrs, rerun_plan
from pipeline.search._stopping import FailureBudget, counted
from pipeline.search._tune import Objective, count
from pipeline.training import Prepared, pick_device

SEED_RECIPE = {"lr": 0.001, "momentum": 0.9, "freeze_depth": 0, "aug_strength": 1.0}


def _with_role(study: optuna.Study, role: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if record(t).baseline == role]


def seed_recipe_params(cfg: StudyConfig) -> dict[str, Any]:
    """Fixed values for every search-space name: the seed recipe's (`SEED_RECIPE`, plus
    head_lr_mult 1: one lr for the whole model) where it has one, else the study file's own
    setting (e.g. its epochs); empty when the space has none of the recipe's names."""
    if not set(SEED_RECIPE) & set(cfg.search_space):
        return {}
    recipe = {**SEED_RECIPE, "head_lr_mult": 1.0}
    params = {}
    for name in cfg.search_space:
        section, key = TUNABLE[name]
        node: Any = cfg
        for part in section.split("."):
            node = getattr(node, part)
        params[name] = recipe.get(name, getattr(node, key))
    return params


def enqueue_seed_recipe(study: optuna.Study, cfg: StudyConfig) -> bool:
    """Enqueue the seed recipe as the first trial of a fresh study; returns True when enqueued.

    Nothing happens when the study already has a trial (a resume, or another worker got here
    first: call under the study's start lock) or when no recipe name is in the search space (the
    trial would be an ordinary sampled one).
    """
    params = seed_recipe_params(cfg)
    if not params or study.get_trials(deepcopy=False):
        return False
    study.enqueue_trial(params, user_attrs={BASELINE_ATTR: "seed_recipe"})
    return True


def add_linear_probe(
    study: optuna.Study, cfg: StudyConfig, prep: Prepared, say: Callable[[str], None] = print
) -> int | None:
    """Fit the linear probe on train, score it on val and add it as a COMPLETE trial (once per
    study: call under the study's start lock). Returns its trial number, None when the study has
    one already.

    Raises:
        ModelError: the arch has no plain Linear head (message says to turn the baseline off).
        ValueError: a class with fewer than 2 train images.
    """
    if _with_role(study, "linear_probe"):
        return None
    k, d = len(prep.splits.class_to_idx), cfg.data
    torch.manual_seed(d.seed)
    model, _ = M.build_model(prep.spec, k, prep.state)
    train, val = TR.probe_loaders(prep.splits, prep.preprocess, d.batch_size, d.num_workers)
    say("linear probe: extracting features and fitting (a baseline candidate, not counted in n_trials)")
    result = TR.fit_linear_probe(model, train, val, pick_device(cfg.training.device), d.seed, num_classes=k)
    value = result.val_accuracy if cfg.study.metric == "val_accuracy" else result.val_loss
    # One epoch, in the record every trial stores (`epoch_attr`); no training loss: no SGD ran.
    epoch = TR.EpochResult(
        0, math.nan, result.train_accuracy, result.val_loss, result.val_accuracy, 0.0, result.seconds
    )
    probe_id = uuid.uuid4().hex
    attrs = {
        BASELINE_ATTR: "linear_probe",
        PROBE_ATTR: probe_id,
        **dict([epoch_attr(epoch)]),
        BEST_EPOCH_ATTR: 0,
        EPOCHS_RUN_ATTR: 1,
        SECONDS_ATTR: result.seconds,
        "probe_C": result.C,
        "probe_cv_folds": result.cv_folds,
    }
    path = checkpoint_dir(cfg.study.name) / f"linear-probe-{probe_id[:8]}.pt"
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=value, user_attrs={**attrs, CHECKPOINT_ATTR: str(path)}
        )
    )
    number = next(t.number for t in _with_role(study, "linear_probe") if t.user_attrs.get(PROBE_ATTR) == probe_id)
    prep.checkpoint(cfg, result.state_dict, number, 0, value, {}).save(path)
    say(f"linear probe: trial {number}, {cfg.study.metric} {value:.4f} (C {result.C:.3g}, {result.seconds:.0f} s)")
    return number


def add_baselines(study: optuna.Study, cfg: StudyConfig, prep: Prepared, say: Callable[[str], None] = print) -> None:
    """The baselines the study file turns on (`selection.baselines`), before the search; call under
    the study's start lock (`pipeline.distributed`), once per worker start.

    Raises:
        DataError: the probe cannot be fitted (a class with fewer than 2 train images).
        ModelError: the arch has no plain Linear head for the probe.
    """
    b = cfg.selection.baselines
    if b.seed_recipe and enqueue_seed_recipe(study, cfg):
        say(f"seed recipe enqueued as the first trial: {seed_recipe_params(cfg)}")
    if b.linear_probe:
        try:
            add_linear_probe(study, cfg, prep, say)
        except ValueError as err:
            raise DataError(f"{cfg.data.root}: {err}; or set selection.baselines.linear_probe: false") from None


def plan_line(cfg: StudyConfig) -> str:
    """One line saying how many trainings `sweep run` will do, e.g. "plan: 12 trials (the seed
    recipe + 11 sampled) + the linear probe; then up to 6 re-runs (top 3 x 2 seeds); `sweep
    report refits the champion on train + val" (the report stage of `sweep run`, or `sweep report`)."""
    b, s, n = cfg.selection.baselines, cfg.selection, cfg.study.n_trials
    trials = f"{n} trial{'s' if n != 1 else ''}" + (
        f" (the seed recipe + {n - 1} sampled)"
        if b.seed_recipe and n > 1
        else " (the seed recipe)"
        if b.seed_recipe
        else " (sampled)"
    )
    parts = [f"plan: {trials}" + (" + the linear probe" if b.linear_probe else "")]
    if s.reruns:
        parts.append(f"then up to {s.top_k * s.reruns} re-runs (top {s.top_k} x {s.reruns} seeds)")
    if s.refit:
        parts.append("the report refits the champion on train + val")
    timeout = f" (or until study.timeout, {cfg.study.timeout} s)" if cfg.study.timeout else ""
    return "; ".join(parts) + timeout


def resume_line(study: optuna.Study, n_trials: int, requeued: Sequence[int]) -> str:
    """ "resuming study 'X': 5 of 12 trials done, trial 3 re-queued" (counted trials: `n_trials`'s)."""
    again = ""
    if requeued:
        again = f", trial{'s' if len(requeued) > 1 else ''} {', '.join(map(str, requeued))} re-queued"
    return f"resuming study '{study.study_name}': {counted(study)} of {n_trials} trials done{again}"


def enqueue_reruns(study: optuna.Study, cfg: StudyConfig, storage: BaseStorage) -> list[tuple[int, int]]:
    """Enqueue the re-runs `selection.rerun_plan` finds missing; returns the (trial, seed index)
    pairs enqueued (under the study's "reruns" lock in `storage`, so two workers, on one machine or
    many, never enqueue the same pair)."""
    s = cfg.selection
    with study_lock(storage, study.study_name, "reruns"):
        trials = study.get_trials(deepcopy=False)
        plan = rerun_plan(trials, s.top_k, s.reruns, cfg.study.direction)
        by_number = {t.number: t for t in trials}
        for number, index in plan:
            study.enqueue_trial(dict(by_number[number].params), user_attrs=rerun_attrs(number, index))
    return plan


def _waiting_reruns(study: optuna.Study) -> int:
    return sum(record(t).is_rerun for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def run_reruns(
    study: optuna.Study,
    cfg: StudyConfig,
    prep: Prepared,
    storage: BaseStorage,
    observers: Sequence[TrialObserver],
    heartbeat: float | None = None,
) -> int:
    """After the search: enqueue the missing re-runs and run every waiting one.

    Args:
        storage: the study's opened storage (`tune.open_storage`), which holds the "reruns" lock.
        heartbeat: seconds between the trials' own heartbeats (`tune.Objective`); None for storages
            with Optuna's.

    Returns:
        The number of re-runs this process enqueued (0 with `selection.reruns: 0`, or when
        another worker enqueued them; this process still runs waiting ones).

    Raises:
        KeyboardInterrupt (`tune.Interrupted` for SIGTERM): after the running trial is recorded FAIL.
    """
    if cfg.selection.reruns == 0 or counted(study) < cfg.study.n_trials:
        return 0
    enqueued = enqueue_reruns(study, cfg, storage)
    if enqueued:
        for observer in observers:
            observer.message(
                f"seed re-runs of the top {cfg.selection.top_k} candidates (a linear probe, deterministic, "
                "gets none): " + ", ".join(f"trial {n} seed {i}" for n, i in enqueued)
            )
    budget = FailureBudget(cfg.study.max_failed_trials, count(study, (TrialState.FAIL,)), observers)

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not _waiting_reruns(study):
            study.stop()

    # One trial per call: each call pops a waiting re-run; another worker may pop the last one
    # between the check and the pop, and then this call samples one extra (counted) trial.
    while (waiting := _waiting_reruns(study)) and not budget.spent:
        study.optimize(
            Objective(cfg, prep, observers, heartbeat),
            n_trials=waiting,
            callbacks=[stop_when_done, budget],
            catch=(Exception,),
            gc_after_trial=True,
        )
    return len(enqueued)
