"""The linear-probe baseline on tiny generated images: sklearn's probabilities come out of the
model's own head, and the head is the only thing that changes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.core import ModelError
from pipeline.data import _imagefiles as IMG
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.models import _model as M
from pipeline.models import _weights as W
from pipeline.training import _probe as P

from conftest import make_folder

PP = TX.Preprocess(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def build(arch: str, num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return M.build_model(W.resolve_weights(arch, "none"), num_classes)[0]


def loaders(root, classes):
    make_folder(root, {"train": 10, "val": 6}, classes=classes)
    splits = D.build_splits(root, test="val")
    return splits, *P.probe_loaders(splits, PP, batch_size=8, num_workers=0)


@pytest.mark.parametrize(
    "arch,classes", [("resnet18", ("ants", "bees")), ("timm/efficientnet_lite0", ("ants", "bees", "wasps"))]
)
def test_probe_head_reproduces_sklearn_and_changes_nothing_else(tmp_path, arch, classes):
    k = len(classes)
    splits, train, val = loaders(tmp_path / "img", classes)
    model = build(arch, k)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    head_name, head = P.head_module(model, k)
    assert head_name == ("fc" if arch == "resnet18" else "classifier")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning or sklearn deprecation fails the test
        result = P.fit_linear_probe(model, train, val, torch.device("cpu"), seed=0, num_classes=k)

    # Only the head's weight and bias changed; BatchNorm buffers included in "the rest".
    changed = {n for n, t in result.state_dict.items() if not torch.equal(t, before[n])}
    assert changed == {f"{head_name}.weight", f"{head_name}.bias"}
    assert all(t.device.type == "cpu" for t in result.state_dict.values())
    assert result.state_dict[f"{head_name}.weight"].shape == (k, head.in_features)

    # Refit the same sklearn pipeline on the same features: the model's softmax equals predict_proba.
    x_train, y_train = P.extract_features(model, head, train, torch.device("cpu"))
    x_val, y_val = P.extract_features(model, head, val, torch.device("cpu"))
    assert x_train.shape == (10 * k, head.in_features) and x_train.dtype == np.float32
    assert y_train.tolist() == [y for _, y in splits.train]
    fitted, folds = P.fit_logistic(x_train, y_train, k, seed=0)
    assert folds == 5 and result.cv_folds == 5
    assert float(fitted[-1].C_) == result.C and result.C in P.PROBE_CS
    images = torch.stack([TX.eval_transform(PP)(IMG.load_rgb(splits.root / rel)) for rel, _ in splits.val])
    with torch.inference_mode():
        probs = model.eval()(images).softmax(1).numpy()
    np.testing.assert_allclose(probs, fitted.predict_proba(x_val.astype(np.float64)), atol=1e-5)

    expected_val = float((fitted.predict(x_val.astype(np.float64)) == y_val).mean())
    assert result.val_accuracy == pytest.approx(expected_val)
    assert result.train_accuracy == pytest.approx(float((fitted.predict(x_train.astype(np.float64)) == y_train).mean()))
    from sklearn.metrics import log_loss

    assert result.val_loss == pytest.approx(
        log_loss(y_val, fitted.predict_proba(x_val.astype(np.float64)), labels=list(range(k))), rel=1e-3, abs=1e-6
    )
    assert (result.feature_dim, result.n_train, result.n_val) == (head.in_features, 10 * k, 6 * k)
    assert result.seconds > 0 and not model.training


def test_binary_head_is_zero_row_then_sklearn_row():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (12, 4)), rng.normal(2, 1, (12, 4))]).astype(np.float32)
    y = np.repeat([0, 1], 12)
    fitted, _ = P.fit_logistic(x, y, 2, seed=0)
    weight, bias = P.head_weights(fitted, 2)
    assert weight.shape == (2, 4) and bias.shape == (2,)
    assert torch.count_nonzero(weight[0]) == 0 and bias[0] == 0
    probs = (torch.from_numpy(x) @ weight.T + bias).softmax(1).numpy()
    np.testing.assert_allclose(probs, fitted.predict_proba(x.astype(np.float64)), atol=1e-6)


def test_many_classes_fit_in_parallel_to_the_same_head(monkeypatch):
    # 120 images x 40 classes passes PARALLEL_FITS_FROM: the folds run in 2 processes, same result.
    rng = np.random.default_rng(1)
    y = np.tile(np.arange(40), 3)
    x = (rng.normal(0, 1, (40, 6))[y] + rng.normal(0, 0.5, (len(y), 6))).astype(np.float32)
    monkeypatch.setattr(P, "cpu_cores", lambda: 2)
    assert P.fit_jobs(len(y), 40) == 2 and P.fit_jobs(245, 2) == 1
    parallel, _ = P.fit_logistic(x, y, 40, seed=0)
    monkeypatch.setattr(P, "PARALLEL_FITS_FROM", 10**9)
    serial, _ = P.fit_logistic(x, y, 40, seed=0)
    assert (parallel[-1].n_jobs, serial[-1].n_jobs) == (2, 1)
    assert parallel[-1].C_ == serial[-1].C_
    np.testing.assert_allclose(parallel[-1].coef_, serial[-1].coef_, rtol=1e-6, atol=1e-8)


def test_same_seed_same_probe(tmp_path):
    _, train, val = loaders(tmp_path / "img", ("ants", "bees"))
    a = P.fit_linear_probe(build("resnet18", 2), train, val, torch.device("cpu"), seed=3, num_classes=2)
    b = P.fit_linear_probe(build("resnet18", 2), train, val, torch.device("cpu"), seed=3, num_classes=2)
    assert a.C == b.C and torch.equal(a.state_dict["fc.weight"], b.state_dict["fc.weight"])


def test_a_class_with_one_train_image_is_refused():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"class index\(es\) 1 have fewer than 2 train images"):
        P.fit_logistic(x, np.array([0, 0, 0, 0, 1]), 2, seed=0)


def test_a_conv_head_is_refused():
    model = build("squeezenet1_0", 2)
    with pytest.raises(
        ModelError,
        match=r"no single nn.Linear head with 2 outputs and a bias "
        r"\(found: classifier.1 \(Conv2d\)\)",
    ):
        P.head_module(model, 2)
