"""A password in the storage URL never reaches MLflow: the parent run's tags and its study.yaml
artifact carry the URL masked as `***`."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.config import load_study, tracking_uri
from pipeline.stages import run_study

from conftest import study_dict, write_study


def test_storage_password_is_masked_in_the_parent_run(sweep_home, tmp_path, image_root, postgres):
    url = postgres("masked").replace("postgres@", "postgres:s3cr3t-pw@")  # trust auth ignores it
    tree = study_dict(
        image_root,
        study={"n_trials": 1, "storage": url},
        training={"epochs": 1, "lr": 0.01},
        selection={"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0},
    )
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    outcome = run_study(cfg)
    client = MlflowClient(tracking_uri(cfg))
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["sweep.storage"] == url.replace("s3cr3t-pw", "***")
    local = client.download_artifacts(outcome.parent_run_id, "study.yaml", str(tmp_path))
    text = Path(local).read_text(encoding="utf-8")
    assert "s3cr3t-pw" not in text and "postgres:***@" in text
    assert all("s3cr3t-pw" not in str(v) for v in {**parent.data.tags, **parent.data.params}.values())
