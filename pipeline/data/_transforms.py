"""Eval and train transforms: PIL RGB (or cached uint8) -> normalised float32 tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2 as T

from pipeline.data import portable

# PIL RGB image (or cached uint8 `(3, H, W)` tensor) -> `(3, crop, crop)` float32 tensor.
Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize short side to `resize` px, centre-crop `crop` px, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


_INTERP = portable.INTERPOLATIONS


def _finish(pp: Preprocess) -> list:
    return portable.finishing(pp.mean, pp.std)


def eval_transform(pp: Preprocess) -> T.Compose:
    """PIL RGB -> `(3, crop, crop)` float32 normalised tensor; resize short side, centre crop
    (`portable.eval_transform`, the one the registered model carries)."""
    return portable.eval_transform(pp.resize, pp.crop, pp.mean, pp.std, pp.interpolation)


def train_transform(pp: Preprocess, strength: float) -> T.Compose:
    """Train transforms for augmentation strength `s` in [0, 1] (one monotone map).

    - s = 0: exactly `eval_transform` (no augmentation).
    - s > 0: RandomResizedCrop(crop, scale=(0.08 + 0.92 (1 - s), 1), ratio=(1 - s/4, 1 + s/3)),
      RandomHorizontalFlip(p = 0.5 s), ColorJitter(brightness = contrast = saturation = 0.4 s).
    - s = 1: scale (0.08, 1), ratio (3/4, 4/3) and p = 0.5 are the torchvision transfer-learning
      tutorial's RandomResizedCrop + flip (the seed recipe), plus timm's default jitter of 0.4.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    if strength == 0:
        return eval_transform(pp)
    s = strength
    return T.Compose(
        [
            # 0.08 + 0.92 (1 - s), not 1 - 0.92 s: the latter is 0.07999999999999996 at s = 1.
            T.RandomResizedCrop(
                pp.crop,
                scale=(0.08 + 0.92 * (1 - s), 1.0),
                ratio=(1 - s / 4, 1 + s / 3),
                interpolation=_INTERP[pp.interpolation],
                antialias=True,
            ),
            T.RandomHorizontalFlip(p=0.5 * s),
            T.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s),
            *_finish(pp),
        ]
    )


def working_size(pp: Preprocess) -> T.Resize:
    """The resize both image paths share: PIL RGB -> short side `pp.resize` px, aspect kept.
    The decoded-image cache (pipeline/imagecache.py) applies it once per file."""
    return T.Resize(pp.resize, interpolation=_INTERP[pp.interpolation], antialias=True)


def cached_eval_transform(pp: Preprocess) -> T.Compose:
    """uint8 `(3, H, W)` already at `working_size` -> `(3, crop, crop)` float32, bit-identical
    to `eval_transform` applied to the decoded file (the same centre-crop offsets and scaling)."""
    return T.Compose([T.CenterCrop(pp.crop), *_finish(pp)])


def cached_train_transform(pp: Preprocess, strength: float) -> T.Compose:
    """`train_transform` for images taken from the decoded-image cache.

    s = 0 is `cached_eval_transform` on the working-size image (bit-identical to the on-the-fly
    eval path). For s > 0 the same transforms run on the cached augmentation source (the decoded
    file at its own resolution, short side capped at 4 x crop; pipeline/imagecache.py) instead
    of the PIL image: RandomResizedCrop draws its box the same way over the same pixels but
    resamples with torchvision's tensor kernels (antialiased bilinear) instead of PIL's, and
    ColorJitter works on uint8 tensors; the random draws differ from the PIL path's, the
    distribution of views does not. the `augmentation` benchmark suite compares best val accuracy both ways.
    """
    return cached_eval_transform(pp) if strength == 0 else train_transform(pp, strength)
