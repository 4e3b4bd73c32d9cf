"""Pre-flight: everything checked once before a study is stored or any trial runs.

Scans the image folders (every file decoded once), resolves and loads the pretrained weights,
and checks that every freeze depth the study file can sample fits the architecture, so a bad
data folder or weights value never leaves a stored study behind.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import data as D
from pipeline import models as M
from pipeline.config import CategoricalParam, IntParam, StudyConfig
from pipeline.core import ModelError
from pipeline.training._train import pick_device


@dataclass(frozen=True)
class Source:
    """What a fit trains from when no pre-flight ran in this process (the refit on train + val):
    the splits, the pretrained weights and the eval preprocessing the trials used."""

    splits: D.Splits
    spec: M.WeightsSpec
    state: dict[str, torch.Tensor] | None
    preprocess: D.Preprocess


@dataclass(frozen=True)
class Prepared:
    """What pre-flight found, shared read-only by every trial of the run."""

    splits: D.Splits
    spec: M.WeightsSpec
    state: dict[str, torch.Tensor] | None  # pretrained state_dict (torchvision/local), shared by trials
    preprocess: D.Preprocess
    stage_names: tuple[str, ...]  # freeze-depth stages of the arch; empty when no depth > 0 is sampled
    load_report: M.LoadReport

    def checkpoint(
        self,
        cfg: StudyConfig,
        state_dict: dict[str, torch.Tensor],
        trial_number: int,
        best_epoch: int,
        value: float,
        params: dict[str, Any],
    ) -> M.TrialCheckpoint:
        """The checkpoint of weights fitted on this pre-flight's data: the arch and metric from
        `cfg`, the weights' origin, `class_to_idx` and eval preprocessing from here; `value` is the
        best `cfg.study.metric` (fraction 0-1 for accuracy) reached at 0-based `best_epoch`."""
        return M.TrialCheckpoint(
            state_dict=state_dict,
            arch=cfg.model.arch,
            weights_origin=self.spec.origin(),
            class_to_idx=self.splits.class_to_idx,
            preprocess=self.preprocess.to_dict(),
            trial_number=trial_number,
            best_epoch=best_epoch,
            metric=cfg.study.metric,
            value=value,
            params=params,
        )


def prepare(
    cfg: StudyConfig, progress: Callable[[int, int], None] | None = None, warn: Callable[[str], None] = print
) -> Prepared:
    """Scan data, resolve and load weights, check freeze depths fit the arch.

    Args:
        progress: called as `progress(done, total)` while images are scanned.
        warn: receives one line per data warning (a class missing from val/test, skipped images).

    Raises:
        ConfigError: `training.device` cuda without a CUDA device.
        DataError, ModelError: with a message naming the folder, file or key.
    """
    d = cfg.data
    pick_device(cfg.training.device)  # a device that is not there stops the run before anything is stored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed, d.val_fraction)
        splits = D.scan_images(splits, d.bad_images, progress)  # warns: extensions, Pillow's notes
    for w in caught:
        warn(f"warning: {w.message}")
    if splits.skipped:
        warn(
            f"data.bad_images: skip: training without {len(splits.skipped)} unreadable image(s): "
            f"{', '.join(splits.skipped)} (listed in splits.json)"
        )
    spec = M.resolve_weights(cfg.model.arch, cfg.model.weights)
    state = M.pretrained_state(spec)
    model, report = M.build_model(spec, len(splits.class_to_idx), state)
    base = M.weights_preprocess(spec, model)
    pp = M.resolve_preprocess(base, d.image_size, cfg.model.preprocess)
    deepest = max_freeze_depth(cfg)
    names: tuple[str, ...] = ()
    if deepest > 0:
        names = tuple(n for n, _ in M.stages(model, cfg.model.arch))
        if deepest > len(names):
            raise ModelError(
                f"search_space.freeze_depth / training.freeze_depth: up to {deepest} but "
                f"{cfg.model.arch} has {len(names)} stages ({', '.join(names)}); lower the high bound"
            )
    return Prepared(splits, spec, state, pp, names, report)


def max_freeze_depth(cfg: StudyConfig) -> int:
    """The deepest `freeze_depth` the study can use: the search space's high bound or largest
    choice, else `training.freeze_depth`."""
    p = cfg.search_space.get("freeze_depth")
    if isinstance(p, IntParam):
        return p.high
    if isinstance(p, CategoricalParam):
        return max(int(c) for c in p.choices)
    return cfg.training.freeze_depth
