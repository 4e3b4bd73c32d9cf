"""Refit (scikit-learn's `refit`): retrain the chosen configuration on train + val before the one
test evaluation.

A trial learns from train only and val chooses; once the choice is made, val's images are more
training data. The champion's configuration is trained again on the union for `refit_epochs`
(the epoch count at which its mean val curve over seeds peaked, `selection.candidate_table`)
and the weights after the last of those epochs are kept (no val is left to pick an epoch). The
linear probe is refitted the same way: the logistic regression on train + val features, its C
chosen again by cross-validation on the union. The test split is never read here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline import data as D
from pipeline import models as M
from pipeline.config import StudyConfig
from pipeline.training import _probe as P
from pipeline.training._fitting import fit_config
from pipeline.training._preflight import Source
from pipeline.training._train import pick_device


def refit_samples(splits: D.Splits) -> list[D.Sample]:
    """Train then val samples (`(relative path, class index)`): the refit's training set."""
    return [*splits.train, *splits.val]


def _loader(
    source: Source,
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    return D.make_loader(
        source.splits.root, refit_samples(source.splits), transform, batch_size, num_workers, shuffle=shuffle, seed=seed
    )


def refit_trial(cfg: StudyConfig, source: Source, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    """Fine-tune `cfg` (the champion's params applied) on train + val for `epochs` epochs.

    The trials' own path (`fit_config`: threads, decoded-image and frozen-feature caches, memory
    layout; same model, freeze depth, optimiser, head lr, augmentation), with train + val as the
    train split, no val split, and the scheduler built for `epochs`.

    Returns:
        The weights after the last epoch (CPU tensors, the model's state_dict).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
    """
    union = dataclasses.replace(source.splits, train=refit_samples(source.splits), val=[])
    return fit_config(cfg, dataclasses.replace(source, splits=union), seed, epochs=epochs).best_state


def refit_probe(cfg: StudyConfig, source: Source, seed: int) -> dict[str, torch.Tensor]:
    """The linear probe fitted on train + val features (C by cross-validation on the union).

    Returns:
        The whole model's weights (backbone + fitted head), CPU tensors.

    Raises:
        ModelError, ValueError: as `probe.fit_linear_probe`.
    """
    d = cfg.data
    k = len(source.splits.class_to_idx)
    torch.manual_seed(d.seed)
    model, _ = M.build_model(source.spec, k, source.state)
    union = _loader(source, D.eval_transform(source.preprocess), d.batch_size, d.num_workers, False, seed)
    # The second loader only produces the result's val figures, meaningless after a refit: empty.
    result = P.fit_linear_probe(model, union, [], pick_device(cfg.training.device), seed, num_classes=k)
    return result.state_dict
