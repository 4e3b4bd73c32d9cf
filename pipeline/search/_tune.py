"""The Optuna side of a study: the stored study, the objective, and the run of trials.

Semantics (../shared/DESIGN.md):
- A trial reports `val_accuracy` (or `val_loss`) once per epoch, `step = epoch` (0-based); the
  pruner decides right after each report.
- The trial's value is its best validation metric over the epochs it ran, and that epoch's
  weights are its checkpoint: the last epoch is often past the best one under a step LR.
- `n_trials` counts finished trials (COMPLETE + PRUNED, `COUNTED_STATES`) of the search itself:
  seed re-runs (`rerun_of`) and the linear-probe baseline do not count (`counted`); FAIL trials do
  not count, so a study resumed after a crash still reaches `n_trials`. `max_failed_trials` bounds a
  failing run.
- The run of trials (`study.optimize` with callbacks, `n_trials` across workers) is
  `pipeline.search`.
- Storage: any URL of `pipeline.distributed`; RDB storages with Optuna's heartbeat, the others with the
  trial's own heartbeat (`pipeline.distributed.TrialHeartbeat`); see `pipeline.distributed` for dead trials.

This module speaks only Optuna's public API and knows nothing of MLflow: trial events go to
`pipeline.search.TrialObserver`s (the MLflow observer in `pipeline.tracking`, the progress
display in `pipeline.cli`), which the caller wires.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import StudyConfig, best_index, check_local_paths, sqlite_path, storage_url, store_lock
from pipeline.core import StudyStateError, TrackingError, deferred_interrupts, first_line, mask_url
from pipeline.distributed import (
    FAIL_REASON_ATTR,
    HOST_ATTR,
    INTERRUPTED_ATTR,
    OWNER_ATTR,
    PID_ATTR,
    TrialHeartbeat,
    heartbeat_supported,
    host_name,
    journal_path,
    owner_record,
    storage_kind,
)
from pipeline.distributed import open_storage as open_raw_storage
from pipeline.models import TrialCheckpoint
from pipeline.search._events import TrialEnded, TrialObserver, TrialStarted
from pipeline.search._history import epoch_attr, stale_keys
from pipeline.search._record import (
    BEST_EPOCH_ATTR,
    EPOCHS_RUN_ATTR,
    RERUN_ATTR,
    RETRY_OF_ATTR,
    ROLE_ATTRS,
    SECONDS_ATTR,
    SEED_INDEX_ATTR,
)
from pipeline.search._samplers import make_pruner, make_sampler, suggest
from pipeline.search._stopping import COUNTED_STATES, rerun_seed
from pipeline.training import EpochResult, FitResult, NonFiniteLossError, Prepared, fit_config

FINGERPRINT_ATTR = "sweep_fingerprint"


class Interrupted(KeyboardInterrupt):
    """SIGTERM received; raised inside the trial so it ends FAIL and the parent run KILLED."""


# ---- the stored study ------------------------------------------------------------------------------


def fingerprint(cfg: StudyConfig) -> dict[str, Any]:
    """What must not change under a stored study: space, data, model, training recipe, metric,
    direction. Where a trial runs (`training.device`, `amp`, `channels_last`) may change."""
    dump = cfg.model_dump(mode="json")
    data_keys = ("root", "train", "val", "test", "test_fraction", "seed", "image_size")
    where = ("device", "amp", "channels_last")
    return {
        "search_space": dump["search_space"],
        "data": {k: dump["data"][k] for k in data_keys},
        "training": {k: v for k, v in dump["training"].items() if k not in where},
        "model": dump["model"],
        "metric": dump["study"]["metric"],
        "direction": dump["study"]["direction"],
    }


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def grace_period(cfg: StudyConfig) -> int:
    """Seconds without a heartbeat after which a running trial counts as dead."""
    return cfg.study.grace_period or 2 * cfg.study.heartbeat_interval


def open_storage(cfg: StudyConfig, url: str) -> BaseStorage:
    """The study's Optuna storage at `url` (`pipeline.distributed.open_storage`); RDB storages get
    Optuna's heartbeat and re-queue a stale trial's parameters (`RetryHeartbeatStaleTrialCallback`,
    up to `study.max_retries` times); the gRPC proxy and journal files have no Optuna heartbeat
    (trials keep their own, see `pipeline.distributed`).

    Raises:
        TrackingError: the folder of an embedded store cannot be written, or the storage cannot be
            opened (server down, bad URL, missing driver); the URL's password is masked.
    """
    check_local_paths(url)
    if not heartbeat_supported(url):
        return open_raw_storage(url)
    return open_raw_storage(
        url,
        heartbeat_interval=cfg.study.heartbeat_interval,
        grace_period=grace_period(cfg),
        stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.study.max_retries),
    )


def open_study(
    cfg: StudyConfig, storage: str | BaseStorage, accept_changes: bool = False, url: str | None = None
) -> optuna.Study:
    """Create or resume the study `study.name` in `storage` (a URL, or `open_storage`'s result
    opened from `url`, which messages name with its password masked).

    Raises:
        StudyStateError: the stored study was made from a different space/data/model/metric.
        TrackingError: the storage cannot be opened.
    """
    if isinstance(storage, str):
        url, storage = storage, open_storage(cfg, storage)
    where = mask_url(url) if url else "the study's storage"
    try:
        # SQLite only: its schema migration must not race; a new study's rows are written whole.
        with store_lock(url or ""), deferred_interrupts("the study"):
            study = optuna.create_study(
                storage=storage,
                study_name=cfg.study.name,
                direction=cfg.study.direction,
                sampler=make_sampler(cfg),
                pruner=make_pruner(cfg),
                load_if_exists=True,
            )
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
        raise TrackingError(f"Optuna storage {where} cannot be opened: {first_line(err)}") from None
    study.set_metric_names([cfg.study.metric])  # optuna-dashboard's axes say val_accuracy, not "Objective 0"
    new = fingerprint(cfg)
    old = study.user_attrs.get(FINGERPRINT_ATTR)
    if old is not None and old != new and not accept_changes:
        changed = "\n  ".join(_changes(old, new))
        raise StudyStateError(
            f"study '{cfg.study.name}' in {where} was created with different settings:\n  {changed}\n"
            f"Start a new study (--set study.name=NEW_NAME), or resume with these changes (--accept-changes)"
        )
    if old != new:
        study.set_user_attr(FINGERPRINT_ATTR, new)
    return study


def load_existing(cfg: StudyConfig, storage: str | None = None) -> optuna.Study:
    """Open a stored study read-only in spirit: no heartbeat, no fingerprint write.

    Raises:
        StudyStateError: no storage file, or no study of that name in the storage.
    """
    url = storage_url(cfg, storage)
    path = sqlite_path(url) or (journal_path(url) if storage_kind(url) == "journal" else None)
    if path is not None and not path.exists():  # opening would create an empty store: writes nothing
        raise StudyStateError(f"no Optuna storage at {url}: run `sweep run` with this study file first")
    try:
        return optuna.load_study(study_name=cfg.study.name, storage=open_raw_storage(url))
    except KeyError:
        raise StudyStateError(
            f"no study named '{cfg.study.name}' in {mask_url(url)}: run `sweep run` with this study file first"
        ) from None


def count(study: optuna.Study, states: tuple[TrialState, ...] = COUNTED_STATES) -> int:
    """Number of the study's trials in `states`, all of them (see `counted` for `n_trials`)."""
    return len(study.get_trials(deepcopy=False, states=states))


# ---- one trial ---------------------------------------------------------------------------------------


@dataclass
class Objective:
    """One call = one trial: sample, fine-tune, report per epoch, save the best epoch's weights."""

    cfg: StudyConfig
    prep: Prepared
    observers: Sequence[TrialObserver]
    heartbeat: float | None = None  # seconds between own heartbeats; None: the storage has Optuna's

    def __call__(self, trial: optuna.Trial) -> float:
        with TrialHeartbeat(trial, self.heartbeat):
            return self._run(trial)

    def _run(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        history: list[dict[str, Any]] = []
        try:
            cfg = self.cfg.with_params(suggest(trial, self.cfg.search_space))
            self._start(trial, cfg)
            rerun_of = trial.user_attrs.get(RERUN_ATTR)

            def on_epoch(result: EpochResult) -> None:
                history.append(dataclasses.asdict(result))
                trial.set_user_attr(*epoch_attr(result))
                for observer in self.observers:
                    observer.epoch_finished(trial.number, result)
                trial.report(getattr(result, cfg.study.metric), step=result.epoch)
                # A re-run measures a candidate's spread: it runs to its last epoch.
                if rerun_of is None and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

            seed = (
                cfg.data.seed + trial.number
                if rerun_of is None
                else rerun_seed(cfg.data.seed, int(rerun_of), int(trial.user_attrs.get(SEED_INDEX_ATTR, 1)))
            )
            fitted = fit_config(cfg, self.prep, seed, on_epoch)
            self._save_checkpoint(cfg, trial, fitted)
        except optuna.TrialPruned:
            self._end(trial, "PRUNED", start, history)
            raise
        except BaseException as err:
            reason, interrupted = fail_reason(err), isinstance(err, KeyboardInterrupt)
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            if interrupted:
                trial.set_user_attr(INTERRUPTED_ATTR, True)
            self._end(trial, "FAIL", start, history, reason=reason, interrupted=interrupted)
            raise
        # The checkpoint's path is not recorded on the trial: a finished trial's attrs cannot
        # change, and the report deletes most checkpoints (`checkpoints.resolve` finds the file).
        trial.set_user_attr(BEST_EPOCH_ATTR, fitted.best_epoch)
        self._end(trial, "COMPLETE", start, history, best_epoch=fitted.best_epoch)
        return fitted.best_value

    def _start(self, trial: optuna.Trial, cfg: StudyConfig) -> None:
        # Who runs this trial: a later start on this host fails it at once if the pid is gone.
        # A retried trial inherits the failed one's user attrs: reset what described that run.
        fresh = {OWNER_ATTR: owner_record(trial.number), HOST_ATTR: host_name(), PID_ATTR: os.getpid()}
        fresh[FAIL_REASON_ATTR] = None
        fresh.update(dict.fromkeys(stale_keys(trial.user_attrs)))  # the failed run's epochs
        for key, value in {**fresh, INTERRUPTED_ATTR: False}.items():
            trial.set_user_attr(key, value)
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(trial))
        if retry_of is not None:
            trial.set_user_attr(RETRY_OF_ATTR, retry_of)
        roles = {k: trial.user_attrs[k] for k in ROLE_ATTRS if trial.user_attrs.get(k) is not None}
        event = TrialStarted(trial.number, dict(trial.params), cfg, retry_of, roles, record=trial.set_user_attr)
        for observer in self.observers:
            observer.trial_started(event)

    def _save_checkpoint(self, cfg: StudyConfig, trial: optuna.Trial, fitted: FitResult) -> Path:
        checkpoint = self.prep.checkpoint(
            cfg, fitted.best_state, trial.number, fitted.best_epoch, fitted.best_value, dict(trial.params)
        )
        return checkpoint.save(TrialCheckpoint.path_for(cfg.study.name, trial.number))

    def _end(
        self,
        trial: optuna.Trial,
        state: str,
        start: float,
        history: list[dict[str, Any]],
        *,
        best_epoch: int | None = None,
        reason: str | None = None,
        interrupted: bool = False,
    ) -> None:
        # Measured here, not read from `FrozenTrial.duration`: the trial is not finished yet.
        seconds = time.perf_counter() - start
        trial.set_user_attr(SECONDS_ATTR, seconds)
        trial.set_user_attr(EPOCHS_RUN_ATTR, len(history))
        metric = self.cfg.study.metric
        values = [h[metric] for h in history]
        best = values[best_index(values, self.cfg.study.direction)] if values else None
        event = TrialEnded(trial.number, state, metric, best, best_epoch, len(history), seconds, reason, interrupted)
        for observer in self.observers:
            observer.trial_ended(event)


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    """The stored record of a running trial (its system attrs say whether it is a retry)."""
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return next(t for t in running if t.number == trial.number)


def fail_reason(err: BaseException) -> str:
    """Why a trial failed, in one line of at most 1000 characters: what to do for known causes,
    else `<ExceptionClass>: <first line> at <file>:<line>` (where it was raised)."""
    if isinstance(err, Interrupted):
        return "interrupted (SIGTERM)"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(err, NonFiniteLossError):
        return f"non-finite loss: {err}"
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory: lower data.batch_size or data.image_size"
    text = first_line(err, 1000) if str(err).strip() else ""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(err).__name__}: {text}{where}"[:1000]
