"""The only MLflow writer: experiment, parent run per study, nested run per trial.

Run statuses mirror Optuna trial states (../shared/DESIGN.md): COMPLETE -> FINISHED,
PRUNED -> KILLED (tag `sweep.state=PRUNED`), FAIL -> FAILED (tag `sweep.fail_reason`).
Every call goes through `MlflowClient` with explicit run ids, so no global "active run" leaks
between trials. When the store stops answering mid-study, trial writes are skipped with one
warning (`Tracker.healthy` turns False) so the Optuna result is never lost; `sweep report`
can run once the store is back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from pipeline.errors import TrackingError
from pipeline.stores import store_lock

TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial_number"
STATE_TAG = "sweep.state"
REASON_TAG = "sweep.fail_reason"
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the study's MLflow parent run id


def quiet_mlflow() -> None:
    """No usage telemetry (these machines have no network) and no emoji banners in logs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # keeps stdout for results


class Tracker:
    """Parent/nested MLflow runs for one study.

    Args:
        uri: MLflow tracking URI (sqlite:///..., http://host:port, file path).
        experiment: experiment name; created with `artifact_root` when missing.
        artifact_root: where a new experiment stores artifacts (ignored by an existing one).
        warn: callable(str) used once when the store fails mid-study.

    Raises:
        TrackingError: the store cannot be reached or written at start-up.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None, warn=print):
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri, self.warn, self.healthy = uri, warn, True
        self.parent_id: str | None = None
        for attempt in range(3):
            try:
                with store_lock(uri):
                    self.client = MlflowClient(tracking_uri=uri)
                    self.experiment_id = self._experiment(experiment, artifact_root)
                return
            except Exception as err:  # sqlalchemy, requests and MlflowException all land here
                # Workers starting together on a new store race through its schema migration
                # or the experiment's creation; the loser succeeds on a second look.
                if attempt == 2 or uri.startswith("http"):
                    raise TrackingError(f"MLflow tracking store {uri} cannot be used: {_short(err)}"
                                        + (" (is the tracking server running?)" if uri.startswith("http") else "")
                                        ) from None
                time.sleep(2 + 3 * attempt)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            return self.client.create_experiment(name, artifact_location=location)
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    # -- parent run --------------------------------------------------------------------------
    def open_parent(self, study_name: str, run_id: str | None, tags: dict[str, str]) -> str:
        """Reuse the study's parent run (`run_id`, stored in the study) or create one."""
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    self.client.update_run(run_id, status="RUNNING")
                    self.parent_id = run_id
                    return run_id
            except Exception:
                pass  # the run is in another store or was deleted: make a new one
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={STUDY_TAG: study_name, **tags})
        self.parent_id = self._first_parent(study_name, run.info)
        return self.parent_id

    def _first_parent(self, study_name: str, mine) -> str:
        """Workers that start a new study together each create a parent run; all of them keep
        the earliest one (start time, then run id) and delete their own if it lost. Only RUNNING
        parents started within 10 minutes of ours count, so a deleted and re-created study of
        the same name never inherits the old study's run."""
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{STUDY_TAG}` = '{study_name}' and attributes.status = 'RUNNING' "
            f"and attributes.start_time >= {mine.start_time - 600_000}"))
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        first = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if parents else mine.run_id
        if first != mine.run_id:
            self.client.delete_run(mine.run_id)
        return first

    def close_parent(self, status: str) -> None:
        """End the parent run as FINISHED (normal end), KILLED (interrupted) or FAILED."""
        self._safe(self.client.set_terminated, self.parent_id, status=status, probe=True)

    # -- nested runs -------------------------------------------------------------------------
    def start_trial(self, study_name: str, number: int, params: dict[str, Any]) -> str | None:
        """Create the nested run `trial-<number>` under the parent; None if the store is down."""
        tags = {"mlflow.parentRunId": self.parent_id, STUDY_TAG: study_name, TRIAL_TAG: str(number)}
        run = self._safe(self.client.create_run, self.experiment_id, run_name=f"trial-{number}",
                         tags=tags, probe=True)
        if run is None:
            return None
        from mlflow.entities import Param

        self._safe(self.client.log_batch, run.info.run_id,
                   params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run.info.run_id

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._safe(self.client.log_batch, run_id,
                   metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def end_trial(self, run_id: str | None, state: str, tags: dict[str, str] | None = None,
                  status: str | None = None) -> None:
        """Mirror the Optuna state onto the run (status + `sweep.state` tag, plus `tags`).

        `status` overrides the mirrored run status (an interrupted trial is FAIL in Optuna but
        its run ends KILLED, like the parent run).
        """
        if run_id is None:
            return
        from mlflow.entities import RunTag

        all_tags = {STATE_TAG: state, **(tags or {})}
        self._safe(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in all_tags.items()])
        self._safe(self.client.set_terminated, run_id, status=status or TRIAL_STATUS[state])

    def trial_runs(self, status: str | None = None) -> dict[int, str] | None:
        """Nested runs under the parent as {trial number: run id}, optionally of one status;
        None when the store does not answer."""
        where = f"tags.mlflow.parentRunId = '{self.parent_id}'"
        if status:
            where += f" and attributes.status = '{status}'"
        runs = self._safe(self.client.search_runs, [self.experiment_id], filter_string=where, probe=True)
        if runs is None:
            return None
        return {int(r.data.tags[TRIAL_TAG]): r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}

    def last_step(self, run_id: str, metric: str) -> int:
        """Highest step logged for `metric` on the run (-1 when none or the store is down)."""
        history = self._safe(self.client.get_metric_history, run_id, metric) or []
        return max((m.step for m in history), default=-1)

    # -- artifacts ---------------------------------------------------------------------------
    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id:
            self._safe(self.client.log_text, run_id, text, artifact_file)

    def log_artifact(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        if run_id:
            self._safe(self.client.log_artifact, run_id, str(path), artifact_path)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id:
            from mlflow.entities import RunTag

            self._safe(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _safe(self, fn, *args, probe: bool = False, **kwargs):
        """Call the store; on failure warn once and skip further writes until a probe succeeds.

        Probes (a trial's run creation, the parent's close) retry the store, so a short outage
        costs the runs of the trials during it and not the rest of the study.
        """
        if not self.healthy and not probe:
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as err:
            if self.healthy:
                self.warn(f"MLflow store {self.uri} failed ({_short(err)}); trials go on and "
                          "Optuna keeps every result; run `sweep report` once the store is back")
            self.healthy = False
            return None
        if not self.healthy:
            self.warn(f"MLflow store {self.uri} answers again; logging resumed")
            self.healthy = True
        return result


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "NewConnectionError" in text or "Connection refused" in text:
        return "connection refused"  # urllib3's retry dump says no more than this
    return text[:300]


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
        run_id = tracker.start_trial(study_name, t.number, t.params)
        if run_id:
            _backfill_epochs(tracker, run_id, t)
        tags = {"sweep.synced": "true"}
        if t.user_attrs.get("fail_reason"):
            tags[REASON_TAG] = t.user_attrs["fail_reason"]
        tracker.end_trial(run_id, t.state.name, tags)
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
        tracker.end_trial(run_id, trial.state.name, {REASON_TAG: reason} if reason else {})


def _backfill_epochs(tracker: Tracker, run_id: str, trial: FrozenTrial) -> None:
    """Log the epochs Optuna recorded after the run's last logged step (store outage)."""
    from pipeline.train import EpochResult

    last = tracker.last_step(run_id, "val_accuracy")
    for h in trial.user_attrs.get("history") or []:
        if h["epoch"] > last:
            tracker.log_metrics(run_id, EpochResult(**h).metrics(), step=h["epoch"])
