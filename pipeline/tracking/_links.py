"""Direct links into the MLflow UI for a study: its runs table, a run, its registered model.

MLflow 3's UI opens an experiment on its GenAI overview (traces, tokens) and keeps the runs table
one toggle away; `#/experiments/<id>/runs?workflowType=machine_learning` opens the runs table in the
"Model training" mode directly, and a `searchFilter` on the `sweep.study` tag keeps the study's
parent run with its nested trials when several studies share the experiment (checked in
Chromium against MLflow 3.17's UI).
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from pipeline.config import StudyConfig, sqlite_path, tracking_uri
from pipeline.core import first_line, mask_text, mask_url
from pipeline.tracking._mlflow_runs import STUDY_TAG, Tracker, quiet_mlflow

TRAINING_MODE = {"workflowType": "machine_learning"}  # the UI's "Model training" toggle
# The UI's "share view" state: an experiment tag `mlflow.sharedViewState.<key>` holding its search
# facets and table columns as JSON, opened by `?viewStateShareKey=<key>` (read from MLflow 3.17's UI
# code; the column keys are its `<type>.`<name>`` form). Without it the table shows no metric.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
SHOWN_COLUMNS = ("attributes.`Dataset`", "metrics.`best_val_accuracy`", "metrics.`val_accuracy`", "tags.`sweep.state`")
DEFAULT_UI = "http://127.0.0.1:5000"  # where `make ui` serves the embedded store


def view_state(study: str) -> dict[str, object]:
    """The runs table of one study, best trials first, with the val metrics as columns."""
    return {
        "searchFilter": f"tags.`{STUDY_TAG}` = '{study}'",
        "orderByKey": "metrics.`best_val_accuracy`",
        "orderByAsc": False,
        "selectedColumns": list(SHOWN_COLUMNS),
    }


def view_key(study: str) -> str:
    """The share key of `view_state(study)`: a digest of the state, so a new layout gets a new key."""
    state = json.dumps(view_state(study), sort_keys=True)
    return hashlib.sha256(state.encode()).hexdigest()[:20]


def ui_base(tracking: str) -> str:
    """Where the MLflow UI of a tracking store is served: the server itself for an http(s) URI
    (without any user:password in it: the link goes into report files), else `make ui`'s address."""
    if not tracking.startswith(("http://", "https://")):
        return DEFAULT_UI
    parts = urlsplit(tracking)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def runs_table_url(base: str, experiment_id: str, study: str | None = None, shared_view: bool = False) -> str:
    """The experiment's runs table in model-training mode, filtered to one study's runs when given;
    `shared_view`: opened on `view_state(study)` (the experiment holds its tag, `log_view_state`)."""
    query = dict(TRAINING_MODE)
    if study and shared_view:
        query["viewStateShareKey"] = view_key(study)
    elif study:
        query["searchFilter"] = f"tags.`{STUDY_TAG}` = '{study}'"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query, quote_via=quote)}"


def run_url(base: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run's page in model-training mode: its overview, or `tab` ("model-metrics", "artifacts")."""
    path = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
    return f"{path}?{urlencode(TRAINING_MODE)}"


def model_url(base: str, name: str) -> str:
    """A registered model's page (its versions with their aliases)."""
    return f"{base.rstrip('/')}/#/models/{quote(name, safe='')}"


def study_links(cfg: StudyConfig, base: str, tracking: str | None = None) -> list[str]:
    """One line per link of the study, looked up in its tracking store without writing to it:
    the runs table, and the registered model once the report has registered one. Before the study
    has run (no store, no experiment or no run of it yet) the line says so; a
    store that does not answer is reported in the line too (nothing raised: the UI may still start).
    """
    quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, tracking)
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return [f"no MLflow store at {path} yet: run the study first; the MLflow UI: {base}"]
    client = MlflowClient(uri, registry_uri=uri)

    def unanswered(err: Exception) -> str:
        return (
            f"MLflow store {mask_url(uri)} did not answer ({mask_text(first_line(err), [uri])}); the MLflow UI: {base}"
        )

    try:
        experiment = client.get_experiment_by_name(cfg.experiment_name)
        models = client.search_registered_models(f"name = '{cfg.registry.model_name}'")
    except MlflowException as err:
        return [unanswered(err)]
    if experiment is None:
        shown = mask_url(uri)
        return [f"no MLflow experiment '{cfg.experiment_name}' in {shown} yet: run the study first; the UI: {base}"]
    try:
        runs = client.search_runs([experiment.experiment_id], f"tags.`{STUDY_TAG}` = '{cfg.study.name}'", max_results=1)
    except MlflowException as err:
        return [unanswered(err)]
    if not runs:
        return [f"no runs of study '{cfg.study.name}' in experiment '{cfg.experiment_name}' yet"]
    shared = f"{SHARED_VIEW_PREFIX}{view_key(cfg.study.name)}" in experiment.tags
    table = runs_table_url(base, experiment.experiment_id, cfg.study.name, shared)
    lines = [f"runs of study '{cfg.study.name}': {table}"]
    if models:
        lines.append(f"registered model '{cfg.registry.model_name}': {model_url(base, cfg.registry.model_name)}")
    return lines


def log_view_state(tracker: Tracker, study: str) -> None:
    """Store `view_state(study)` as the experiment's shared view, which `ui-links` opens."""
    tracker.set_experiment_tag(f"{SHARED_VIEW_PREFIX}{view_key(study)}", json.dumps(view_state(study)))
