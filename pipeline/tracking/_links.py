"""Direct links into the MLflow UI for a study: its runs table, a run, its registered model.

MLflow 3's UI opens an experiment on its GenAI overview (traces, tokens) and keeps the runs table
one toggle away; `#/experiments/<id>/runs?workflowType=machine_learning` opens the runs table in the
"Model training" mode directly, and a `searchFilter` on the `sweep.study` tag keeps the study's
parent run with its nested trials when several studies share the experiment (checked in
Chromium against MLflow 3.17's UI).
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from pipeline.config import StudyConfig, sqlite_path, tracking_uri
from pipeline.core import first_line, mask_text, mask_url
from pipeline.tracking._mlflow_runs import STUDY_TAG, quiet_mlflow

TRAINING_MODE = {"workflowType": "machine_learning"}  # the UI's "Model training" toggle


def runs_table_url(base: str, experiment_id: str, study: str | None = None) -> str:
    """The experiment's runs table in model-training mode, filtered to one study's runs when given."""
    query = dict(TRAINING_MODE)
    if study:
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
    lines = [f"runs of study '{cfg.study.name}': {runs_table_url(base, experiment.experiment_id, cfg.study.name)}"]
    if models:
        lines.append(f"registered model '{cfg.registry.model_name}': {model_url(base, cfg.registry.model_name)}")
    return lines
