"""The report stage end to end on one tiny study, reported twice.

One study (2 real trials, 2 epochs, 32 px) is shared by the module: trial 0 is enqueued with a
learning setup that stays at chance, trial 1 with one that separates the colours, so the best
COMPLETE trial is not simply the first. A PRUNED trial with a higher value and a FAIL trial are
added through Optuna's API, so selection, plots and the pruning arithmetic meet every state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from pipeline import training as train
from pipeline.champion._confidence import accuracy_interval
from pipeline.cli._commands import app
from pipeline.config import checkpoint_dir, load_study, storage_url, tracking_uri
from pipeline.core import RegistryError
from pipeline.search import open_study
from pipeline.stages import _report as R
from pipeline.stages import run_study
from pipeline.tracking import PARENT_ATTR

from conftest import COLOURS, make_folder, study_dict, write_image, write_study

# Measured on this data: frozen random features (freeze_depth 5) + a head trained at lr 0.2 separate
# the two colours within 2 epochs of 4 batches; training layer4 at lr 0.01 stays at chance.
BAD = {"lr": 0.01, "momentum": 0.9, "freeze_depth": 4, "aug_strength": 0.0}
GOOD = {"lr": 0.2, "momentum": 0.9, "freeze_depth": 5, "aug_strength": 0.0}
SPACE = {
    "lr": {"type": "float", "low": 0.005, "high": 0.3, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.95},
    "freeze_depth": {"type": "int", "low": 0, "high": 5},
    "aug_strength": {"type": "float", "low": 0.0, "high": 0.5},
}
PRUNED_SECONDS_PER_EPOCH = 2.5


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add_synthetic_trials(study: optuna.Study) -> None:
    """A PRUNED trial whose value beats every COMPLETE one, and a FAIL trial."""
    dists = study.trials[0].distributions
    history = [
        {
            "epoch": 0,
            "train_loss": 0.1,
            "train_accuracy": 1.0,
            "val_loss": 0.1,
            "val_accuracy": 1.0,
            "lr": 0.1,
            "seconds": PRUNED_SECONDS_PER_EPOCH,
        }
    ]
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            value=1.0,
            params={**GOOD, "lr": 0.1},
            distributions=dists,
            intermediate_values={0: 1.0},
            user_attrs={"history": history, "epochs_run": 1, "seconds": 3.0},
        )
    )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={**GOOD, "lr": 0.05},
            distributions=dists,
            user_attrs={
                "history": [],
                "epochs_run": 0,
                "seconds": 0.5,
                "fail_reason": "ValueError: boom at train.py:1",
            },
        )
    )


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """Run the study, add the synthetic trials, report twice while counting test evaluations."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWEEP_HOME", str(tmp / "mlruns"))
        images = make_folder(tmp / "images")
        tree = study_dict(
            images,
            data={"batch_size": 4},
            search_space=SPACE,
            training={"epochs": 2, "aug_strength": 0.0},
            registry={"model_name": "tiny-classifier", "alias": "champion", "keep_top_k": 1},
        )
        study_file = write_study(tmp / "study.yaml", tree)
        cfg = load_study(study_file)
        study = open_study(cfg, storage_url(cfg))
        study.enqueue_trial(BAD)
        study.enqueue_trial(GOOD)
        run_study(cfg)
        study = optuna.load_study(study_name=cfg.study.name, storage=storage_url(cfg))
        _add_synthetic_trials(study)
        checkpoints_before = sorted(p.name for p in checkpoint_dir(cfg.study.name).iterdir())

        calls = []
        real_evaluate = train.evaluate

        def counting_evaluate(*args, **kwargs):
            calls.append(len(args[1].dataset))
            return real_evaluate(*args, **kwargs)

        mp.setattr(train, "evaluate", counting_evaluate)
        first = R.run_report(cfg)
        second = R.run_report(cfg)
        mp.setattr(train, "evaluate", real_evaluate)
        yield SimpleNamespace(
            cfg=cfg,
            tmp=tmp,
            home=tmp / "mlruns",
            study_file=study_file,
            images=images,
            first=first,
            second=second,
            calls=calls,
            checkpoints_before=checkpoints_before,
            study=optuna.load_study(study_name=cfg.study.name, storage=storage_url(cfg)),
            env={"SWEEP_HOME": str(tmp / "mlruns")},
        )


def test_selects_best_complete_trial_not_pruned_one(done):
    trials = done.study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    expected = min(complete, key=lambda t: (-t.value, t.number))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED, TrialState.FAIL]
    assert complete[1].value > complete[0].value  # the enqueued setups did what they should
    assert done.first.selected_trial == expected.number == 1
    assert done.first.val_value == pytest.approx(expected.value)
    assert trials[2].value == 1.0 >= expected.value  # the PRUNED trial's value is never eligible


def test_test_split_is_evaluated_exactly_once(done):
    assert done.calls == [6]  # one pass over the 6 sealed test images, in the first report only
    assert done.first.evaluated_now and not done.second.evaluated_now
    sha = _sha(checkpoint_dir("tiny") / "trial-1.pt")
    record = done.study.user_attrs[f"sweep_test_eval:1:{sha}"]
    assert record["n_images"] == 6 and record["trial_number"] == 1
    assert record["accuracy"] == done.first.test.accuracy == done.second.test.accuracy
    cells = record["confusion_cells"]  # [true, predicted, count], non-zero cells only
    assert sum(n for _, _, n in cells) == 6 and all(n > 0 for _, _, n in cells)
    assert record["accuracy"] == pytest.approx(sum(n for i, j, n in cells if i == j) / 6)
    assert [k for k in done.study.user_attrs if k.startswith("sweep_test_eval")] == [f"sweep_test_eval:1:{sha}"]


def test_one_model_version_with_alias_metadata_and_lineage(done):
    client = MlflowClient(tracking_uri(done.cfg), registry_uri=tracking_uri(done.cfg))
    versions = client.search_model_versions("name='tiny-classifier'")
    assert [str(v.version) for v in versions] == ["1"]
    assert done.first.registered.created and not done.second.registered.created
    assert str(client.get_model_version_by_alias("tiny-classifier", "champion").version) == "1"
    tags = versions[0].tags
    trial = done.study.trials[1]
    assert tags["sweep.study"] == "tiny" and tags["sweep.trial_number"] == "1"
    assert tags["sweep.parent_run_id"] == done.study.user_attrs[PARENT_ATTR]
    assert tags["sweep.trial_run_id"] == trial.user_attrs["mlflow_run_id"] == versions[0].run_id
    assert tags["sweep.checkpoint_sha256"] == _sha(checkpoint_dir("tiny") / "trial-1.pt")
    # logging the model under the trial's run left its status alone
    assert client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "FINISHED"

    import mlflow

    mlflow.set_tracking_uri(tracking_uri(done.cfg))
    info = mlflow.models.get_model_info("models:/tiny-classifier@champion")
    meta = info.metadata
    assert meta["classes"] == ["ants", "bees"] and meta["class_to_idx"] == {"ants": 0, "bees": 1}
    assert meta["preprocess"]["crop"] == 32 and meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["arch"] == "resnet18" and meta["weights_origin"] == "random initialisation"
    assert meta["study"] == "tiny" and meta["trial_number"] == 1
    assert meta["val_accuracy"] == pytest.approx(trial.value)
    assert meta["test_accuracy"] == pytest.approx(done.first.test.accuracy)
    assert [c.type.name for c in info.signature.inputs.inputs] == ["binary"]  # one image per row
    assert [c.name for c in info.signature.outputs.inputs] == ["label", "probability", "probabilities", "error"]
    assert set(info.flavors) == {"python_function"} and info.flavors["python_function"]["code"] == "code"


def test_report_files(done):
    folder = done.tmp / "reports" / "tiny"
    assert done.first.folder == folder
    frame = pd.read_csv(folder / "trials.csv")
    assert list(frame.columns) == [
        "number",
        "state",
        "role",
        "lr",
        "freeze_depth",
        "momentum",
        "aug_strength",
        "best_val_accuracy",
        "best_epoch",
        "epochs_run",
        "seconds",
        "mlflow_run_id",
    ]
    # sorted by val accuracy, ties by number; the FAIL trial (no epoch) last
    assert list(frame["number"]) == [1, 2, 0, 3]
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "COMPLETE", "FAIL"]
    assert list(frame["epochs_run"]) == [2, 1, 2, 0]
    assert frame.loc[0, "best_val_accuracy"] == pytest.approx(done.study.trials[1].value)
    assert math.isnan(frame.loc[3, "best_val_accuracy"])
    text = (folder / "report.md").read_text()
    assert "**Trial 1**" in text and "`tiny-classifier` version 1" in text
    assert "trial 3: ValueError: boom at train.py:1" in text
    trials_table = text.split("## Trials", 1)[1].split("\n\n")[2].splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in trials_table]
    assert cells[0] == [c for c in frame.columns if c != "mlflow_run_id"]
    # each trial number links to its run in the MLflow UI's training view
    runs = dict(zip(frame["number"], frame["mlflow_run_id"], strict=True))
    experiment = MlflowClient(tracking_uri(done.cfg)).get_experiment_by_name(done.cfg.experiment_name).experiment_id
    assert [row[:2] for row in cells[2:]] == [
        [f"[{n}](http://127.0.0.1:5000/#/experiments/{experiment}/runs/{runs[n]}?workflowType=machine_learning)", state]
        for n, state in ((1, "COMPLETE"), (2, "PRUNED"), (0, "COMPLETE"), (3, "FAIL"))
    ]
    assert cells[-1][cells[0].index("best_val_accuracy")] == "" and cells[-1][cells[0].index("best_epoch")] == ""
    assert f"{done.first.test.n_images} images" in text and "| true ants |" in text
    assert [p.name for p in done.first.files] == [
        "trials.csv",
        "optimization_history.png",
        "param_importances.png",
        "learning_curves.png",
        *(f"val_accuracy_vs_{p}.png" for p in ("lr", "momentum", "freeze_depth", "aug_strength")),
        "confusion_matrix.png",
        "per_class.csv",
        "confusion_matrix.csv",
        "report.md",
        "report.html",
    ]
    html = (folder / "report.html").read_text()
    pngs = [p for p in done.first.files if p.suffix == ".png"]
    assert html.count('<img src="data:image/png;base64,') == len(pngs) == 8  # every plot embedded
    for name in (
        "optimization_history",
        "param_importances",
        "learning_curves",
        "confusion_matrix",
        *(f"val_accuracy_vs_{p}" for p in ("lr", "momentum", "freeze_depth", "aug_strength")),
    ):
        png = folder / f"{name}.png"
        assert png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_and_pruning_savings(done):
    c = done.first.compute
    assert (c.trial_epochs, c.pruned_trials, c.epochs_saved) == (5, 1, 1)
    assert c.seconds_saved == pytest.approx(PRUNED_SECONDS_PER_EPOCH)
    trials = done.study.get_trials()
    assert c.seconds == pytest.approx(sum(t.user_attrs["seconds"] for t in trials))
    text = (done.first.folder / "report.md").read_text()
    assert "Spent: 5 trial-epochs" in text and "saved 1 trial-epochs (about 2.5 s" in text


def test_report_logged_to_parent_run(done):
    client = MlflowClient(tracking_uri(done.cfg))
    parent = done.study.user_attrs[PARENT_ATTR]
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "report")}
    assert {"trials.csv", "report.md", "report.html", "learning_curves.png", "confusion_matrix.png"} <= logged
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sweep.selected_trial"] == "1"
    assert run.data.tags["sweep.registered_model"] == "tiny-classifier/1"
    assert [m.value for m in client.get_metric_history(parent, "test_accuracy")] == [done.first.test.accuracy]
    # the selected trial's val figure and the test interval, logged once (the second report reused the test)
    value = done.study.trials[1].value
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in done.study.trials[1].params.items()
    )
    assert [m.value for m in client.get_metric_history(parent, "selected_val_accuracy")] == [value]
    test = done.first.test
    correct = sum(test.confusion[i][i] for i in range(2))
    low, high = accuracy_interval(correct, test.n_images)
    assert [m.value for m in client.get_metric_history(parent, "test_accuracy_ci_low")] == [pytest.approx(low)]
    assert [m.value for m in client.get_metric_history(parent, "test_accuracy_ci_high")] == [pytest.approx(high)]
    assert run.data.tags["mlflow.note.content"] == (
        "**Study `tiny`**: 4 trials (2 complete, 1 pruned, 1 failed).\n\n"
        f"Selected **trial 1**: val_accuracy {value:.4f} at epoch {done.first.best_epoch} ({params}).\n"
        f"Sealed test split: test accuracy {test.accuracy:.3f} ({correct}/6; 95% CI {low:.3f}-{high:.3f}, wilson); "
        f"val {value:.3f}, gap {value - test.accuracy:+.3f}.\n"
        "Registered model: `models:/tiny-classifier@champion` (version 1).\n"
        "Full report: `report/report.html` in this run's artifacts."
    )
    params = run.data.params
    assert (params["arch"], params["weights"], params["n_trials"], params["sampler"]) == (
        "resnet18",
        "none",
        "2",
        "random (seed=0)",
    )
    assert params["space.lr"] == "float [0.005, 0.3] log" and params["pruner"] == "none"


def test_checkpoint_cleanup_keeps_top_k_and_selected(done):
    # no trial points at a checkpoint file: the report deletes most of them, and a finished
    # trial's attrs cannot change afterwards
    assert all("checkpoint" not in t.user_attrs for t in done.study.trials)
    assert done.checkpoints_before == ["trial-0.pt", "trial-1.pt"]
    assert sorted(p.name for p in checkpoint_dir("tiny").iterdir()) == ["trial-1.pt"]
    assert [p.name for p in done.first.cleanup.deleted] == ["trial-0.pt"]
    assert done.second.cleanup.deleted == ()


def test_summary_lines(done):
    lines = done.second.summary().splitlines()
    assert lines[0] == f"selected trial 1 of study 'tiny': val_accuracy 1.0000 at epoch {done.first.best_epoch}"
    assert "stored evaluation, not re-run" in lines[1]
    assert lines[2] == (
        "model 'tiny-classifier' version 1 already registered; alias 'champion' -> "
        "version 1 (models:/tiny-classifier@champion)"
    )


def test_status_prints_trials_and_writes_nothing(done, monkeypatch):
    monkeypatch.setenv("SWEEP_HOME", str(done.home))
    stores = [done.home / "optuna.db", done.home / "mlflow.db"]
    before = [(_sha(p), p.stat().st_mtime_ns) for p in stores]
    result = CliRunner().invoke(app, ["status", str(done.study_file)])
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    assert rows[0].split()[:4] == ["number", "state", "role", "lr"]
    assert [r.split()[1:3] for r in rows[1:]] == [
        ["COMPLETE", "search"],
        ["PRUNED", "search"],
        ["COMPLETE", "search"],
        ["FAIL", "search"],
    ]
    assert [(_sha(p), p.stat().st_mtime_ns) for p in stores] == before


def test_predict_cli_gives_known_labels(done, monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_HOME", str(done.home))
    for i in range(2):
        write_image(tmp_path / "new" / f"bee_{i}.png", COLOURS["bees"], seed=500 + i)
        write_image(tmp_path / "new" / f"ant_{i}.jpg", COLOURS["ants"], seed=600 + i, fmt="JPEG")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "models:/tiny-classifier@champion", str(tmp_path / "new"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {Path(r["file"]).name: r["label"] for r in rows} == {
        "ant_0.jpg": "ants",
        "ant_1.jpg": "ants",
        "bee_0.png": "bees",
        "bee_1.png": "bees",
    }
    for r in rows:
        assert r["probability"] == max(r["probabilities"].values())
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    table = runner.invoke(app, ["predict", "models:/tiny-classifier@champion", str(tmp_path / "new" / "bee_0.png")])
    assert table.exit_code == 0 and "bee_0.png" in table.stdout and "bees" in table.stdout


def test_predict_cli_bad_inputs_are_one_line(done, monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_HOME", str(done.home))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    uri = "models:/tiny-classifier@champion"
    cases = {
        (uri, str(tmp_path / "missing.png")): (
            3,
            f"error: {tmp_path / 'missing.png'}: no such file or folder; give image files or folders of images",
        ),
        (uri, str(tmp_path / "empty")): (3, f"error: {tmp_path / 'empty'}: no image files in this folder"),
        (uri, str(tmp_path / "broken.jpg")): (3, f"error: {tmp_path / 'broken.jpg'}: not an image file"),
        ("models:/tiny-classifier@nope", str(tmp_path / "broken.jpg")): (
            7,
            "error: models:/tiny-classifier@nope: cannot be loaded from sqlite:///",
        ),
    }
    for args, (code, start) in cases.items():
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == code, result.output
        assert result.stderr.startswith(start), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_model_loads_in_fresh_cpu_process_from_files_and_from_tensors(done, tmp_path):
    """The README snippet: image files in, labels and probabilities out; and the tensor path."""
    image = write_image(tmp_path / "bee.png", COLOURS["bees"], seed=700)
    script = textwrap.dedent(f"""
        import json, mlflow, numpy as np, torch
        from pipeline.data import Preprocess, eval_transform, load_rgb

        mlflow.set_tracking_uri({tracking_uri(done.cfg)!r})
        model = mlflow.pyfunc.load_model("models:/tiny-classifier@champion")
        frame = model.predict([{str(image)!r}])
        classifier = model.unwrap_python_model()
        pp = model.metadata.metadata["preprocess"]
        x = eval_transform(Preprocess(pp["resize"], pp["crop"], tuple(pp["mean"]), tuple(pp["std"]),
                                      pp["interpolation"]))(load_rgb({str(image)!r})).numpy()[None]
        with torch.no_grad():
            probs = classifier.module(torch.from_numpy(x)).numpy()
        print(json.dumps({{"label": frame["label"][0], "columns": list(frame.columns),
                          "same": bool(np.allclose([frame["probabilities"][0][c] for c in classifier.classes], probs[0],
                                                   atol=1e-6)),
                          "cuda": torch.cuda.is_available(), "type": type(classifier.module).__name__}}))
    """)
    env = {**os.environ, **done.env, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "label": "bees",
        "columns": ["label", "probability", "probabilities", "error"],
        "same": True,
        "cuda": False,
        "type": "Sequential",
    }


def test_no_complete_trial_is_a_clear_error(tmp_path, monkeypatch, image_root):
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path / "mlruns"))
    tree = study_dict(
        image_root,
        study={"name": "hopeless", "n_trials": 2, "pruner": {"type": "none"}, "sampler": {"type": "random", "seed": 0}},
    )
    study_file = write_study(tmp_path / "hopeless.yaml", tree)
    cfg = load_study(study_file)
    study = open_study(cfg, storage_url(cfg))
    dist = {
        "lr": optuna.distributions.FloatDistribution(0.001, 0.05, log=True),
        "freeze_depth": optuna.distributions.IntDistribution(0, 2),
    }
    params = {"lr": 0.01, "freeze_depth": 0}
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED, value=0.5, params=params, distributions=dist, intermediate_values={0: 0.5}
        )
    )
    study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=dist))
    result = CliRunner().invoke(app, ["report", str(study_file)])
    assert result.exit_code == RegistryError.exit_code == 7
    assert result.stderr == (
        "error: study 'hopeless' has no COMPLETE trial (1 pruned, 1 failed): nothing to test or register; "
        "run `sweep run` with this study file to add trials (raise --n-trials)\n"
    )
    # the comparison is still written, for a study whose every trial was pruned or failed
    assert (tmp_path / "reports" / "hopeless" / "trials.csv").is_file()
    assert "No COMPLETE trial" in (tmp_path / "reports" / "hopeless" / "report.md").read_text()


def test_report_cli_prints_summary_and_changes_nothing(done, monkeypatch):
    monkeypatch.setenv("SWEEP_HOME", str(done.home))
    result = CliRunner().invoke(app, ["report", str(done.study_file)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.stdout and "stored evaluation, not re-run" in result.stdout
    assert "model 'tiny-classifier' version 1 already registered" in result.stdout
    client = MlflowClient(tracking_uri(done.cfg), registry_uri=tracking_uri(done.cfg))
    assert len(client.search_model_versions("name='tiny-classifier'")) == 1


def test_unwritable_report_folder_is_one_line(tmp_path, monkeypatch, study_file):
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path / "mlruns"))
    cfg = load_study(study_file)
    open_study(cfg, storage_url(cfg))
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["report", str(study_file), "--out", str(tmp_path / "afile" / "r")])
    assert result.exit_code == 5
    assert result.stderr.startswith(f"error: {tmp_path / 'afile' / 'r'}: cannot create the report folder (")
