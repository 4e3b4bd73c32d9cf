"""Fine-tune one resolved configuration: model, frozen stages, optimiser, loaders, `train.fit`.

The one place a study configuration becomes a training run, shared by the study's objective
(tuning), baselines and re-runs; it never logs: progress leaves through `on_epoch`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline import data as D
from pipeline import model as M
from pipeline.config import StudyConfig
from pipeline.preflight import Prepared
from pipeline.train import EpochResult, FitResult, build_training, fit, pick_device


def fit_config(cfg: StudyConfig, prep: Prepared, seed: int,
               on_epoch: Callable[[EpochResult], None] | None = None) -> FitResult:
    """Build the model for `cfg` (params already applied) and fine-tune it on train, scoring val.

    Args:
        cfg: the study config with the trial's parameters applied (`StudyConfig.with_params`).
        prep: pre-flight result (splits, pretrained weights, preprocessing).
        seed: seeds weight init of the new head and the train loader's shuffling/augmentation;
            the objective passes `data.seed + trial.number`.
        on_epoch: called after each epoch with its frozen `EpochResult`; may raise to stop.

    Returns:
        `FitResult` with per-epoch results and the best epoch's weights (CPU tensors).
    """
    t, d = cfg.training, cfg.data
    torch.manual_seed(seed)
    model, _ = M.build_model(prep.spec, len(prep.splits.class_to_idx), prep.state)
    frozen = M.freeze(model, cfg.model.arch, t.freeze_depth)
    optimizer, scheduler = build_training(model, t, head=M.head_names(model, len(prep.splits.class_to_idx)))
    train_loader = D.make_loader(prep.splits.root, prep.splits.train,
                                 D.train_transform(prep.preprocess, t.aug_strength),
                                 d.batch_size, d.num_workers, shuffle=True, seed=seed)
    val_loader = D.make_loader(prep.splits.root, prep.splits.val, D.eval_transform(prep.preprocess),
                               d.batch_size, d.num_workers, shuffle=False)
    return fit(model, train_loader, val_loader, epochs=t.epochs, optimizer=optimizer,
               scheduler=scheduler, criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
               device=pick_device(t.device), frozen=frozen, metric=cfg.study.metric, amp=t.amp,
               channels_last=t.channels_last, on_epoch=on_epoch)
