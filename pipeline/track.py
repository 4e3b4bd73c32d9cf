"""The MLflow observer of a study, and reconciliation of MLflow with Optuna's record.

Run statuses mirror Optuna trial states (../shared/DESIGN.md): COMPLETE -> FINISHED,
PRUNED -> KILLED (tag `sweep.state=PRUNED`), FAIL -> FAILED (tag `sweep.fail_reason`); an
interrupted trial (Ctrl-C, SIGTERM) is FAIL in Optuna and its run KILLED, like the parent run.
The runs themselves are written through `pipeline.mlflow_runs.Tracker`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from pipeline.config import StudyConfig
from pipeline.events import TrialEnded, TrialObserver, TrialStarted
from pipeline.mlflow_runs import Tracker, quiet_mlflow
from pipeline.train import EpochResult

__all__ = ["PARENT_ATTR", "MLflowObserver", "Tracker", "quiet_mlflow", "reconcile", "run_params"]

REASON_TAG = "sweep.fail_reason"
RETRY_TAG = "sweep.retry_of"
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run id
RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's nested run id
ROLE_ATTRS = ("baseline", "rerun_of", "seed_index")  # trial user attrs of pipeline.selection


def run_params(cfg: StudyConfig) -> dict[str, Any]:
    """The settings a trial runs with, as its nested run's params."""
    t = cfg.training
    return {
        "arch": cfg.model.arch,
        "weights": cfg.model.weights,
        "epochs": t.epochs,
        "optimizer": t.optimizer,
        "lr": t.lr,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "nesterov": t.nesterov,
        "label_smoothing": t.label_smoothing,
        "freeze_depth": t.freeze_depth,
        "aug_strength": t.aug_strength,
        "batch_size": cfg.data.batch_size,
        "scheduler": t.scheduler.type,
        "step_size": t.scheduler.step_size,
        "gamma": t.scheduler.gamma,
    }


def role_tags(attrs: Mapping[str, Any]) -> dict[str, str]:
    """Run tags of a trial's selection role: `sweep.baseline`, `sweep.rerun_of`, `sweep.seed_index`."""
    return {f"sweep.{k}": str(attrs[k]) for k in ROLE_ATTRS if attrs.get(k) is not None}


class MLflowObserver(TrialObserver):
    """Trial events -> one nested run per trial under the tracker's parent run: params at the
    start, metrics per epoch (step = epoch), the Optuna state as run status and tags at the end."""

    def __init__(self, tracker: Tracker, study_name: str) -> None:
        self.tracker, self.study_name = tracker, study_name
        self.runs: dict[int, str | None] = {}

    def trial_started(self, event: TrialStarted) -> Mapping[str, Any]:
        run_id = self.tracker.start_nested_run(
            self.study_name, event.number, {**event.params, **run_params(event.config)}
        )
        self.runs[event.number] = run_id
        if event.retry_of is not None:
            self.tracker.set_tags(run_id, {RETRY_TAG: str(event.retry_of)})
        if event.roles:  # sweep.baseline / sweep.rerun_of / sweep.seed_index
            self.tracker.set_tags(run_id, role_tags(event.roles))
        return {RUN_ATTR: run_id}

    def epoch_finished(self, number: int, result: EpochResult) -> None:
        self.tracker.log_metrics(self.runs.get(number), result.metrics(), step=result.epoch)

    def trial_ended(self, event: TrialEnded) -> None:
        run_id = self.runs.pop(event.number, None)
        tags = {"sweep.seconds": f"{event.seconds:.1f}"}
        if event.state == "COMPLETE" and event.best_value is not None and event.best_epoch is not None:
            best = {f"best_{event.metric}": event.best_value, "best_epoch": event.best_epoch}
            self.tracker.log_metrics(run_id, best, step=event.epochs_run - 1)
            tags["sweep.best_epoch"] = str(event.best_epoch)
        if event.reason:
            tags[REASON_TAG] = event.reason
        self.tracker.end_nested_run(run_id, event.state, tags, status="KILLED" if event.interrupted else None)


# ---- reconciliation: MLflow catches up with Optuna's record ---------------------------------


def reconcile(tracker: Tracker, trials: Sequence[FrozenTrial], study_name: str) -> list[int]:
    """Make the nested runs agree with the trials after an outage or a dead process.

    1. Runs left RUNNING whose trial is over (the process died, or the store was down when the
       trial ended) get the trial's state, with the epochs Optuna recorded backfilled.
    2. Finished trials without a run (the store was down when they started) get one, rebuilt from
       Optuna's record (params, per-epoch history, state, fail reason), tagged `sweep.synced=true`.
    Calling it again changes nothing. Does nothing while `tracker.parent_id` is unset or the store
    does not answer.

    Returns:
        Numbers of the trials whose runs were created.
    """
    if tracker.parent_id is None:
        return []
    close_stale_runs(tracker, trials)
    return sync_runs(tracker, trials, study_name)


def sync_runs(tracker: Tracker, trials: Sequence[FrozenTrial], study_name: str) -> list[int]:
    """Create the nested runs of finished trials that never reached MLflow; returns their numbers."""
    logged = tracker.trial_runs()
    if logged is None:
        return []
    created = []
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) or t.number in logged:
            continue
        run_id = tracker.start_nested_run(study_name, t.number, t.params)
        if run_id:
            _backfill_epochs(tracker, run_id, t)
        tags = {"sweep.synced": "true", **role_tags(t.user_attrs)}
        if t.user_attrs.get("fail_reason"):
            tags[REASON_TAG] = t.user_attrs["fail_reason"]
        tracker.end_nested_run(run_id, t.state.name, tags)
        if run_id:
            created.append(t.number)
    return created


def close_stale_runs(tracker: Tracker, trials: Sequence[FrozenTrial]) -> None:
    """Close nested runs left RUNNING although their trial is over, with the trial's state."""
    by_number = {t.number: t for t in trials}
    for number, run_id in (tracker.trial_runs(status="RUNNING") or {}).items():
        trial = by_number.get(number)
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        reason = trial.user_attrs.get("fail_reason")
        if trial.state == TrialState.FAIL and not reason:
            reason = "stale: the process running this trial stopped (heartbeat lost)"
        _backfill_epochs(tracker, run_id, trial)
        tracker.end_nested_run(run_id, trial.state.name, {REASON_TAG: reason} if reason else {})


def _backfill_epochs(tracker: Tracker, run_id: str, trial: FrozenTrial) -> None:
    """Log the epochs Optuna recorded after the run's last logged step (store outage)."""
    last = tracker.last_step(run_id, "val_accuracy")
    for h in trial.user_attrs.get("history") or []:
        if h["epoch"] > last:
            tracker.log_metrics(run_id, EpochResult(**h).metrics(), step=h["epoch"])
