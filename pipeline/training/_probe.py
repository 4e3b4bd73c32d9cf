"""The linear-probe baseline: logistic regression on the frozen backbone's pooled features.

The pretrained backbone runs once per image (eval mode, no autograd, the loaders' eval transform)
and a forward hook on the classification head captures the head's input: the pooled feature
vector, `(N, D)` float32. scikit-learn's `LogisticRegressionCV` is fitted on the train features,
its regularisation `C` chosen by stratified cross-validation on train alone (val is never seen
while fitting, so the probe's val accuracy is an unbiased estimate, unlike a maximum over trials
and epochs). The solution is written into the model's own head, so the probe is the same model
class (backbone + head) as any trial: saved, registered and predicted the same way.

Features are standardised before fitting (the solver converges in far fewer iterations and one
`Cs` grid suits every backbone); the scaling is folded into the head exactly:
`W = coef / scale`, `b = intercept - W @ mean`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline import models as M
from pipeline.core import ModelError, cpu_cores, image_pass
from pipeline.training._train import images_in

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline
    from torch.utils.data import DataLoader

    from pipeline.data import Preprocess, Splits

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (B, 3, H, W) float32 images, (B,) int64 labels

# Inverse regularisation strengths tried by cross-validation: 1e-4 .. 1e4, two per decade. With
# standardised features the best C for a few hundred images of ImageNet features lies well inside.
PROBE_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 17))
PROBE_FOLDS = 5  # at most; fewer when the rarest class has fewer train images
PROBE_MAX_ITER = 10_000  # lbfgs cap, far above need: hymenoptera (245 x 1280) converges in 14
# Fits (folds x Cs) run in one process per core from this many train images x classes: on 2 cores,
# 800 x 10 classes took 7.5 s in one process and 4.0 s in two, 400 x 200 classes 7.8 s and 2.9 s;
# hymenoptera (245 x 2) took 2.1 s in one and 5.3 s in two (the worker processes' start).
PARALLEL_FITS_FROM = 4000


def fit_jobs(images: int, num_classes: int) -> int:
    """Processes for the cross-validation fits: one per core for big problems, else 1."""
    return cpu_cores() if images * num_classes >= PARALLEL_FITS_FROM else 1


@dataclass(frozen=True)
class ProbeResult:
    """A fitted linear probe, in the shape a trial's result has.

    Accuracies are fractions in [0, 1]; `val_loss` is plain cross-entropy (mean per image, nats)
    of the head's logits on val, the same definition `train.evaluate` uses.
    """

    state_dict: dict[str, torch.Tensor]  # the whole model (backbone + fitted head), CPU copies
    head: str  # module name of the head that was rewritten, e.g. "fc" or "classifier"
    C: float  # the chosen inverse regularisation strength (on standardised features)
    cv_folds: int
    train_accuracy: float
    val_accuracy: float
    val_loss: float
    seconds: float  # wall time of feature extraction and fitting
    feature_dim: int  # D, the head's input width
    n_train: int
    n_val: int

    def metrics(self) -> dict[str, float]:
        """The scalar figures, for logging next to trials' metrics."""
        return {
            "probe_C": self.C,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "seconds": self.seconds,
            "feature_dim": float(self.feature_dim),
        }


def head_module(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The model's classification head, `(name, nn.Linear)` with `num_classes` outputs.

    Found with `model.head_names` (timm's `get_classifier()`, else the last Linear/1x1 Conv2d with
    `num_classes` outputs).

    Raises:
        ModelError: no such head, or it is not a biased `nn.Linear` (e.g. SqueezeNet's 1x1 conv).
    """
    modules = sorted({name.rsplit(".", 1)[0] for name in M.head_names(model, num_classes)})
    head = model.get_submodule(modules[0]) if len(modules) == 1 else None
    if not (isinstance(head, nn.Linear) and head.out_features == num_classes and head.bias is not None):
        found = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in modules) or "none"
        raise ModelError(
            f"linear probe: {type(model).__name__} has no single nn.Linear head with "
            f"{num_classes} outputs and a bias (found: {found}); turn the linear-probe "
            "baseline off for this arch"
        )
    return modules[0], head


@torch.inference_mode()
def extract_features(
    model: nn.Module, head: nn.Linear, loader: Batches, device: torch.device, what: str = "probe features"
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over `loader` in eval mode and capture the input of `head`.

    Args:
        loader: batches of `(B, 3, H, W)` float32 images and `(B,)` int64 labels, with the eval
            transform (no augmentation), any order.

    Returns:
        (features `(N, D)` float32, labels `(N,)` int64), in the loader's order.
    """
    model.eval().to(device)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].flatten(1).float().cpu()))
    labels: list[torch.Tensor] = []
    try:
        with image_pass(what, images_in(loader)) as progress:
            for images, y in loader:
                model(images.to(device))
                labels.append(y.cpu())
                progress.advance(len(y))
    finally:
        hook.remove()
    if not captured:
        return np.empty((0, head.in_features), np.float32), np.empty(0, np.int64)
    return torch.cat(captured).numpy(), torch.cat(labels).numpy().astype(np.int64)


def _folds(labels: np.ndarray, num_classes: int) -> int:
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < 2:
        rare = [str(i) for i in np.flatnonzero(counts < 2)]
        raise ValueError(
            f"linear probe: class index(es) {', '.join(rare)} have fewer than 2 train images; "
            "cross-validation needs at least 2 per class"
        )
    return int(min(PROBE_FOLDS, counts.min()))


def fit_logistic(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> tuple[Pipeline, int]:
    """Standardise and fit `LogisticRegressionCV` (L2, lbfgs, multinomial for K > 2).

    Args:
        features: `(N, D)` train features; labels: `(N,)` class indices 0..K-1.
        seed: seeds the stratified folds' shuffling.

    Returns:
        (fitted sklearn `Pipeline` of StandardScaler + LogisticRegressionCV, number of folds).

    Raises:
        ValueError: a class with fewer than 2 train images.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = _folds(labels, num_classes)
    # Log loss, not accuracy, scores the folds: on a few dozen images accuracy ties across many C,
    # and on hymenoptera the C chosen by accuracy jumped 1e-3 .. 10 with the fold seed (log loss: 0.1-0.3).
    solver = LogisticRegressionCV(
        Cs=list(PROBE_CS),
        l1_ratios=(0.0,),
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="neg_log_loss",
        solver="lbfgs",
        max_iter=PROBE_MAX_ITER,
        random_state=seed,
        use_legacy_attributes=False,
        n_jobs=fit_jobs(len(labels), num_classes),
    )
    return make_pipeline(StandardScaler(), solver).fit(features.astype(np.float64), labels), folds


def head_weights(fitted: Pipeline, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitted pipeline as head tensors: weight `(K, D)`, bias `(K,)` float32.

    Softmax of the head's logits equals the pipeline's `predict_proba`. Binary: sklearn keeps one
    row `w, b` with P(class 1) = sigmoid(w x + b); rows `[0, w]`, biases `[0, b]` give the same
    softmax. The scaler is folded in: `W = coef / scale`, `b = intercept - W @ mean`.
    """
    scaler, solver = fitted[0], fitted[-1]
    coef = solver.coef_ / scaler.scale_
    bias = solver.intercept_ - coef @ scaler.mean_
    if num_classes == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        bias = np.concatenate([[0.0], bias])
    return torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)


def fit_linear_probe(
    model: nn.Module,
    train_loader: Batches,
    val_loader: Batches,
    device: torch.device,
    seed: int = 0,
    *,
    num_classes: int,
) -> ProbeResult:
    """Fit the linear-probe baseline and write it into `model`'s head (in place).

    Args:
        model: a built classifier (`model.build_model`) whose head has K = number of classes
            outputs; only the head's weight and bias change. Left in eval mode on `device`.
        train_loader, val_loader: eval-transform loaders (see `probe_loaders`); batches of
            `(B, 3, H, W)` float32 and `(B,)` int64.
        seed: seeds the cross-validation folds.
        num_classes: K, the length of `class_to_idx` the model was built with.

    Returns:
        `ProbeResult` with the whole model's state_dict (CPU), chosen C and train/val figures.

    Raises:
        ModelError: the model has no plain Linear head with K outputs.
        ValueError: a class with fewer than 2 train images, or train missing a class.
    """
    start = time.perf_counter()
    name, head = head_module(model, num_classes)
    x_train, y_train = extract_features(model, head, train_loader, device, "probe features (train)")
    x_val, y_val = extract_features(model, head, val_loader, device, "probe features (val)")
    missing = sorted(set(range(num_classes)) - set(y_train.tolist()))
    if missing:
        raise ValueError(f"linear probe: train has no image of class index(es) {missing}")
    fitted, folds = fit_logistic(x_train, y_train, num_classes, seed)
    weight, bias = head_weights(fitted, num_classes)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device))
        head.bias.copy_(bias.to(head.bias.device))

    def scores(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        if len(y) == 0:
            return float("nan"), float("nan")
        logits = torch.from_numpy(x) @ weight.T + bias
        target = torch.from_numpy(y)
        loss = nn.functional.cross_entropy(logits, target).item()
        return int((logits.argmax(1) == target).sum()) / len(y), loss

    train_acc, _ = scores(x_train, y_train)
    val_acc, val_loss = scores(x_val, y_val)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return ProbeResult(
        state,
        name,
        float(fitted[-1].C_),
        folds,
        train_acc,
        val_acc,
        val_loss,
        time.perf_counter() - start,
        int(x_train.shape[1]),
        len(y_train),
        len(y_val),
    )


def probe_loaders(
    splits: Splits, preprocess: Preprocess, batch_size: int, num_workers: int
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for the probe: both with the eval transform, unshuffled."""
    from pipeline import data as D

    transform = D.eval_transform(preprocess)
    train, val = (
        D.make_loader(splits.root, samples, transform, batch_size, num_workers, shuffle=False)
        for samples in (splits.train, splits.val)
    )
    return train, val
