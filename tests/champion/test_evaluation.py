"""The sealed-test evaluation on a tiny generated dataset and an untrained ResNet-18 checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest
import torch

from pipeline import training as train
from pipeline.champion import _evaluation as E
from pipeline.config import StudyConfig
from pipeline.core import RegistryError
from pipeline.data import Preprocess
from pipeline.models import TrialCheckpoint
from pipeline.models import _checkpoints as checkpoints
from pipeline.models import _model as M
from pipeline.models import _weights as W

from conftest import make_folder, study_dict

PP = Preprocess(36, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def setup(tmp_path, sweep_home):
    """A study config over 2 classes (8 train, 6 val per class; half of val carved off as test)
    and the checkpoint of trial 3: an untrained ResNet-18 with 2 outputs."""
    cfg = StudyConfig.model_validate(study_dict(make_folder(tmp_path / "images")))
    torch.manual_seed(0)
    net, _ = M.build_model(W.WeightsSpec("resnet18", "none", "none"), 2)
    ckpt = TrialCheckpoint(
        state_dict=net.state_dict(),
        arch="resnet18",
        weights_origin="random initialisation",
        class_to_idx={"ants": 0, "bees": 1},
        preprocess=PP.to_dict(),
        trial_number=3,
        best_epoch=1,
        metric="val_accuracy",
        value=0.75,
        params={"lr": 0.01},
    )
    path = ckpt.save(TrialCheckpoint.path_for("tiny", 3))
    return cfg, TrialCheckpoint.load(path), checkpoints.sha256(path)


def test_evaluate_once_evaluates_a_checkpoint_once_and_stores_it(setup, monkeypatch):
    cfg, ckpt, sha = setup
    passes = []
    real = train.evaluate

    def counting(model, loader, *args, **kwargs):
        passes.append(len(loader.dataset))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", counting)
    study = optuna.create_study(direction="maximize")
    first, fresh = E.evaluate_once(study, cfg, ckpt, sha)
    assert fresh and passes == [6]
    assert (first.trial_number, first.checkpoint_sha256, first.classes, first.n_images) == (3, sha, ("ants", "bees"), 6)
    assert first.support == (3, 3) and sum(map(sum, first.confusion)) == 6
    assert first.accuracy == pytest.approx((first.confusion[0][0] + first.confusion[1][1]) / 6)
    assert list(study.user_attrs) == [f"sweep_test_eval:3:{sha}"]
    # what is stored is plain JSON and comes back as the same evaluation, without a second pass
    record = study.user_attrs[f"sweep_test_eval:3:{sha}"]
    assert record == first.to_record() == json.loads(json.dumps(record))
    assert record["classes"] == ["ants", "bees"] and record["confusion_cells"] == [
        [i, j, n] for i, row in enumerate(first.confusion) for j, n in enumerate(row) if n
    ]
    again, fresh = E.evaluate_once(study, cfg, ckpt, sha)
    assert (again, fresh, passes) == (first, False, [6])
    # another checkpoint file of the same trial is a new evaluation
    _, fresh = E.evaluate_once(study, cfg, ckpt, "0" * 64)
    assert fresh and passes == [6, 6] and len(study.user_attrs) == 2


def test_classes_that_changed_since_the_study_are_a_registry_error(setup):
    cfg, ckpt, sha = setup
    moved = dataclasses.replace(ckpt, class_to_idx={"ants": 0, "wasps": 1})
    with pytest.raises(RegistryError) as err:
        E.evaluate_on_test(cfg, moved, sha)
    assert str(err.value) == (
        f"{cfg.data.root}: classes {{'ants': 0, 'bees': 1}} differ from the selected "
        "checkpoint's {'ants': 0, 'wasps': 1}; restore the data the study was run on"
    )


def test_rebuild_gives_the_checkpoints_weights_in_eval_mode(setup):
    _, ckpt, _ = setup
    net = E.rebuild(ckpt)
    assert not net.training
    assert all(torch.equal(v, ckpt.state_dict[k]) for k, v in net.state_dict().items())
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    assert E.eval_preprocess(ckpt) == PP


def _evaluation(confusion, classes):
    support = tuple(sum(row) for row in confusion)
    return E.TestEvaluation(
        trial_number=0,
        checkpoint_sha256="ab" * 32,
        classes=classes,
        n_images=sum(support),
        accuracy=sum(row[i] for i, row in enumerate(confusion)) / sum(support),
        loss=0.5,
        precision=(0.5,) * len(classes),
        recall=(0.5,) * len(classes),
        f1=(0.5,) * len(classes),
        support=support,
        confusion=confusion,
        evaluated_at="2026-01-01T00:00:00+00:00",
    )


def test_sparse_record_round_trips_and_a_dense_record_still_reads():
    evaluation = _evaluation(((2, 0, 1), (0, 3, 0), (4, 0, 0)), ("a", "b", "c"))
    record = evaluation.to_record()
    assert record["confusion_cells"] == [[0, 0, 2], [0, 2, 1], [1, 1, 3], [2, 0, 4]]
    assert E.TestEvaluation.from_record(record) == evaluation
    dense = {k: v for k, v in record.items() if k != "confusion_cells"}
    dense["confusion"] = [[2, 0, 1], [0, 3, 0], [4, 0, 0]]
    assert E.TestEvaluation.from_record(dense) == evaluation


def test_confused_pairs_largest_off_diagonal_cells_first():
    evaluation = _evaluation(((2, 0, 1), (0, 3, 0), (4, 0, 0)), ("a", "b", "c"))
    pairs = evaluation.confused_pairs(5)
    assert pairs.to_dict("list") == {
        "true": ["c", "a"],
        "predicted": ["a", "c"],
        "count": [4, 1],
        "share of true class": [1.0, pytest.approx(1 / 3)],
    }


def test_a_class_without_test_images_has_no_figures_instead_of_zeros():
    """A user's report: a class of 2 images got no test image and per_class.csv read 0.0 / 0.0 / 0.0."""
    evaluation = _evaluation(((2, 0, 0), (0, 3, 0), (0, 0, 0)), ("a", "b", "three"))
    frame = evaluation.per_class()
    row = frame[frame["class"] == "three"].iloc[0]
    assert row["support"] == 0 and math.isnan(row["recall"]) and math.isnan(row["f1"]) and math.isnan(row["precision"])
    assert list(frame["recall"][:2]) == [0.5, 0.5]
    assert evaluation.untested_classes() == ["three"]
    predicted = _evaluation(((2, 0, 1), (0, 3, 0), (0, 0, 0)), ("a", "b", "three"))  # "three" predicted once
    assert predicted.per_class()["precision"][2] == 0.5 and math.isnan(predicted.per_class()["recall"][2])
