"""The MLflow observer of a study, and reconciliation of MLflow with Optuna's record.

Run statuses mirror Optuna trial states (../shared/DESIGN.md): COMPLETE -> FINISHED,
PRUNED -> KILLED (tag `sweep.state=PRUNED`), FAIL -> FAILED (tag `sweep.fail_reason`); an
interrupted trial (Ctrl-C, SIGTERM) is FAIL in Optuna and its run KILLED, like the parent run.
A finished trial's run is renamed for its end (`trial-3 (pruned)`, `trial-4 (failed)`), so the
runs table tells pruned from failed at a glance, and carries `best_val_accuracy` whatever its
state once it ran an epoch. The parent run carries the study-level settings as params
(`study_params`) and the three splits as dataset inputs (`log_study`).
The runs themselves are written through `pipeline.tracking.Tracker`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import CategoricalParam, IntParam, StudyConfig
from pipeline.data import Splits
from pipeline.search import (
    RUN_ID_ATTR,
    SYNCED_RUNS_ATTR,
    TrialEnded,
    TrialObserver,
    TrialRecord,
    TrialStarted,
    role_words,
    run_id_of,
)
from pipeline.tracking._datasets import CONTEXT, input_context, split_inputs
from pipeline.tracking._links import log_view_state
from pipeline.tracking._mlflow_runs import Tracker, quiet_mlflow, trial_run_name
from pipeline.training import EpochResult

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

__all__ = [
    "PARENT_ATTR",
    "MLflowObserver",
    "Tracker",
    "log_study",
    "quiet_mlflow",
    "reconcile",
    "run_params",
    "study_params",
]

REASON_TAG = "sweep.fail_reason"
RETRY_TAG = "sweep.retry_of"
CHAMPION_TAG = "sweep.champion"  # "true" on the run of the trial the report chose
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run id
TRIAL_CONTEXTS = (CONTEXT["train"], CONTEXT["val"])  # what a trial's run records; never the test split
CHANGED_TAG = "sweep.changed_params"  # parent run: study settings changed on resume (params cannot)


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


def role_tags(roles: Mapping[str, Any]) -> dict[str, str]:
    """Run tags of a trial's selection role (`TrialRecord.roles()`, `TrialStarted.roles`):
    `sweep.baseline`, `sweep.rerun_of`, `sweep.seed_index`."""
    return {f"sweep.{k}": str(v) for k, v in roles.items() if v is not None}


def study_params(cfg: StudyConfig) -> dict[str, Any]:
    """The study-level settings, as the parent run's params: model, sampler, pruner, budget,
    data, fixed training settings, and each search-space dimension as `space.<name>`
    (`float [0.0001, 0.1] log`, `int [0, 5]`, `categorical ['sgd', 'adamw']`)."""
    s, d, t, p = cfg.study, cfg.data, cfg.training, cfg.study.pruner
    pruner: str = p.type
    if p.type in ("median", "percentile"):
        pruner += f" (n_startup_trials={p.n_startup_trials}, n_warmup_steps={p.n_warmup_steps}"
        pruner += f", percentile={p.percentile:g})" if p.type == "percentile" else ")"
    params: dict[str, Any] = {
        "arch": cfg.model.arch,
        "weights": cfg.model.weights,
        "metric": f"{s.metric} ({s.direction})",
        "sampler": f"{s.sampler.type} (seed={s.sampler.seed})",
        "pruner": pruner,
        "n_trials": s.n_trials,
        "timeout": s.timeout,
        "epochs": t.epochs,
        "optimizer": t.optimizer,
        "scheduler": t.scheduler.type,
        "data_root": str(d.root),
        "image_size": d.image_size,
        "batch_size": d.batch_size,
        "data_seed": d.seed,
    }
    for name, dim in cfg.search_space.items():
        if isinstance(dim, CategoricalParam):
            params[f"space.{name}"] = f"categorical {list(dim.choices)}"
        else:
            stepped = dim.step is not None and not (isinstance(dim, IntParam) and dim.step == 1)
            extra = (" log" if dim.log else "") + (f" step {dim.step}" if stepped else "")
            params[f"space.{name}"] = f"{dim.type} [{dim.low}, {dim.high}]{extra}"
    return params


def log_study(tracker: Tracker, parent: str | None, cfg: StudyConfig, splits: Splits) -> None:
    """Record on the parent run what the study is: `study_params` and the train/val/test
    dataset inputs. A resumed study keeps its first params (MLflow params never change); the
    settings that changed since are listed in the `sweep.changed_params` tag. The experiment gets
    the shared view of the study's runs table with its val metrics as columns (`ui-links` opens it)."""
    changed = tracker.log_new_params(parent, study_params(cfg))
    if changed:
        tracker.set_tags(parent, {CHANGED_TAG: json.dumps({k: f"{a} -> {b}" for k, (a, b) in changed.items()})})
    tracker.log_inputs(parent, split_inputs(splits))
    log_view_state(tracker, cfg.study.name)


class MLflowObserver(TrialObserver):
    """Trial events -> one nested run per trial under the tracker's parent run: params and the
    train/val dataset inputs at the start, metrics per epoch (step = epoch), the Optuna state as
    run status, run name and tags at the end.

    Args:
        inputs: dataset inputs every trial's run records (`datasets.split_inputs` of train, val).
    """

    def __init__(self, tracker: Tracker, study_name: str, inputs: Sequence[DatasetInput] = ()) -> None:
        self.tracker, self.study_name, self.inputs = tracker, study_name, list(inputs)
        self.runs: dict[int, str | None] = {}
        self.role: dict[int, str | None] = {}
        self.best_accuracy: dict[int, float] = {}

    def trial_started(self, event: TrialStarted) -> None:
        self.role[event.number] = role_words(event.roles)
        run_id = self.tracker.start_nested_run(
            self.study_name, event.number, {**event.params, **run_params(event.config)}, self.role[event.number]
        )
        self.runs[event.number] = run_id
        self.tracker.log_inputs(run_id, self.inputs)
        if event.retry_of is not None:
            self.tracker.set_tags(run_id, {RETRY_TAG: str(event.retry_of)})
        if event.roles:  # sweep.baseline / sweep.rerun_of / sweep.seed_index
            self.tracker.set_tags(run_id, role_tags(event.roles))
        event.record(RUN_ID_ATTR, run_id)

    def epoch_finished(self, number: int, result: EpochResult) -> None:
        self.tracker.log_metrics(self.runs.get(number), result.metrics(), step=result.epoch)
        self.best_accuracy[number] = max(result.val_accuracy, self.best_accuracy.get(number, 0.0))

    def trial_ended(self, event: TrialEnded) -> None:
        run_id = self.runs.pop(event.number, None)
        best_accuracy = self.best_accuracy.pop(event.number, None)
        tags = {"sweep.seconds": f"{event.seconds:.1f}"}
        if event.epochs_run:
            # Every trial that ran an epoch, pruned and failed ones too: the runs table compares them.
            best = {} if best_accuracy is None else {"best_val_accuracy": best_accuracy}
            if event.best_value is not None:
                best[f"best_{event.metric}"] = event.best_value
            self.tracker.log_metrics(run_id, best, step=event.epochs_run - 1)
        if event.state == "COMPLETE" and event.best_epoch is not None:
            self.tracker.log_metrics(run_id, {"best_epoch": event.best_epoch}, step=event.epochs_run - 1)
            tags["sweep.best_epoch"] = str(event.best_epoch)
        if event.reason:
            tags[REASON_TAG] = event.reason
        self.tracker.end_nested_run(
            run_id,
            event.state,
            tags,
            status="KILLED" if event.interrupted else None,
            name=trial_run_name(event.number, event.state, event.interrupted, self.role.pop(event.number, None)),
        )


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


def remember_run_ids(study: optuna.Study, tracker: Tracker) -> None:
    """Store the run ids of finished trials whose run was made afterwards (the probe's, a store
    outage's) in the study's `SYNCED_RUNS_ATTR`, so `sweep status`, the report and the model
    version name them (a finished trial takes no user attr any more)."""
    attrs = study.user_attrs
    missing = [t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not run_id_of(attrs, t)]
    runs = (tracker.trial_runs() or {}) if missing else {}
    found = {str(n): runs[n] for n in missing if n in runs}
    if found:
        study.set_user_attr(SYNCED_RUNS_ATTR, {**attrs.get(SYNCED_RUNS_ATTR, {}), **found})


def sync_runs(tracker: Tracker, trials: Sequence[FrozenTrial], study_name: str) -> list[int]:
    """Create the nested runs of finished trials that never reached MLflow, with the train and
    val dataset inputs the parent run records; returns their numbers."""
    logged = tracker.trial_runs()
    if logged is None:
        return []
    created = []
    seen: list[DatasetInput] | None = None
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) or t.number in logged:
            continue
        if seen is None:
            seen = [i for i in tracker.dataset_inputs(tracker.parent_id) if input_context(i) in TRIAL_CONTEXTS]
        run_id = tracker.start_nested_run(study_name, t.number, t.params, TrialRecord.from_frozen(t).role_words)
        if run_id:
            tracker.log_inputs(run_id, seen)
            _backfill_epochs(tracker, run_id, t)
        r = TrialRecord.from_frozen(t)
        tags = {"sweep.synced": "true", **role_tags(r.roles())}
        if r.fail_reason:
            tags[REASON_TAG] = r.fail_reason
        tracker.end_nested_run(run_id, t.state.name, tags, name=_ended_name(t))
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
        reason = TrialRecord.from_frozen(trial).fail_reason
        if trial.state == TrialState.FAIL and not reason:
            reason = "stale: the process running this trial stopped (heartbeat lost)"
        _backfill_epochs(tracker, run_id, trial)
        tracker.end_nested_run(
            run_id, trial.state.name, {REASON_TAG: reason} if reason else {}, name=_ended_name(trial)
        )


def _ended_name(trial: FrozenTrial) -> str:
    r = TrialRecord.from_frozen(trial)
    return trial_run_name(trial.number, trial.state.name, r.interrupted, r.role_words)


def mark_champion(tracker: Tracker, champion: FrozenTrial) -> None:
    """Name the champion's run `trial-N (..., champion)` and tag it `sweep.champion=true`, so
    the runs table shows the winner; nothing when its run is not in this store."""
    run_id = (tracker.trial_runs() or {}).get(champion.number)
    if run_id is None:
        return
    r = TrialRecord.from_frozen(champion)
    name = trial_run_name(champion.number, champion.state.name, r.interrupted, r.role_words, champion=True)
    tracker.rename(run_id, name, {CHAMPION_TAG: "true"})


def _backfill_epochs(tracker: Tracker, run_id: str, trial: FrozenTrial) -> None:
    """Log the epochs Optuna recorded after the run's last logged step (store outage), then the
    trial's best val accuracy."""
    last = tracker.last_step(run_id, "val_accuracy")
    history = TrialRecord.from_frozen(trial).history
    for h in history:
        if h["epoch"] > last:
            tracker.log_metrics(run_id, EpochResult(**h).metrics(), step=h["epoch"])
    if history:
        best = max(h["val_accuracy"] for h in history)
        tracker.log_metrics(run_id, {"best_val_accuracy": best}, step=history[-1]["epoch"])
