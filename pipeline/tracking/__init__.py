"""MLflow as an observer: the study's parent run and one nested run per trial (states, params,
metrics per step, artifacts), reconciliation of runs left behind, dataset inputs and UI links.
"""

from pipeline.tracking._datasets import input_context, split_inputs
from pipeline.tracking._links import run_url, study_links, ui_base
from pipeline.tracking._mlflow_runs import Tracker, quiet_mlflow
from pipeline.tracking._track import PARENT_ATTR, MLflowObserver, log_study, mark_champion, reconcile, remember_run_ids

__all__ = [
    "MLflowObserver",
    "PARENT_ATTR",
    "Tracker",
    "input_context",
    "log_study",
    "quiet_mlflow",
    "mark_champion",
    "reconcile",
    "remember_run_ids",
    "split_inputs",
    "run_url",
    "study_links",
    "ui_base",
]
