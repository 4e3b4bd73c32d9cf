"""A study of 1000 classes (tiny generated images, one folder per class) reported end to end.

The user's report behind this test: at 200 classes the confusion plot was 13464 x 13442 px (Pillow
refuses it: DecompressionBombError), report.html 9.3 MB and report.md 1 MB. At any class count
the report must stay readable and small: every PNG opens with Pillow under its pixel limit, the
whole per-class figures go to CSV files, and the stored test evaluation stays small.
"""

from __future__ import annotations

import json
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline import cli

from conftest import study_dict, write_study

CLASSES = 1000
pytestmark = pytest.mark.e2e


def _tree(root, per_split=(("train", 1), ("val", 1), ("test", 1)), size=8):
    rng = np.random.default_rng(0)
    for split, n in per_split:
        for c in range(CLASSES):
            folder = root / split / f"class_{c:04d}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("many")
    root = _tree(tmp / "images")
    tree = study_dict(root, study={"name": "many", "n_trials": 1})
    tree["data"]["test"] = "test"
    tree["training"]["epochs"] = 1
    tree["search_space"] = {"freeze_depth": {"type": "int", "low": 0, "high": 0}}
    study = write_study(tmp / "study.yaml", tree)
    env = {"SWEEP_HOME": str(tmp / "mlruns"), "SWEEP_REPORTS": str(tmp / "reports")}
    result = CliRunner().invoke(cli.app, ["run", str(study), "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    storage = f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}"
    return tmp / "reports" / "many", optuna.load_study(study_name="many", storage=storage), result.output


def test_every_image_opens_in_pillow_and_stays_small(reported):
    folder, *_ = reported
    pngs = sorted(folder.glob("*.png"))
    assert "confusion_matrix.png" in {p.name for p in pngs}
    for png in pngs:
        with Image.open(png) as image:
            image.load()  # raises DecompressionBombError past Pillow's limit
            assert image.width * image.height <= 2_000_000, png.name
        assert png.stat().st_size < 1_000_000, png.name
    with Image.open(folder / "confusion_matrix.png") as image:
        assert image.size == (1210, 528)  # the compact view's fixed size, whatever the class count


def test_report_is_compact_and_points_at_the_whole_tables(reported):
    folder, *_ = reported
    md = (folder / "report.md").read_text()
    assert (folder / "report.md").stat().st_size < 50_000
    assert (folder / "report.html").stat().st_size < 3_000_000
    assert "The 20 classes with the lowest recall (all 1000 in `per_class.csv`):" in md
    assert "The 20 most confused pairs (the whole 1000 x 1000 matrix in `confusion_matrix.csv`):" in md
    assert "| true class_0000 |" not in md  # no full matrix in the Markdown
    per_class = pd.read_csv(folder / "per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == [f"class_{c:04d}" for c in range(CLASSES)]
    assert per_class["support"].tolist() == [1] * CLASSES
    matrix = pd.read_csv(folder / "confusion_matrix.csv", index_col=0)
    assert matrix.shape == (CLASSES, CLASSES) and int(matrix.to_numpy().sum()) == CLASSES
    assert matrix.index[0] == "true class_0000" and matrix.columns[-1] == "pred class_0999"


def test_stored_test_evaluation_holds_only_nonzero_cells(reported):
    folder, study, _ = reported
    (key,) = [k for k in study.user_attrs if k.startswith("sweep_test_eval:")]
    record = study.user_attrs[key]
    assert "confusion" not in record
    assert sum(n for _, _, n in record["confusion_cells"]) == record["n_images"] == CLASSES
    assert len(json.dumps(record)) < 200_000  # dense, 10^6 numbers: megabytes in one attr
    correct = sum(n for i, j, n in record["confusion_cells"] if i == j)
    assert record["accuracy"] == pytest.approx(correct / CLASSES)


def test_the_run_ends_with_the_cache_it_left(reported):
    folder, _, output = reported
    from pipeline.data import cache_usage

    cache = folder.parent.parent / "mlruns" / "cache" / "decoded"
    [line] = [x for x in output.splitlines() if x.startswith("cache ")]
    shown = re.fullmatch(
        rf"cache {re.escape(str(cache.resolve()))}: (\d+) decoded image\(s\), [\d.]+ MiB, used .+ \.\. .+ "
        r"\(budget \d+ MiB, the default; `sweep cache --clear` frees it\)",
        line,
    )
    assert shown, line
    assert int(shown.group(1)) >= 2 * CLASSES  # train and val, one image per class each
    assert cache_usage(cache).entries >= int(shown.group(1))  # the report stage only adds
