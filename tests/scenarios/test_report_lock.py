"""Two `sweep report` stages started together on one study: the second waits for the first (a lock
in the study's storage) and then reuses its test evaluation and model version."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from pipeline.config import load_study, tracking_uri
from pipeline.stages import run_study

from conftest import study_dict, write_study


def test_concurrent_reports_test_once_and_register_once(sweep_home, tmp_path, image_root):
    tree = study_dict(
        image_root,
        study={"n_trials": 1},
        training={"epochs": 1, "lr": 0.01},
        selection={"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0},
    )
    path = write_study(tmp_path / "study.yaml", tree)
    cfg = load_study(path)
    run_study(cfg)
    env = {**os.environ, "SWEEP_HOME": str(sweep_home), "SWEEP_REPORTS": str(tmp_path / "reports")}
    command = [sys.executable, "-m", "pipeline", "report", str(path)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    tested = sorted("evaluated now" in out for out, _ in outputs)
    assert tested == [False, True], "exactly one report evaluated the test split"
    reused = [out for out, _ in outputs if "stored evaluation, not re-run" in out]
    assert len(reused) == 1 and "already registered" in reused[0]
    client = MlflowClient(tracking_uri(cfg))
    assert len(client.search_model_versions("name='tiny-classifier'")) == 1
