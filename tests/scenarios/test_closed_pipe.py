"""`sweep run STUDY | head -2`: the reader of stdout goes away mid-run. A user's report: exit 1
with no message, every trial finished but the report stage never ran, so nothing was registered.
The run must carry on to the end (report and registry included) with its output dropped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import REPO, study_dict, write_study

pytestmark = pytest.mark.e2e


def test_a_run_whose_stdout_reader_left_still_reports_and_registers(tmp_path, image_root):
    study = write_study(tmp_path / "study.yaml", study_dict(image_root, training={"epochs": 1}))
    home = tmp_path / "mlruns"
    env = {**os.environ, "SWEEP_HOME": str(home), "SWEEP_REPORTS": str(tmp_path / "reports")}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(study), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=REPO,
        )
        proc.stdout.close()  # the reader is gone before the first line
        code = proc.wait(timeout=600)
    assert code == 0, (tmp_path / "stderr").read_text()
    assert (tmp_path / "reports" / "tiny" / "report.md").exists()
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("tiny-classifier", "champion").version) == "1"
