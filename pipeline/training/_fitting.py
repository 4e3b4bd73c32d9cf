"""Fine-tune one resolved configuration: model, frozen stages, optimiser, inputs, `train.fit`.

The one place a study configuration becomes a training run, shared by the study's objective
(tuning), baselines and re-runs; it never logs: progress leaves through `on_epoch`.

Fast paths (the study file's `cache:` section; each only changes speed, not metrics beyond float
rounding), chosen per split by `plan`:
- decoded images: files are decoded once per study (pipeline/D.py);
- frozen prefix: with `freeze_depth > 0` the frozen stages run without autograd in eval mode
  (pipeline/prefix.py); their output on val, and on train when `aug_strength == 0`, is computed
  once and each epoch runs only the trainable suffix (pipeline/features.py);
- threads and DataLoader workers sized for the machine (pipeline/machine.py).
Whatever cannot be taken (no cut for the arch, over `cache.max_memory_mb`) falls back to the
plain path with one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import data as D
from pipeline import models as M
from pipeline.config import StudyConfig
from pipeline.training import _features as F
from pipeline.training._machine import cache_limit_bytes, configure_threads, loader_workers
from pipeline.training._preflight import Prepared, Source
from pipeline.training._train import EpochResult, FitResult, build_training, fit, pick_device


@dataclass
class Inputs:
    """What one trial's epochs read and run.

    Attributes:
        train_loader / val_loader: batches of images `(B, 3, H, W)` or cached features.
        train_forward / val_forward: batch -> logits (None: the model itself).
        paths: per split, which path it takes: "features" (cached prefix output), "prefix" (the
            frozen prefix run each epoch without autograd, then the suffix) or "model"; plus
            "images": "cached" or "decoded" (decoded on the fly every epoch).
    """

    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    val_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    paths: dict[str, str] = field(default_factory=dict)
    held: list[str] = field(default_factory=list)  # feature-store keys reserved for this trial
    store: F.FeatureStore | None = None

    def release(self) -> None:
        """Let the feature store evict this trial's entries again."""
        for key in self.held:
            if self.store is not None:
                self.store.release(key)
        self.held.clear()


def plan(
    cfg: StudyConfig,
    prep: Prepared | Source,
    model: nn.Module,
    frozen: list[nn.Module],
    device: torch.device,
    seed: int,
) -> Inputs:
    """Choose each split's fast path for a model already frozen to `cfg.training.freeze_depth`.

    Args:
        seed: seeds the train loader's shuffling (and augmentation through the global RNG).

    Returns:
        `Inputs`; call `release()` once the trial is over.
    """
    t, d, c = cfg.training, cfg.data, cfg.cache
    pp, splits = prep.preprocess, prep.splits
    memory = D.budget(cache_limit_bytes(c.max_memory_mb))
    images = D.shared(splits.root, pp, memory, max_disk_mb=c.max_disk_mb) if c.decoded_images else None

    def image_set(samples: list[D.Sample], train: bool) -> D.ImageList | D.CachedImageList:
        if images is not None:
            if train and t.aug_strength > 0:
                sources = D.shared(splits.root, pp, memory, for_training=True, max_disk_mb=c.max_disk_mb)
                return D.CachedImageList(sources, samples, D.cached_train_transform(pp, t.aug_strength))
            return D.CachedImageList(images, samples, D.cached_eval_transform(pp))
        transform = D.train_transform(pp, t.aug_strength) if train else D.eval_transform(pp)
        return D.ImageList(splits.root, samples, transform)

    cut = None
    if frozen and c.frozen_features:
        # The prefix is run in eval mode only; channels_last makes that much faster on the CPU.
        cut = M.split(model, cfg.model.arch, frozen, pp.crop, channels_last=device.type == "cpu")
        if cut is None:
            D.notice(
                f"frozen stages: no exact prefix/suffix cut of {cfg.model.arch} at freeze_depth "
                f"{t.freeze_depth}; its frozen stages run (without gradients) every epoch"
            )
    workers = loader_workers(d.num_workers, device, cheap_items=images is not None)
    forward = cut.forward if cut is not None else None
    inputs = Inputs(
        D.loader(image_set(splits.train, True), d.batch_size, workers, True, seed),
        D.loader(image_set(splits.val, False), d.batch_size, workers, False),
        forward,
        forward,
        {
            "images": "cached" if images else "decoded",
            "train": "prefix" if cut else "model",
            "val": "prefix" if cut else "model",
        },
    )
    if cut is None:
        return inputs
    _use_frozen_features(inputs, cut, cfg, prep, image_set, memory, device, seed)
    return inputs


def fit_config(
    cfg: StudyConfig,
    prep: Prepared | Source,
    seed: int,
    on_epoch: Callable[[EpochResult], None] | None = None,
    epochs: int | None = None,
) -> FitResult:
    """Build the model for `cfg` (params already applied) and fine-tune it on train, scoring val.

    Args:
        cfg: the study config with the trial's parameters applied (`StudyConfig.with_params`).
        prep: pre-flight result (splits, pretrained weights, preprocessing); for a refit, a
            `Source` whose train split is train + val and whose val split is empty.
        seed: seeds weight init of the new head and the train loader's shuffling/augmentation;
            the objective passes `data.seed + trial.number`.
        on_epoch: called after each epoch with its frozen `EpochResult`; may raise to stop.
        epochs: epochs to train (the scheduler is built for them); default `training.epochs`.

    Returns:
        `FitResult` with per-epoch results and the best epoch's weights (CPU tensors); with an
        empty val split, the weights after the last epoch (val figures NaN).
    """
    t = cfg.training
    n = epochs or t.epochs
    device = pick_device(t.device)
    configure_threads()
    torch.manual_seed(seed)
    model, _ = M.build_model(prep.spec, len(prep.splits.class_to_idx), prep.state)
    frozen = M.freeze(model, cfg.model.arch, t.freeze_depth)
    optimizer, scheduler = build_training(model, t, n, head=M.head_names(model, len(prep.splits.class_to_idx)))
    inputs = plan(cfg, prep, model, frozen, device, seed)
    try:
        return fit(
            model,
            inputs.train_loader,
            inputs.val_loader if prep.splits.val else None,
            epochs=n,
            optimizer=optimizer,
            scheduler=scheduler,
            criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
            device=device,
            frozen=frozen,
            metric=cfg.study.metric,
            amp=t.amp,
            channels_last=t.channels_last,
            on_epoch=on_epoch,
            train_forward=inputs.train_forward,
            val_forward=inputs.val_forward,
        )
    finally:
        inputs.release()


def _use_frozen_features(
    inputs: Inputs,
    cut: M.Split,
    cfg: StudyConfig,
    prep: Prepared | Source,
    image_set: Callable[[list[D.Sample], bool], D.ImageList | D.CachedImageList],
    memory: D.MemoryBudget,
    device: torch.device,
    seed: int,
) -> None:
    """Point `inputs`' val loader (and train's, at augmentation strength 0) at the frozen prefix's
    features, computed once per image into the shared feature store; a split whose features do not
    fit `memory` keeps its image loader (announced once by `F.too_big`)."""
    t, d = cfg.training, cfg.data
    inputs.store = F.shared_store(memory)
    setup = (cfg.model.arch, cut.cut, cut.feature_shape, device.type, t.amp, prep.preprocess.to_dict())
    weights = F.digest(cut.prefix.modules(), setup)
    for name in ("val", "train") if t.aug_strength == 0 else ("val",):
        samples = prep.splits.val if name == "val" else prep.splits.train
        if not samples:  # a refit's empty val split
            continue
        key = F.digest([], (weights, name, samples))
        size = F.nbytes(cut, len(samples))
        if not inputs.store.reserve(key, size):
            F.too_big(name, size, memory)
            continue
        inputs.held.append(key)
        source = image_set(samples, False)  # aug 0: the train transform is the eval one

        def compute(source: D.ImageList | D.CachedImageList = source) -> torch.Tensor:
            return F.compute(cut, source, d.batch_size, device, t.amp)

        dataset = F.FeatureList(inputs.store, key, [y for _, y in samples], compute)
        if name == "val":
            inputs.val_loader = F.feature_loader(dataset, d.batch_size, shuffle=False)
            inputs.val_forward = cut.suffix
        else:
            inputs.train_loader = F.feature_loader(dataset, d.batch_size, shuffle=True, seed=seed)
            inputs.train_forward = cut.suffix
        inputs.paths[name] = "features"
