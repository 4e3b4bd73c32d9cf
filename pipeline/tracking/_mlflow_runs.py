"""MLflow runs of a study through one client: the experiment, the parent run, a nested run per
trial, metrics, tags and artifacts, with explicit run ids (no global "active run" leaks between
trials).

When the store stops answering mid-study, writes are skipped with one warning
(`Tracker.healthy` turns False) so the Optuna result is never lost; a later `reconcile`
(`pipeline.tracking`) brings MLflow back in line with Optuna's record. At start-up, a store that
does not answer is an error, never a reason to make a second parent run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.config import damaged_schema, store_lock
from pipeline.core import TrackingError, connection_refused, deferred_interrupts, first_line, mask_text, mask_url

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput, RunInfo

TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # Optuna state -> run status
# What the run name says once the trial is over: the runs table shows KILLED and FAILED runs with
# the same red cross, so a pruned trial would read as a failure without it.
NAME_SUFFIX = {"COMPLETE": "", "PRUNED": " (pruned)", "FAIL": " (failed)"}
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial_number"
STATE_TAG = "sweep.state"
PARENT_TAG = "mlflow.parentRunId"
RETRY_DELAYS = (1.0, 3.0)  # seconds between looks at a parent run while the store does not answer
T = TypeVar("T")


def quiet_mlflow() -> None:
    """No usage telemetry (these machines have no network) and no emoji banners in logs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # keeps stdout for results
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no "Downloading artifacts" bars


@functools.cache
def store_errors() -> tuple[type[BaseException], ...]:
    """What a tracking store raises when it is down, unreachable or cannot write: MLflow's own
    errors (HTTP failures arrive wrapped in them), requests' and SQLAlchemy's, and OSError for
    artifact files. Anything else is a bug and propagates."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError)


def trial_run_name(
    number: int, state: str | None = None, interrupted: bool = False, role: str | None = None, champion: bool = False
) -> str:
    """`trial-<number>`, then in brackets what it is in the race (`role`, from
    `search.role_words`), how it ended unless COMPLETE, and `champion` once the report chose it:
    `trial-3 (pruned)`, `trial-1 (linear probe)`, `trial-5 (re-run of 3, seed 1)`,
    `trial-4 (failed)`, `trial-6 (interrupted)`, `trial-2 (seed recipe, champion)`."""
    end = "interrupted" if interrupted else NAME_SUFFIX.get(state or "", "").strip(" ()")
    words = [w for w in (role, end, "champion" if champion else None) if w]
    return f"trial-{number}" + (f" ({', '.join(words)})" if words else "")


def _not_found(err: BaseException) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _problem(err: BaseException, uri: str | None = None) -> str:
    if connection_refused(err):
        return "connection refused"  # urllib3's retry dump says no more than this
    return mask_text(first_line(err), [uri])


def _schema_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """The lock under which a new tracking store's schema is created: for a PostgreSQL/MySQL
    database the storages' advisory lock (MLflow's SQL store, like Optuna's RDB storage, races on a
    fresh schema), for SQLite a lock file beside it, for a server or a folder none."""
    scheme = uri.partition("://")[0].partition("+")[0].lower()
    if scheme in ("postgresql", "mysql"):
        from pipeline.distributed import creation_lock

        return creation_lock(uri, "mlflow-schema")
    return store_lock(uri)


class Tracker:
    """Parent/nested MLflow runs for one study.

    Args:
        uri: MLflow tracking URI (sqlite:///..., http://host:port, file path).
        experiment: experiment name; created with `artifact_root` when missing.
        artifact_root: where a new experiment stores artifacts (ignored by an existing one).
        warn: called with one line when the store fails mid-study and when it answers again.

    Raises:
        TrackingError: the store cannot be reached or written at start-up.
    """

    def __init__(
        self, uri: str, experiment: str, artifact_root: Path | None = None, warn: Callable[[str], None] = print
    ) -> None:
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.uri, self.warn, self.healthy = uri, warn, True
        self.shown = mask_url(uri)  # what messages name: the URI with its password masked
        self.parent_id: str | None = None
        server = uri.startswith("http")
        for attempt in range(3):
            try:
                # A local store's migration must not be cut short (`deferred_interrupts`).
                with _schema_lock(uri), contextlib.nullcontext() if server else deferred_interrupts("the MLflow store"):
                    self.client = MlflowClient(tracking_uri=uri)
                    self.experiment_id = self._experiment(experiment, artifact_root)
                return
            except store_errors() as err:
                damage = damaged_schema("MLflow tracking store", uri, first_line(err), "mlflow db upgrade URL")
                if damage:
                    raise TrackingError(damage) from None
                # Workers starting together race through the experiment's creation: the loser succeeds next time.
                if attempt == 2 or server:
                    hint, what = (" (is the tracking server running?)", "server") if server else ("", "store")
                    raise TrackingError(
                        f"MLflow tracking {what} {self.shown} cannot be used: {_problem(err, uri)}{hint}"
                    ) from None
                time.sleep(2 + 3 * attempt)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            location = artifact_root.resolve().as_uri() if artifact_root else None
            try:
                return str(self.client.create_experiment(name, artifact_location=location))
            except store_errors() as err:
                # Another worker created it since we looked (several starting together): use theirs.
                if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)

    # -- parent run --------------------------------------------------------------------------
    def open_parent(self, study_name: str, run_id: str | None, tags: Mapping[str, str]) -> str:
        """Reuse the study's parent run (`run_id`, stored in the study) or create one.

        A new parent run is made only when there is none, or the store says it does not exist
        (deleted, or kept in another store); while the store does not answer, it is asked again
        (`RETRY_DELAYS`), never replaced.

        Raises:
            TrackingError: the store did not answer.
        """
        if run_id and self._reuse_parent(run_id):
            return run_id
        try:
            run = self.client.create_run(self.experiment_id, run_name=study_name, tags={STUDY_TAG: study_name, **tags})
            self.parent_id = self._first_parent(study_name, run.info)
        except store_errors() as err:
            raise TrackingError(
                f"MLflow tracking store {self.shown} cannot create the parent run: {_problem(err, self.uri)}"
            ) from None
        return self.parent_id

    def _reuse_parent(self, run_id: str) -> bool:
        for delay in (*RETRY_DELAYS, None):
            try:
                if self.client.get_run(run_id).info.lifecycle_stage != "active":
                    return False
                self.client.update_run(run_id, status="RUNNING")
                self.parent_id = run_id
                return True
            except store_errors() as err:
                if _not_found(err):
                    return False
                if delay is None:
                    raise TrackingError(
                        f"MLflow tracking store {self.shown} did not answer for the study's parent run {run_id}: "
                        f"{_problem(err, self.uri)}; run the same command again once it is back"
                    ) from None
                time.sleep(delay)
        return False  # not reached: the last pass returns or raises

    def _first_parent(self, study_name: str, mine: RunInfo) -> str:
        """Workers that start a new study together each create a parent run; all of them keep
        the earliest one (start time, then run id) and delete their own if it lost. Only RUNNING
        parents started within 10 minutes of ours count, so a deleted and re-created study of
        the same name never inherits the old study's run."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{STUDY_TAG}` = '{study_name}' and attributes.status = 'RUNNING' "
                f"and attributes.start_time >= {mine.start_time - 600_000}"
            ),
        )
        parents = [r for r in runs if PARENT_TAG not in r.data.tags]
        first = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if parents else mine.run_id
        if first != mine.run_id:
            self.client.delete_run(mine.run_id)
        return str(first)

    def close_parent(self, status: str) -> None:
        """End the parent run as FINISHED (normal end), KILLED (interrupted) or FAILED."""
        self._safe(self.client.set_terminated, self.parent_id, status=status, probe=True)

    # -- nested runs -------------------------------------------------------------------------
    def start_nested_run(
        self, study_name: str, number: int, params: Mapping[str, Any], role: str | None = None
    ) -> str | None:
        """Create the nested run `trial-<number>` under the parent with `params`; returns its id,
        None while the store is down."""
        tags = {PARENT_TAG: self.parent_id, STUDY_TAG: study_name, TRIAL_TAG: str(number)}
        run = self._safe(
            self.client.create_run,
            self.experiment_id,
            run_name=trial_run_name(number, role=role),
            tags=tags,
            probe=True,
        )
        if run is None:
            return None
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._safe(self.client.log_batch, run.info.run_id, params=batch)
        return str(run.info.run_id)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
        """Log `metrics` at `step` (the epoch index); nothing when `run_id` is None."""
        if run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._safe(self.client.log_batch, run_id, metrics=batch)

    def end_nested_run(
        self,
        run_id: str | None,
        state: str,
        tags: Mapping[str, str] | None = None,
        status: str | None = None,
        name: str | None = None,
    ) -> None:
        """Mirror the Optuna `state` (COMPLETE, PRUNED, FAIL) onto the run: its status and the
        `sweep.state` tag, plus `tags`, and rename it `name` (`trial_run_name`). `status`
        overrides the mirrored status (an interrupted trial is FAIL in Optuna but its run ends
        KILLED, like the parent run)."""
        if run_id is None:
            return
        from mlflow.entities import RunTag

        all_tags = {STATE_TAG: state, **(tags or {})}
        self._safe(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in all_tags.items()])
        if name:
            self._safe(self.client.update_run, run_id, name=name)
        self._safe(self.client.set_terminated, run_id, status=status or TRIAL_STATUS[state])

    def set_experiment_tag(self, key: str, value: str) -> None:
        """Tag the study's experiment (nothing while the store is down)."""
        self._safe(self.client.set_experiment_tag, self.experiment_id, key, value)

    def rename(self, run_id: str, name: str, tags: Mapping[str, str] | None = None) -> None:
        """Rename a run (and add `tags`) without touching its status."""
        for key, value in (tags or {}).items():
            self._safe(self.client.set_tag, run_id, key, value)
        self._safe(self.client.update_run, run_id, name=name)

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

    # -- params and dataset inputs ----------------------------------------------------------
    def log_new_params(self, run_id: str | None, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Log the `params` the run does not hold yet (MLflow params never change once logged).

        Returns:
            {key: (value logged earlier, value given now)} for params the run holds with another
            value (a study resumed with a changed setting); empty when the store does not answer.
        """
        if run_id is None:
            return {}
        run = self._safe(self.client.get_run, run_id)
        if run is None:
            return {}
        from mlflow.entities import Param

        held, given = run.data.params, {k: str(v)[:6000] for k, v in params.items()}
        new = [Param(k, v) for k, v in given.items() if k not in held]
        if new:
            self._safe(self.client.log_batch, run_id, params=new)
        return {k: (held[k], v) for k, v in given.items() if k in held and held[k] != v}

    def log_inputs(self, run_id: str | None, inputs: Sequence[DatasetInput]) -> None:
        """Record the datasets the run used (`pipeline.tracking`); MLflow keeps one input per
        dataset name, digest and context, so logging one again changes nothing."""
        if run_id and inputs:
            self._safe(self.client.log_inputs, run_id, datasets=list(inputs))

    def dataset_inputs(self, run_id: str | None) -> list[DatasetInput]:
        """The dataset inputs logged on the run; empty when none, or the store does not answer."""
        run = self._safe(self.client.get_run, run_id) if run_id else None
        return list(run.inputs.dataset_inputs) if run is not None and run.inputs else []

    # -- artifacts and tags ------------------------------------------------------------------
    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        """Store `text` as the run's artifact `artifact_file`."""
        if run_id:
            self._safe(self.client.log_text, run_id, text, artifact_file)

    def log_artifact(self, run_id: str | None, path: Path, artifact_path: str | None = None) -> None:
        """Copy the file at `path` into the run's artifacts (under `artifact_path`)."""
        if run_id:
            self._safe(self.client.log_artifact, run_id, str(path), artifact_path)

    def set_tags(self, run_id: str | None, tags: Mapping[str, str]) -> None:
        """Set `tags` on the run."""
        if run_id:
            from mlflow.entities import RunTag

            self._safe(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _safe(self, fn: Callable[..., T], *args: Any, probe: bool = False, **kwargs: Any) -> T | None:
        """Call the store; on a store error warn once and skip further writes until a probe succeeds.

        Probes (a trial's run creation, the parent's close) retry the store, so a short outage
        costs the runs of the trials during it and not the rest of the study.
        """
        if not self.healthy and not probe:
            return None
        try:
            result = fn(*args, **kwargs)
        except store_errors() as err:
            if self.healthy:
                self.warn(
                    f"MLflow store {self.shown} failed ({_problem(err, self.uri)}); trials go on and "
                    "Optuna keeps every result; run `sweep report` once the store is back"
                )
            self.healthy = False
            return None
        if not self.healthy:
            self.warn(f"MLflow store {self.shown} answers again; logging resumed")
            self.healthy = True
        return result
