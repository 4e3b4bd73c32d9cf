"""A user's own folder: one folder per class, no split (`train: .`, `val: null`, `test: null`).
A user's report: `val: null` got "data.val: Input should be a valid string (got None)". The study
runs end to end on a stratified, seeded split recorded with the study."""

from __future__ import annotations

import optuna
import pytest
from typer.testing import CliRunner

from pipeline.cli import _commands as cli
from pipeline.data import SPLITS_ATTR

from conftest import make_folder, study_dict, write_study

pytestmark = pytest.mark.e2e


def test_one_folder_per_class_runs_with_carved_val_and_test(tmp_path, sweep_home):
    root = make_folder(tmp_path / "staging", {"all": 10})
    mine = tmp_path / "my_images"
    (root / "all").rename(mine)
    tree = study_dict(mine, training={"epochs": 1})
    tree["data"] |= {"train": ".", "val": None, "test": None}
    study = write_study(tmp_path / "mine.yaml", tree)
    result = CliRunner().invoke(cli.app, ["run", str(study), "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_home / 'optuna.db'}")
    assert stored.user_attrs[SPLITS_ATTR]["counts"] == {"train": 16, "val": 2, "test": 2}
    assert [t.state.name for t in stored.trials] == ["COMPLETE", "COMPLETE"]


def test_make_weights_places_only_the_checkpoint():
    """A user's report: `make data` for a study of their own images tried to download hymenoptera."""
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "get_assets.py"), "--weights-only"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("weights: ") for line in lines), lines


def test_a_class_too_small_for_a_test_image_is_named_and_has_no_test_figures(tmp_path, sweep_home, monkeypatch):
    """A user's report: a class of 2 images got no test image; per_class.csv read 0.0 and nothing said so."""
    from conftest import COLOURS, write_image

    root = make_folder(tmp_path / "staging", {"all": 12})  # 12 + 12 + 2: the val share of 6 holds no "three"
    mine = tmp_path / "my_images"
    (root / "all").rename(mine)
    for i in range(2):
        write_image(mine / "three" / f"{i}.png", COLOURS["ants"], seed=50 + i)
    tree = study_dict(mine, training={"epochs": 1})
    tree["data"] |= {"train": ".", "val": None, "test": None}
    monkeypatch.setenv("SWEEP_REPORTS", str(tmp_path / "reports"))
    result = CliRunner().invoke(cli.app, ["run", str(write_study(tmp_path / "mine.yaml", tree)), "--quiet"])
    assert result.exit_code == 0, result.output
    per_class = (tmp_path / "reports" / "tiny" / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support"
    assert [line for line in per_class if line.startswith("three,")] in (["three,,,,0"], ["three,0.0,,,0"])
    report = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert "1 class(es) have no test image, so no test figures: three; add images to them" in report
