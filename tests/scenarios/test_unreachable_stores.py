"""Stores that do not answer, from the command line: every command exits 5 (`predict` too) with one
line naming the store, its password masked as `***` wherever the URL was given (`--storage`,
`--set study.storage=`, `--tracking-uri`); and nothing is stored until both stores answer, so the
corrected run is not refused as a changed study."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

from pipeline.cli import _commands as cli
from pipeline.config import load_study, storage_url
from pipeline.core import TrackingError

runner = CliRunner()
PG = "postgresql://user:secret@127.0.0.1:1/db"  # port 1: nothing listens, refused at once
PG_LINE = (
    "error: Optuna storage postgresql://user:***@127.0.0.1:1/db: cannot connect ((psycopg.OperationalError) "
    'connection failed: connection to server at "127.0.0.1", port 1 failed: Connection refused); start the '
    "database server, or fix the host, user or password in --storage / study.storage"
)
HTTP = "http://user:secret@127.0.0.1:1"


def _lines(result) -> list[str]:
    assert "secret" not in result.stdout + result.stderr
    return result.stderr.splitlines()


@pytest.mark.parametrize("command", ["run", "status", "report"])
@pytest.mark.parametrize("how", ["--storage", "--set"])
def test_an_unreachable_storage_is_exit_5_with_the_password_masked(sweep_home, study_file, command, how):
    option = ["--storage", PG] if how == "--storage" else ["--set", f"study.storage={PG}"]
    result = runner.invoke(cli.app, [command, str(study_file), *option, *(["--quiet"] if command == "run" else [])])
    assert result.exit_code == 5, result.output
    assert _lines(result) == [PG_LINE]


def test_an_unreachable_tracking_server_stores_nothing_and_the_corrected_run_works(sweep_home, study_file):
    result = runner.invoke(cli.app, ["run", str(study_file), "--tracking-uri", HTTP, "--quiet", "--no-report"])
    assert result.exit_code == 5, result.output
    assert _lines(result) == [
        "error: MLflow tracking server http://user:***@127.0.0.1:1 cannot be used: connection refused "
        "(is the tracking server running?)"
    ]
    url = storage_url(load_study(study_file))
    assert optuna.get_all_study_names(url) == [], "no study is stored before both stores answer"
    fixed = ["--set", "training.epochs=1", "--n-trials", "1", "--quiet", "--no-report"]
    result = runner.invoke(cli.app, ["run", str(study_file), *fixed])
    assert result.exit_code == 0, result.output
    [study] = optuna.get_all_study_summaries(url)
    assert (study.study_name, study.n_trials) == ("tiny", 1)


def test_predict_from_an_unreachable_server_masks_the_password(tmp_path, image_root):
    result = runner.invoke(cli.app, ["predict", "models:/x@champion", str(image_root), "--tracking-uri", HTTP])
    assert result.exit_code == 5, result.output
    assert _lines(result) == [
        "error: MLflow tracking server http://user:***@127.0.0.1:1 cannot be used: connection refused; start it, "
        "or fix --tracking-uri / MLFLOW_TRACKING_URI"
    ]


def test_a_password_quoted_alone_is_masked_when_its_url_was_on_the_command_line(monkeypatch, study_file):
    # The last line of defence: a driver's message may quote the password without its URL.
    def load(*args, **kwargs):
        raise TrackingError("the server said: password 'secret' is wrong")

    monkeypatch.setattr(cli, "_load", load)
    result = runner.invoke(cli.app, ["status", str(study_file), "--storage", PG])
    assert result.exit_code == 5
    assert _lines(result) == ["error: the server said: password '***' is wrong"]
    result = runner.invoke(cli.app, ["status", str(study_file), "--set", f"study.storage={PG}"])
    assert _lines(result) == ["error: the server said: password '***' is wrong"]


def test_ui_links_from_an_unreachable_server_masks_the_password(study_file):
    result = runner.invoke(cli.app, ["ui-links", str(study_file), "--tracking-uri", HTTP])
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    assert "secret" not in result.stdout + result.stderr
    assert line.startswith("MLflow store http://user:***@127.0.0.1:1 did not answer (")
    assert line.endswith("); the MLflow UI: http://127.0.0.1:5000")


def test_debug_traceback_keeps_the_password_masked(sweep_home, study_file):
    result = runner.invoke(cli.app, ["--debug", "status", str(study_file), "--storage", PG])
    assert result.exit_code == 5
    assert "Traceback (most recent call last)" in result.stderr
    assert "user:***@127.0.0.1:1" in result.stderr and "secret" not in result.stdout + result.stderr


def test_status_on_a_journal_file_that_does_not_exist_writes_nothing(sweep_home, study_file, tmp_path):
    journal = tmp_path / "nowhere" / "optuna.journal"
    result = runner.invoke(cli.app, ["status", str(study_file), "--storage", f"journal:///{journal}"])
    assert result.exit_code == 6
    assert result.stderr.splitlines() == [
        f"error: no Optuna storage at journal:///{journal}: run `sweep run` with this study file first"
    ]
    assert not (tmp_path / "nowhere").exists()
