"""Direct links into the MLflow UI (`sweep ui-links`, printed by `make ui`)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli._commands import app
from pipeline.config import load_study, tracking_uri
from pipeline.tracking import Tracker
from pipeline.tracking import _links as links

BASE = "http://127.0.0.1:5000"


def test_urls_open_the_runs_table_in_model_training_mode():
    assert links.runs_table_url(BASE + "/", "3") == f"{BASE}/#/experiments/3/runs?workflowType=machine_learning"
    assert links.runs_table_url(BASE, "3", "tiny") == (
        f"{BASE}/#/experiments/3/runs?workflowType=machine_learning"
        "&searchFilter=tags.%60sweep.study%60%20%3D%20%27tiny%27"
    )
    assert links.run_url(BASE, "3", "abc", "model-metrics") == (
        f"{BASE}/#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"
    )
    assert links.model_url(BASE, "hymenoptera classifier") == f"{BASE}/#/models/hymenoptera%20classifier"


def test_study_links_before_and_after_the_study_ran(sweep_home, study_file):
    cfg = load_study(study_file)
    db = sweep_home / "mlflow.db"
    assert links.study_links(cfg, BASE) == [
        f"no MLflow store at {db.resolve()} yet: run the study first; the MLflow UI: {BASE}"
    ]
    assert not db.exists(), "looking up the links creates no store"
    tracker = Tracker(tracking_uri(cfg), cfg.experiment_name, sweep_home / "artifacts")
    assert links.study_links(cfg, BASE) == ["no runs of study 'tiny' in experiment 'tiny' yet"]
    tracker.open_parent("tiny", None, {})
    runs = links.runs_table_url(BASE, tracker.experiment_id, "tiny")
    assert links.study_links(cfg, BASE) == [f"runs of study 'tiny': {runs}"]
    MlflowClient(tracking_uri(cfg), registry_uri=tracking_uri(cfg)).create_registered_model("tiny-classifier")
    result = CliRunner().invoke(app, ["ui-links", str(study_file), "--base-url", BASE])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"runs of study 'tiny': {runs}",
        f"registered model 'tiny-classifier': {BASE}/#/models/tiny-classifier",
    ]


def test_report_links_never_carry_the_servers_password():
    assert links.ui_base("http://bob:s3cret@mlflow:5000/") == "http://mlflow:5000"
    assert links.ui_base("https://mlflow.example.org/ml") == "https://mlflow.example.org/ml"
    assert links.ui_base("sqlite:///mlruns/mlflow.db") == "http://127.0.0.1:5000"  # where `make ui` serves
