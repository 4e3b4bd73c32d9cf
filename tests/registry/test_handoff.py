"""The hand-off's parts that need no trained model: the run the model is attached to and the
input example logged with it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from PIL import Image

from pipeline.config import StudyConfig
from pipeline.core import RegistryError
from pipeline.data import Preprocess, build_splits, eval_transform, load_rgb
from pipeline.models import TrialCheckpoint
from pipeline.registry import _handoff as H
from pipeline.tracking import Tracker

from conftest import make_folder, study_dict

PP = Preprocess(36, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _checkpoint() -> TrialCheckpoint:
    return TrialCheckpoint(
        state_dict={"w": torch.zeros(1)},
        arch="resnet18",
        weights_origin="random initialisation",
        class_to_idx={"ants": 0, "bees": 1},
        preprocess=PP.to_dict(),
        trial_number=0,
        best_epoch=0,
        metric="val_accuracy",
        value=0.5,
    )


def test_existing_run_tells_a_missing_run_from_a_failing_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "e", tmp_path / "artifacts", warn=lambda m: None)
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    assert H.existing_run(tracker, run_id) == run_id
    assert H.existing_run(tracker, "0" * 32) is None  # a run of another tracking store
    assert H.existing_run(tracker, None) is None

    def unavailable(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(tracker.client, "get_run", unavailable)
    with pytest.raises(RegistryError) as err:
        H.existing_run(tracker, run_id)
    assert str(err.value) == (
        f"looking up MLflow run {run_id} in {uri} failed: (sqlite3.OperationalError) database "
        "is locked; nothing was registered: run `sweep report` again once the store answers"
    )


@pytest.mark.parametrize("fmt, batch", [("pickle", 1), ("pt2", 2)])
def test_input_example_is_the_first_readable_val_image(tmp_path, fmt, batch):
    root = make_folder(tmp_path / "images")
    cfg = StudyConfig.model_validate(
        study_dict(root, data={"bad_images": "skip"}, registry={"serialization_format": fmt})
    )
    d = cfg.data
    val = build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed, d.val_fraction).val
    (root / val[0][0]).write_bytes(b"not an image")  # the first val image is unreadable: the next is taken
    example, encoded = H.input_example(cfg, _checkpoint())
    source = load_rgb(root / val[1][0])
    expected = eval_transform(PP)(source).numpy()
    assert example.shape == (batch, 3, 32, 32) and example.dtype == np.float32
    assert all(np.array_equal(x, expected) for x in example)
    sent = Image.open(io.BytesIO(encoded))  # what the MLflow input example holds: the same image as a JPEG
    assert sent.format == "JPEG" and min(sent.size) == min(min(source.size), PP.resize)


def test_no_readable_val_image_is_a_registry_error(tmp_path):
    root = make_folder(tmp_path / "images")
    cfg = StudyConfig.model_validate(study_dict(root))
    for path in (root / "val").rglob("*.png"):
        path.write_bytes(b"")
    with pytest.raises(RegistryError) as err:
        H.input_example(cfg, _checkpoint())
    assert str(err.value) == f"{root / 'val'}: no readable val image for the model's input example"
