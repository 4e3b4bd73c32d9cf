"""Pretrained weights: where an arch's starting weights come from, reading them, and the eval
preprocessing they define.

`weights` is one of:
- `none`: random initialisation;
- a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`, ...) for torchvision archs, or a timm
  pretrained tag (`DEFAULT`, `ra_in1k`, ...) for timm archs; fetched through the libraries' own
  hub APIs and caches;
- a local checkpoint path (a state_dict, optionally wrapped under 'state_dict' or 'model').
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.core import ModelError
from pipeline.data import Preprocess

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

    from pipeline.config import PreprocessConfig

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightsSpec:
    """Where an arch's starting weights come from (resolved once, before the first trial)."""

    arch: str
    kind: str  # "none" | "torchvision" | "timm" | "local"
    value: str  # the study file's weights value
    path: Path | None = None  # local checkpoint, or the hub cache file it will live in

    @property
    def is_timm(self) -> bool:
        return self.arch.startswith(TIMM_PREFIX)

    @property
    def timm_name(self) -> str:
        return self.arch[len(TIMM_PREFIX) :]

    def origin(self) -> str:
        """A one-line provenance string stored with runs and the registered model."""
        if self.kind == "local":
            return f"local checkpoint {self.path}"
        if self.kind == "none":
            return "random initialisation"
        return f"{self.kind} weights {self.value}"


@dataclass(frozen=True)
class LoadReport:
    """What happened when the pretrained weights met the new head."""

    dropped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> checkpoint shape
    missing: tuple[str, ...] = ()  # parameters left at their fresh initialisation

    def describe(self) -> str:
        if not self.dropped and not self.missing:
            return "all tensors loaded"
        parts = [f"dropped {k} {tuple(v)}" for k, v in self.dropped.items()]
        if self.missing:
            parts.append(f"new (untrained): {', '.join(self.missing)}")
        return "; ".join(parts)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(value).exists()


def resolve_weights(arch: str, weights: str) -> WeightsSpec:
    """Classify the `weights` value for `arch`.

    Raises:
        ModelError: unknown weights name for the arch (lists the allowed names), or a local
            checkpoint path that does not exist.
    """
    if weights.lower() == "none":
        return WeightsSpec(arch, "none", weights)
    if _looks_like_path(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            raise ModelError(
                f"model.weights: {path} is a folder; set model.weights to the checkpoint file in it "
                "(a .pth/.pt file saved with torch.save)"
            )
        if not path.is_file():
            raise ModelError(
                f"model.weights: checkpoint file {path} not found; set model.weights to a checkpoint file "
                f"(--set model.weights=PATH), or run `make data`: it links the offline study's checkpoints "
                "into weights/ from ../shared/weights or $SWEEP_WEIGHTS_SOURCE"
            )
        return WeightsSpec(arch, "local", weights, path.resolve())
    if arch.startswith(TIMM_PREFIX):
        _check_timm_tag(arch, weights)
        return WeightsSpec(arch, "timm", weights)
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    # __members__ also lists the DEFAULT alias; name it once, first.
    names = ["DEFAULT", *(n for n in enum.__members__ if n != "DEFAULT")]
    if weights not in names:
        raise ModelError(_unknown_weights(weights, arch, names))
    url = enum[weights].url if weights != "DEFAULT" else enum.DEFAULT.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return WeightsSpec(arch, "torchvision", weights, cache)


def _unknown_weights(weights: str, arch: str, names: list[str]) -> str:
    close = difflib.get_close_matches(weights, names, n=1) or [n for n in names if n.lower() == weights.lower()]
    hint = f"; did you mean {close[0]}?" if close else ""
    return (
        f"model.weights: '{weights}' is not a weights name of {arch}{hint} "
        f"(allowed: {', '.join(names)}, none, or a local checkpoint path)"
    )


def _check_timm_tag(arch: str, weights: str) -> None:
    """timm's pretrained tags come from its registry, known offline: check them before the hub."""
    import timm

    name = arch[len(TIMM_PREFIX) :]
    if weights == "DEFAULT":
        return
    if "." in name:
        raise ModelError(
            f"model.weights: {arch} already names a pretrained tag; "
            f"use weights: DEFAULT (or drop the tag from model.arch)"
        )
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
    if weights not in tags:
        raise ModelError(_unknown_weights(weights, arch, ["DEFAULT", *tags]))


def _torchvision_enum(spec: WeightsSpec) -> WeightsEnum:
    import torchvision

    enum = torchvision.models.get_model_weights(spec.arch)
    return enum.DEFAULT if spec.value == "DEFAULT" else enum[spec.value]


def offline_message(spec: WeightsSpec, err: Exception, cache: str) -> ModelError:
    return ModelError(
        f"model.weights: cannot get {spec.origin()} for {spec.arch}: not in the local cache "
        f"({cache}) and the download failed ({type(err).__name__}: {err}). "
        "Offline? Copy the file to that cache path, or set model.weights to a local checkpoint "
        "path (e.g. weights/efficientnet_lite0_imagenet.pth with "
        "studies/hymenoptera_offline.yaml), or model.weights: none"
    )


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  torch raises many types for a bad file; its texts run long
        first = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else ""
        raise ModelError(
            f"model.weights: {path} is not a readable PyTorch checkpoint ({type(err).__name__}: {first})"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"model.weights: {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def pretrained_state(spec: WeightsSpec) -> dict[str, torch.Tensor] | None:
    """The torchvision/local state_dict for `spec` (None for `none` and timm hub weights).

    Raises:
        ModelError: unreadable checkpoint, or hub weights neither cached nor downloadable.
    """
    if spec.kind == "local":
        assert spec.path is not None  # resolve_weights sets it for every local checkpoint
        return load_checkpoint(spec.path)
    if spec.kind == "torchvision":
        try:
            return _torchvision_enum(spec).get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # noqa: BLE001  URLError, HTTPError, hash mismatch, socket errors
            raise offline_message(spec, err, str(spec.path)) from None
    return None


def weights_preprocess(spec: WeightsSpec, model: nn.Module | None = None) -> Preprocess:
    """Eval preprocessing defined by the weights: torchvision's `weights.transforms()` or timm's
    `pretrained_cfg`. A bare local torchvision checkpoint defines none, so ImageNet's
    resize 256 / crop 224 / mean / std are used (override them in `model.preprocess`)."""
    if spec.kind == "torchvision":
        t = _torchvision_enum(spec).transforms()
        return Preprocess(
            int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std), t.interpolation.value
        )
    if spec.is_timm:
        import timm

        cfg: dict[str, Any]
        if model is not None:
            cfg = model.pretrained_cfg  # type: ignore[assignment]  # timm's dict; Module.__getattr__ types Tensor | Module
        else:
            tag = (
                spec.timm_name if spec.kind != "timm" or spec.value == "DEFAULT" else (f"{spec.timm_name}.{spec.value}")
            )
            found = timm.models.get_pretrained_cfg(tag)
            cfg = (
                found.to_dict()
                if found is not None
                else {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
            )
        crop = int(cfg["input_size"][-1])
        return Preprocess(
            int(round(crop / cfg.get("crop_pct", 0.875))),
            crop,
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg.get("interpolation", "bilinear"),
        )
    return Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def resolve_preprocess(base: Preprocess, image_size: int | None, override: PreprocessConfig) -> Preprocess:
    """Apply the study file on top of the weights' preprocessing.

    `data.image_size` sets the crop side and keeps the weights' resize/crop ratio (256/224 for
    torchvision's ImageNet weights); `model.preprocess.*` fields replace single values.
    """
    resize, crop = base.resize, base.crop
    if image_size is not None:
        resize, crop = int(round(image_size * base.resize / base.crop)), image_size
    return Preprocess(
        resize=override.resize or resize,
        crop=override.crop or crop,
        mean=override.mean or base.mean,
        std=override.std or base.std,
        interpolation=override.interpolation or base.interpolation,
    )
