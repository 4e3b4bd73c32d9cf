"""Faults inside a study, in-process: failing trials, changed study files, unusable stores."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.config import load_study, storage_url, tracking_uri
from pipeline.core import DataError, StudyFailedError, StudyStateError, TrackingError
from pipeline.search import TrialObserver, epoch_history, open_study
from pipeline.search import _tune as tune
from pipeline.stages import run_study
from pipeline.tracking import Tracker, reconcile

from conftest import study_dict, write_study


class Recorder(TrialObserver):
    def __init__(self, on_start=None, on_end=None):
        self.messages, self.ends = [], []
        self.on_start, self.on_end = on_start, on_end

    def trial_started(self, event):
        if self.on_start:
            self.on_start(event.number)

    def trial_ended(self, event):
        self.ends.append((event.number, event.state, event.reason))
        if self.on_end:
            self.on_end(event.number)

    def message(self, text):
        self.messages.append(text)


def _nested_runs(cfg):
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    return {int(r.data.tags["sweep.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}


def _lr_study(tmp_path, image_root, n_trials=1):
    tree = study_dict(
        image_root,
        study={"n_trials": n_trials},
        search_space={"lr": {"type": "float", "low": 1e-3, "high": 1e30, "log": True}},
    )
    return load_study(write_study(tmp_path / "study.yaml", tree))


def test_nan_loss_fails_the_trial_at_once_and_the_study_goes_on(sweep_home, tmp_path, image_root):
    cfg = _lr_study(tmp_path, image_root)
    study = open_study(cfg, storage_url(cfg))
    study.enqueue_trial({"lr": 1e30})
    study.enqueue_trial({"lr": 0.01})
    outcome = run_study(cfg, observers=[Recorder()])
    first, second = outcome.study.get_trials()
    assert first.state == TrialState.FAIL and second.state == TrialState.COMPLETE
    assert first.user_attrs["fail_reason"].startswith("non-finite loss: training loss became")
    assert first.user_attrs["epochs_run"] == 0, "NaN stops the trial inside its first epoch"
    runs = _nested_runs(cfg)
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["sweep.fail_reason"] == first.user_attrs["fail_reason"]
    assert runs[1].info.status == "FINISHED"


def test_image_broken_mid_study_fails_that_trial_naming_the_file(sweep_home, tmp_path, image_root):
    cfg = _lr_study(tmp_path, image_root)
    victim = image_root / "train" / "ants" / "img_0.png"
    original = victim.read_bytes()

    def corrupt(number):
        if number == 0:
            victim.write_bytes(b"not an image")

    def restore(number):
        victim.write_bytes(original)

    study = open_study(cfg, storage_url(cfg))
    study.enqueue_trial({"lr": 0.01})
    study.enqueue_trial({"lr": 0.01})
    outcome = run_study(cfg, observers=[Recorder(on_start=corrupt, on_end=restore)])
    first, second = outcome.study.get_trials()
    assert first.state == TrialState.FAIL and second.state == TrialState.COMPLETE
    assert f"{victim}: cannot be decoded mid-training" in first.user_attrs["fail_reason"]


def test_out_of_memory_reason_says_what_to_lower(sweep_home, tmp_path, image_root, monkeypatch):
    cfg = _lr_study(tmp_path, image_root)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tune, "fit_config", oom)
    with pytest.raises(StudyFailedError, match="stopped: too many failed trials"):
        run_study(
            cfg.model_copy(update={"study": cfg.study.model_copy(update={"max_failed_trials": 2})}),
            observers=[Recorder()],
        )
    reasons = [t.user_attrs["fail_reason"] for t in tune.load_existing(cfg).get_trials()]
    assert reasons == ["out of memory: lower data.batch_size or data.image_size"] * 2


def test_changed_study_file_is_refused_before_any_trial(sweep_home, tmp_path, image_root):
    tree = study_dict(image_root, study={"n_trials": 1})
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    run_study(cfg)
    tree["search_space"]["lr"]["high"] = 0.1
    tree["model"]["arch"] = "resnet34"
    changed = load_study(write_study(tmp_path / "study.yaml", tree), ["study.n_trials=2"])
    with pytest.raises(StudyStateError) as err:
        run_study(changed)
    assert str(err.value) == (
        f"study 'tiny' in {storage_url(cfg)} was created with different settings:\n"
        '  model.arch: "resnet18" -> "resnet34"\n'
        "  search_space.lr.high: 0.05 -> 0.1\n"
        "Start a new study (--set study.name=NEW_NAME), or resume with these changes (--accept-changes)"
    )
    study = optuna.load_study(study_name="tiny", storage=storage_url(cfg))
    assert len(study.trials) == 1, "no trial was created by the refused run"
    assert len(run_study(changed, accept_changes=True).study.trials) == 2


def test_unwritable_store_folder_is_named_before_training(tmp_path, monkeypatch, study_file):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store folder should be")
    monkeypatch.setenv("SWEEP_HOME", str(blocker / "mlruns"))
    with pytest.raises(TrackingError) as err:
        run_study(load_study(study_file))
    assert str(err.value).startswith(f"{blocker / 'mlruns'}: cannot write there (")
    assert str(err.value).endswith(
        "free disk space or fix its permissions, or point --storage/--tracking-uri elsewhere"
    )


def test_disk_full_is_named_before_training(sweep_home, study_file, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TrackingError) as err:
        run_study(load_study(study_file))
    assert str(err.value) == (
        f"{sweep_home}: cannot write there (No space left on device); free disk space or fix its "
        "permissions, or point --storage/--tracking-uri elsewhere"
    )
    assert not (sweep_home / "optuna.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path, port):
    """A real `mlflow server` on loopback, backed by a sqlite file that outlives it."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root",
        str(tmp_path / "server-artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("mlflow server did not start")


def _stop_server(proc):
    os.killpg(proc.pid, 9)
    proc.wait()


def test_tracking_server_down_mid_study_keeps_results_in_optuna(sweep_home, tmp_path, image_root, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = _free_port()
    server = {"proc": _start_server(tmp_path, port)}
    uri = f"http://127.0.0.1:{port}"
    tree = study_dict(image_root, study={"n_trials": 3}, tracking={"uri": uri})
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))

    def down_during_second(number):
        if number == 1:  # its run exists, but the store is gone before it can be ended
            _stop_server(server["proc"])

    recorder = Recorder(on_start=down_during_second)
    try:
        outcome = run_study(cfg, observers=[recorder])
    finally:
        if server["proc"].poll() is None:
            _stop_server(server["proc"])
    assert [t.state for t in outcome.study.get_trials()] == [TrialState.COMPLETE] * 3
    assert not outcome.tracking_ok
    said = [m for m in recorder.messages if not m.startswith("plan: ")]
    assert len(said) == 1 and said[0].startswith(f"MLflow store {uri} failed (")
    assert said[0].endswith("run `sweep report` once the store is back")
    # Back up: trial 0 was logged, trial 1's run was left RUNNING, trial 2 has none. The next
    # start (or report) closes the stuck run and rebuilds the missing one from Optuna's record.
    server["proc"] = _start_server(tmp_path, port)
    try:
        stuck = _nested_runs(cfg)
        assert sorted(stuck) == [0, 1] and stuck[1].info.status == "RUNNING"
        tracker = Tracker(uri, cfg.experiment_name)
        tracker.open_parent("tiny", outcome.parent_run_id, {})
        trials = outcome.study.get_trials(deepcopy=False)
        assert reconcile(tracker, trials, outcome.study.study_name) == [2]
        assert reconcile(tracker, trials, outcome.study.study_name) == [], "a second sync creates nothing"
        runs = _nested_runs(cfg)
        assert sorted(runs) == [0, 1, 2]
        for number, run in runs.items():
            assert run.info.status == "FINISHED"
            history = MlflowClient(uri).get_metric_history(run.info.run_id, "val_accuracy")
            expected = epoch_history(outcome.study.trials[number].user_attrs)
            assert [m.value for m in history] == pytest.approx([h["val_accuracy"] for h in expected])
        assert runs[2].data.tags["sweep.synced"] == "true"
    finally:
        _stop_server(server["proc"])


def test_failed_preflight_leaves_no_study_behind(sweep_home, tmp_path, image_root):
    tree = study_dict(image_root, study={"n_trials": 1})
    tree["data"]["root"] = str(tmp_path / "missing")
    with pytest.raises(DataError):
        run_study(load_study(write_study(tmp_path / "study.yaml", tree)))
    assert optuna.get_all_study_names(storage_url(load_study(tmp_path / "study.yaml"))) == []
    tree["data"]["root"] = str(image_root)  # the corrected file runs without --accept-changes
    outcome = run_study(load_study(write_study(tmp_path / "study.yaml", tree)))
    assert [t.state for t in outcome.study.trials] == [TrialState.COMPLETE]


def test_data_warnings_and_skipped_images_reach_the_user(sweep_home, tmp_path):
    from conftest import make_folder

    root = make_folder(tmp_path / "images", {"train": 6})
    make_folder(root, {"val": 6}, classes=("ants",))
    (root / "train" / "bees" / "broken.png").write_bytes(b"not an image")
    tree = study_dict(root, study={"n_trials": 1}, data={"bad_images": "skip"})
    recorder = Recorder()
    run_study(load_study(write_study(tmp_path / "study.yaml", tree)), observers=[recorder])
    assert recorder.messages[:2] == [
        f"warning: {root / 'val'}: no folder for class(es) bees",
        "data.bad_images: skip: training without 1 unreadable image(s): train/bees/broken.png (listed in splits.json)",
    ]
