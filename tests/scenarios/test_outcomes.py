"""How a run ends: a study that produced nothing usable fails (exit 8, parent run FAILED), a
failure that repeats on every trial says so, a changed training recipe is refused on resume, and
Ctrl-C at any moment of a command is one line and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.config import load_study, storage_url, tracking_uri
from pipeline.core import StudyFailedError, StudyStateError
from pipeline.search import TrialObserver, load_existing, open_study
from pipeline.stages import run_study

from conftest import study_dict, write_study


class Breaker(TrialObserver):
    """Corrupts one train image when a trial starts and never restores it."""

    def __init__(self, victim):
        self.victim, self.messages = victim, []

    def trial_started(self, event):
        self.victim.write_bytes(b"not an image")

    def message(self, text):
        self.messages.append(text)


def _parent(cfg):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_a_failure_on_every_trial_fails_the_study_and_names_the_error(sweep_home, tmp_path, image_root):
    tree = study_dict(image_root, study={"n_trials": 5, "max_failed_trials": 2})
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    victim = image_root / "train" / "ants" / "img_0.png"
    breaker = Breaker(victim)
    with pytest.raises(StudyFailedError) as caught:
        run_study(cfg, observers=[breaker])
    message = str(caught.value)
    assert message.startswith(
        "study 'tiny' produced no usable result (0 complete, 0 pruned, 2 failed; stopped: too many failed trials)"
    )
    assert "every failed trial failed with the same error: " in message
    assert f"{victim}: cannot be decoded mid-training" in message.split("the same error: ")[1]
    assert "does not depend on the sampled parameters" in message
    assert any("every one with the same error" in m for m in breaker.messages)
    assert [p.info.status for p in _parent(cfg)] == ["FAILED"]
    states = [t.state for t in load_existing(cfg).get_trials()]
    assert states == [TrialState.FAIL, TrialState.FAIL]
    assert StudyFailedError.exit_code == 8


def test_cli_run_of_a_study_without_a_complete_trial_exits_8(sweep_home, tmp_path, image_root):
    tree = study_dict(
        image_root,
        study={"n_trials": 2, "max_failed_trials": 2},
        search_space={"lr": {"type": "float", "low": 1e29, "high": 1e30, "log": True}},
    )
    path = write_study(tmp_path / "study.yaml", tree)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--quiet", "--no-report"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SWEEP_HOME": str(sweep_home)},
    )
    assert done.returncode == 8, done.stderr
    assert "error: study 'tiny' produced no usable result (0 complete, 0 pruned, 2 failed" in done.stderr
    assert "Traceback" not in done.stderr
    assert [p.info.status for p in _parent(load_study(path))] == ["FAILED"]


def test_a_changed_training_recipe_is_refused_on_resume(sweep_home, tmp_path, image_root):
    tree = study_dict(image_root, study={"n_trials": 1}, training={"epochs": 1, "lr": 0.01})
    run_study(load_study(write_study(tmp_path / "study.yaml", tree)))
    tree["training"]["epochs"] = 2
    changed = load_study(write_study(tmp_path / "study.yaml", tree))
    with pytest.raises(StudyStateError, match=r"training\.epochs: 1 -> 2"):
        open_study(changed, storage_url(changed))
    tree["training"]["device"] = "cpu"  # where trials run is not part of the recipe
    tree["training"]["epochs"] = 1
    same = load_study(write_study(tmp_path / "study.yaml", tree))
    assert open_study(same, storage_url(same)).study_name == "tiny"


# From 1 s on: the first milliseconds belong to the interpreter's own start-up, before any line
# of ours runs (`pipeline.cli` installs its handlers as its first statements).
@pytest.mark.parametrize("delay", [1.0, 3.0, 8.0])
def test_ctrl_c_at_any_moment_of_sweep_run_is_one_line_and_130(sweep_home, tmp_path, image_root, delay):
    tree = study_dict(image_root, study={"n_trials": 50}, training={"epochs": 3})
    path = write_study(tmp_path / "study.yaml", tree)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(path), "--quiet", "--no-report"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SWEEP_HOME": str(sweep_home)},
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # The interrupt's own line; a trial's progress line may name its fail reason "interrupted" too.
    lines = [line for line in err.splitlines() if line.startswith("interrupted (Ctrl-C)")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err


def test_ctrl_c_in_a_command_without_trials_does_not_talk_of_trials(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "predict", "models:/x@champion", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() in (
        "interrupted (Ctrl-C) while starting: nothing was changed",
        "interrupted (Ctrl-C): stopped; nothing was changed",
    )
