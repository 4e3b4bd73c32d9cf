"""`sweep run` wired together: stores, pre-flight, the stored study, the recorded split, recovery of
dead trials, the MLflow parent run and observers, then `study_loop.optimize` under a SIGTERM handler.

Re-running with the same study file resumes: the Optuna study and its MLflow parent run are
reused, dead trials of a killed process are failed and their parameters retried, and MLflow is
reconciled with Optuna's record before new trials start. Many workers run this same function on
one study (`pipeline.distributed`, or one command per machine): the first start's bookkeeping runs
under the study's start lock (`pipeline.distributed`), the split is the one recorded by the first
worker (`pipeline.data`), and the last worker to finish closes the parent run.

Order at start, so that a store that cannot be reached leaves nothing behind elsewhere: pre-flight
(local files only), the Optuna storage (connect, schema), the MLflow store (connect, experiment),
and only then the study itself.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from pipeline.config import (
    StudyConfig,
    artifact_root,
    check_local_paths,
    check_writable,
    experiment_artifacts,
    sqlite_path,
    storage_url,
    tracking_uri,
)
from pipeline.core import BEFORE_TRIALS, StudyFailedError, mask_text, mask_url
from pipeline.data import adopt, load_record, store_record, to_record
from pipeline.distributed import DeadTrials, heartbeat_supported, recover, study_lock
from pipeline.search import (
    Interrupted,
    TrialObserver,
    add_baselines,
    count,
    grace_period,
    open_storage,
    open_study,
    optimize,
    plan_line,
    resume_line,
    run_reruns,
    same_failure,
)
from pipeline.tracking import PARENT_ATTR, MLflowObserver, Tracker, log_study, reconcile, remember_run_ids, split_inputs
from pipeline.training import Prepared, prepare


@dataclass(frozen=True)
class StudyOutcome:
    """How a `run_study` call ended."""

    study: optuna.Study
    parent_run_id: str | None
    stop_reason: str  # "n_trials reached" | "timeout" | "too many failed trials" | "grid exhausted"
    tracking_ok: bool  # False when the MLflow store failed during the run (Optuna has every result)


def check_stores(cfg: StudyConfig, storage: str | None = None, tracking: str | None = None) -> None:
    """Connect to the Optuna storage and the MLflow store once, creating at most their schemas and
    the experiment; what `sweep run --workers N` checks before it starts any worker.

    Raises:
        TrackingError: naming the storage, proxy or tracking store that cannot be used (masked URL).
    """
    url, uri = storage_url(cfg, storage), tracking_uri(cfg, tracking)
    check_local_paths(url, uri)
    open_storage(cfg, url)
    Tracker(uri, cfg.experiment_name, experiment_artifacts(uri))


def run_study(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    observers: Sequence[TrialObserver] = (),
    accept_changes: bool = False,
) -> StudyOutcome:
    """Pre-flight, then run trials until `n_trials` counted trials exist (or timeout / failures /
    the grid is exhausted). MLflow gets the parent run and a nested run per trial.

    Args:
        storage, tracking: override the study file's Optuna storage URL and MLflow tracking URI.
        observers: also told of every trial event and message (e.g. the progress display),
            after the MLflow observer.
        accept_changes: resume although the study file's fingerprint changed (the split is then
            recorded anew from this worker's data folder).

    Raises:
        ConfigError, DataError, ModelError, TrackingError, StudyStateError: before any trial.
        KeyboardInterrupt (`tune.Interrupted` for SIGTERM): after the running trial is recorded
            FAIL and the parent run KILLED.
    """
    url, uri = storage_url(cfg, storage), tracking_uri(cfg, tracking)

    def say(text: str) -> None:
        for observer in observers:
            observer.message(mask_text(text, [url, uri]))

    def scanned(done: int, total: int) -> None:
        for observer in observers:
            observer.images_scanned(done, total)

    try:
        prep, backend, tracker, study, dead, parent = _start(cfg, url, uri, accept_changes, say, scanned)
    except KeyboardInterrupt as err:
        err.add_note(BEFORE_TRIALS)  # the CLI's line then says so, not that a trial was recorded FAIL
        raise

    heartbeat = None if heartbeat_supported(url) else float(cfg.study.heartbeat_interval)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    status = "FAILED"
    try:
        everyone = [
            MLflowObserver(tracker, cfg.study.name, split_inputs(prep.splits, ("train", "val"))),
            *observers,
        ]
        reason = optimize(
            study, cfg, prep, everyone, dead=dead, heartbeat=heartbeat, poll=min(2.0, grace_period(cfg) / 4)
        )
        if reason == "n_trials reached":
            run_reruns(study, cfg, prep, backend, everyone, heartbeat=heartbeat)
        # A study that produced nothing usable is a failure, also for the parent run.
        status = "FAILED" if unusable(study, reason) else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if status == "FINISHED":  # runs of trials other workers left behind (killed) get their state
            reconcile(tracker, study.get_trials(deepcopy=False), cfg.study.name)
            remember_run_ids(study, tracker)
        # With several workers, the last one to finish closes the parent run.
        if status != "FINISHED" or not count(study, (TrialState.RUNNING,)):
            tracker.close_parent(status)
    outcome = StudyOutcome(study, parent, reason, tracker.healthy)
    if status == "FAILED":
        raise StudyFailedError(failure_message(outcome))
    return outcome


def _start(
    cfg: StudyConfig,
    url: str,
    uri: str,
    accept_changes: bool,
    say: Callable[[str], None],
    scanned: Callable[[int, int], None],
) -> tuple[Prepared, BaseStorage, Tracker, optuna.Study, DeadTrials, str]:
    """Everything before the first trial: pre-flight, both stores, the study, the recorded split,
    recovery, the parent run, the baselines and what the parent run logs."""
    check_local_paths(url, uri)
    if sqlite_path(uri):
        check_writable(artifact_root())
    # Pre-flight first: a bad data folder or weights value must not leave a stored study behind
    # whose fingerprint would then refuse the corrected study file.
    prep = prepare(cfg, scanned, say)
    backend = open_storage(cfg, url)
    tracker = Tracker(uri, cfg.experiment_name, experiment_artifacts(uri), warn=say)
    study = open_study(cfg, backend, accept_changes, url=url)
    say(plan_line(cfg))  # once the data and both stores answered: bad input stays one line
    dead = DeadTrials(backend, cfg.study.name, grace_period(cfg), cfg.study.max_retries)
    tags = {"sweep.storage": mask_url(url), "sweep.arch": cfg.model.arch}  # never a password in MLflow
    # One worker at a time: the first records the split, makes the parent run and adds the
    # baselines; later ones read them back; dead trials are re-queued by one worker only.
    with study_lock(backend, cfg.study.name, "start", on_wait=say):
        prep = _recorded_split(study, prep, accept_changes)
        requeued = recover(backend, cfg.study.name, cfg.study.max_retries, grace_period(cfg))
        if study.get_trials(deepcopy=False):  # an earlier run (or another worker) started this study
            say(resume_line(study, cfg.study.n_trials, requeued))
        parent = tracker.open_parent(cfg.study.name, study.user_attrs.get(PARENT_ATTR), tags)
        study.set_user_attr(PARENT_ATTR, parent)
        synced = reconcile(tracker, study.get_trials(deepcopy=False), cfg.study.name)
        if synced:
            say(f"MLflow: created the missing runs of trial(s) {', '.join(map(str, synced))} from Optuna's record")
        add_baselines(study, cfg, prep, say)
    tracker.log_text(parent, mask_text(cfg.to_yaml(), [url, uri]), "study.yaml")
    tracker.log_text(parent, prep.splits.to_json(), "splits.json")
    log_study(tracker, parent, cfg, prep.splits)
    tracker.set_tags(
        parent,
        {
            "sweep.load_report": prep.load_report.describe(),
            "sweep.preprocess": json.dumps(prep.preprocess.to_dict()),
        },
    )
    reconcile(tracker, study.get_trials(deepcopy=False), cfg.study.name)  # the probe's nested run
    remember_run_ids(study, tracker)

    return prep, backend, tracker, study, dead, parent


def unusable(study: optuna.Study, reason: str) -> bool:
    """True when the run stopped on its failure budget or the study holds no COMPLETE trial."""
    return reason == "too many failed trials" or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def failure_message(outcome: StudyOutcome) -> str:
    """One line: how many trials ended in which state, why the run stopped, what to do."""
    trials = outcome.study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    words = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    shown = ", ".join(f"{n} {words[s]}" for s, n in counts.items())
    same = same_failure([t for t in trials if t.state == TrialState.FAIL])
    hint = (
        f"every failed trial failed with {same}"
        if same
        else "see each trial's sweep.fail_reason in MLflow (`make ui`) or `sweep status`, fix the cause and run again"
    )
    return (
        f"study '{outcome.study.study_name}' produced no usable result ({shown}; stopped: "
        f"{outcome.stop_reason}); the MLflow parent run is FAILED; {hint}"
    )


def _recorded_split(study: optuna.Study, prep: Prepared, accept_changes: bool) -> Prepared:
    """Record this worker's split when the study has none (or `accept_changes`), else use the
    recorded one, which this worker's data folder must match file for file (`splitrecord.adopt`)."""
    recorded = load_record(study.user_attrs)
    if recorded is None or accept_changes:
        store_record(to_record(prep.splits), study.set_user_attr)
        return prep
    return dataclasses.replace(prep, splits=adopt(recorded, prep.splits, study.study_name))


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("SIGTERM")
