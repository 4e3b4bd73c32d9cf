"""The command line: each error family -> its exit code and one message on stderr, never a bare
traceback; `--debug` / SWEEP_DEBUG=1 add the traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import _commands as cli
from pipeline.core import ConfigError, DataError, ModelError, RegistryError, StudyStateError, TrackingError

from conftest import study_dict, write_study

runner = CliRunner()
FAMILIES = [
    (ConfigError, 2),
    (DataError, 3),
    (ModelError, 4),
    (TrackingError, 5),
    (StudyStateError, 6),
    (RegistryError, 7),
]


def _raising(err: BaseException):
    def load(*args, **kwargs):
        raise err

    return load


@pytest.mark.parametrize("family, code", FAMILIES)
def test_each_error_family_exits_with_its_code_and_one_line(family, code, monkeypatch, tmp_path):
    # Brackets in a message are printed as they are, not read as terminal markup.
    monkeypatch.setattr(cli, "_load", _raising(family("data.root: images/[bold]/train: no such folder")))
    result = runner.invoke(cli.app, ["status", str(tmp_path / "study.yaml")])
    assert result.exit_code == code
    assert result.stderr.splitlines() == ["error: data.root: images/[bold]/train: no such folder"]
    assert result.stdout == ""


def test_a_bug_is_one_line_naming_it_and_exit_1(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load", _raising(RuntimeError("boom\nsecond line")))
    result = runner.invoke(cli.app, ["status", str(tmp_path / "study.yaml")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: unexpected RuntimeError: boom; rerun with `sweep --debug` (or SWEEP_DEBUG=1) for the traceback"
    ]


@pytest.mark.parametrize("how", [["--debug"], "SWEEP_DEBUG"])
def test_debug_keeps_the_traceback(how, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load", _raising(DataError("images/train: no such folder")))
    args = ["status", str(tmp_path / "study.yaml")]
    if how == "SWEEP_DEBUG":
        result = runner.invoke(cli.app, args, env={"SWEEP_DEBUG": "1"})
    else:
        result = runner.invoke(cli.app, [*how, *args])
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "pipeline.core._errors.DataError: images/train: no such folder" in lines
    assert lines[-1] == "error: images/train: no such folder"


def test_bad_study_file_is_a_config_error_naming_the_key(tmp_path, image_root):
    tree = study_dict(image_root)
    tree["study"]["n_trails"] = 3
    path = write_study(tmp_path / "study.yaml", tree)
    result = runner.invoke(cli.app, ["run", str(path), "--no-report"])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}: study.n_trails: ")


def test_missing_data_folder_is_a_data_error(tmp_path, sweep_home):
    path = write_study(tmp_path / "study.yaml", study_dict(tmp_path / "missing"))
    result = runner.invoke(cli.app, ["run", str(path), "--no-report", "--quiet"])
    assert result.exit_code == 3
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'missing'}")


def test_unwritable_store_is_a_tracking_error(tmp_path, study_file, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store folder should be")
    monkeypatch.setenv("SWEEP_HOME", str(blocker / "mlruns"))
    result = runner.invoke(cli.app, ["run", str(study_file), "--no-report", "--quiet"])
    assert result.exit_code == 5
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {blocker / 'mlruns'}: cannot write there (")


def test_status_of_a_study_never_run_is_a_study_state_error(sweep_home, study_file):
    result = runner.invoke(cli.app, ["status", str(study_file)])
    assert result.exit_code == 6
    assert result.stderr.splitlines() == [
        f"error: no Optuna storage at sqlite:///{(sweep_home / 'optuna.db').resolve()}: "
        "run `sweep run` with this study file first"
    ]


def test_a_password_in_any_message_is_masked(monkeypatch, tmp_path):
    err = TrackingError("Optuna storage postgresql+psycopg://sweep:s3cret@db/optuna: cannot connect (refused)")
    monkeypatch.setattr(cli, "_load", _raising(err))
    result = runner.invoke(cli.app, ["status", str(tmp_path / "study.yaml")])
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        "error: Optuna storage postgresql+psycopg://sweep:***@db/optuna: cannot connect (refused)"
    ]


def test_storage_proxy_serves_a_database_only(tmp_path):
    result = runner.invoke(cli.app, ["storage-proxy", f"journal:///{tmp_path / 'o.journal'}", "--port", "13999"])
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        f"error: sweep storage-proxy journal:///{tmp_path / 'o.journal'}: the proxy serves a database "
        "(postgresql://..., mysql://..., sqlite:///...), not a journal file; give it the database URL"
    ]
    assert not (tmp_path / "o.journal").exists()


def test_cuda_without_a_gpu_stops_at_pre_flight_with_nothing_stored(study_file, sweep_home, monkeypatch):
    # A user's report: `--set training.device=cuda` on a CPU machine stored the study, enqueued the
    # seed recipe and then failed inside the probe as an "unexpected RuntimeError".
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(cli.app, ["run", str(study_file), "--set", "training.device=cuda", "--quiet"])
    assert result.exit_code == 2
    built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    assert result.stderr.splitlines() == [
        f"error: training.device: cuda, but torch {torch.__version__} ({built}) sees no CUDA device; "
        "use auto or cpu, or run where a GPU and its driver are present"
    ]
    assert not (sweep_home / "optuna.db").exists()


def test_a_folder_as_tracking_uri_names_the_sqlite_uri_to_use(study_file, sweep_home, tmp_path, monkeypatch):
    # A user's report: `--set tracking.uri=/nonexistent/dir` printed MLflow's file-store notice
    # cut off mid-URL ("... See htt"), never what to write instead.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    folder = tmp_path / "runs"
    result = runner.invoke(cli.app, ["run", str(study_file), "--set", f"tracking.uri={folder}", "--quiet"])
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        f"error: tracking URI {folder}: a folder is MLflow's file store, which MLflow 3 no longer opens by "
        f"default; use sqlite:///{folder / 'mlflow.db'} (a database file in that folder), or set "
        "MLFLOW_ALLOW_FILE_STORE=true to keep a file store"
    ]
    assert not (sweep_home / "optuna.db").exists() and not folder.exists()
