"""Architectures, pretrained weights, the new head and freeze depth.

`arch` is a torchvision classification model name (`torchvision.models.get_model`) or `timm/NAME`.
`weights` is one of:
- `none`: random initialisation;
- a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`, ...) for torchvision archs, or a timm
  pretrained tag (`DEFAULT`, `ra_in1k`, ...) for timm archs; fetched through the libraries' own
  hub APIs and caches;
- a local checkpoint path (a state_dict, optionally wrapped under 'state_dict' or 'model').
Head tensors whose shape differs from the new head are dropped and reported in `LoadReport`.

Freeze depth (see ../shared/DESIGN.md): each family is an ordered list of stages; `freeze_depth=k`
freezes the first k: `requires_grad=False`, left out of the optimizer, kept in eval mode so
BatchNorm running statistics do not move. With no trainable input, autograd records nothing for
them. The new head is never part of a stage, so it always trains.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.transforms import Preprocess

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def torchvision_archs() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise `ValueError` (a config problem) when `arch` names no known model."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name.split(".")[0]):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"unknown arch '{arch}': timm has no model '{name}'{hint} "
                             "(see timm.list_models())")
        return
    if arch not in torchvision_archs():
        close = difflib.get_close_matches(arch, torchvision_archs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown arch '{arch}'{hint} (use a torchvision classification model from "
            "torchvision.models.list_models(), e.g. resnet18, efficientnet_b0, mobilenet_v3_large, "
            "or timm/NAME)"
        )


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
        return self.arch[len(TIMM_PREFIX):]

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
        if not path.is_file():
            raise ModelError(f"model.weights: checkpoint file {path} not found")
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
    close = difflib.get_close_matches(weights, names, n=1) or [
        n for n in names if n.lower() == weights.lower()]
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"model.weights: '{weights}' is not a weights name of {arch}{hint} "
            f"(allowed: {', '.join(names)}, none, or a local checkpoint path)")


def _check_timm_tag(arch: str, weights: str) -> None:
    """timm's pretrained tags come from its registry, known offline: check them before the hub."""
    import timm

    name = arch[len(TIMM_PREFIX):]
    if weights == "DEFAULT":
        return
    if "." in name:
        raise ModelError(f"model.weights: {arch} already names a pretrained tag; "
                         f"use weights: DEFAULT (or drop the tag from model.arch)")
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
    if weights not in tags:
        raise ModelError(_unknown_weights(weights, arch, ["DEFAULT", *tags]))


def _torchvision_enum(spec: WeightsSpec):
    import torchvision

    enum = torchvision.models.get_model_weights(spec.arch)
    return enum.DEFAULT if spec.value == "DEFAULT" else enum[spec.value]


def _offline_message(spec: WeightsSpec, err: Exception, cache: str) -> ModelError:
    return ModelError(
        f"model.weights: cannot get {spec.origin()} for {spec.arch}: not in the local cache "
        f"({cache}) and the download failed ({type(err).__name__}: {err}). "
        "Offline? Copy the file to that cache path, or set model.weights to a local checkpoint "
        "path (e.g. weights/efficientnet_lite0_imagenet.pth with "
        "studies/hymenoptera_offline.yaml), or model.weights: none"
    )


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; its texts run long
        first = str(err).strip().splitlines()[0].split(". ")[0][:200] if str(err).strip() else ""
        raise ModelError(f"model.weights: {path} is not a readable PyTorch checkpoint "
                         f"({type(err).__name__}: {first})") from None
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
        return _load_checkpoint(spec.path)
    if spec.kind == "torchvision":
        try:
            return _torchvision_enum(spec).get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, HTTPError, hash mismatch, socket errors
            raise _offline_message(spec, err, str(spec.path)) from None
    return None


def head_names(model: nn.Module, num_classes: int) -> set[str]:
    """State-dict names of the classification head: timm's `get_classifier()`, else the last
    Linear (or 1x1 Conv2d, SqueezeNet) with `num_classes` outputs."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        found = [n for n, m in model.named_modules() if m is head]
    else:
        found = [n for n, m in model.named_modules()
                 if (isinstance(m, nn.Linear) and m.out_features == num_classes)
                 or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)][-1:]
    return {f"{n}.{k}" for n in found for k, _ in model.get_submodule(n).named_parameters()}


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], spec: WeightsSpec,
               num_classes: int) -> LoadReport:
    own = model.state_dict()
    mismatched = {k: tuple(v.shape) for k, v in state.items() if k in own and own[k].shape != v.shape}
    head = head_names(model, num_classes)
    wrong = [k for k in mismatched if k not in head]
    if wrong:  # only the head may differ: a reshaped backbone tensor means another architecture
        raise ModelError(
            f"model.weights: {spec.origin()} does not fit {spec.arch}: {len(wrong)} tensor(s) of "
            f"another shape outside the head (e.g. {wrong[0]}: checkpoint {mismatched[wrong[0]]}, "
            f"model {tuple(own[wrong[0]].shape)})"
        )
    dropped = mismatched
    usable = {k: v for k, v in state.items() if k not in dropped}
    result = model.load_state_dict(usable, strict=False)
    # A headless (feature-extractor) checkpoint is fine: the head is new either way.
    missing = tuple(k for k in result.missing_keys if k not in dropped and k not in head)
    if missing or result.unexpected_keys:
        raise ModelError(
            f"model.weights: {spec.origin()} does not fit {spec.arch}: "
            f"{len(missing)} missing tensor(s) (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3]) or '-'})"
        )
    fresh = set(dropped) | (head & set(result.missing_keys))
    return LoadReport(dropped=dropped, missing=tuple(k for k in own if k in fresh))


def build_model(spec: WeightsSpec, num_classes: int,
                state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, LoadReport]:
    """Create `spec.arch` with a fresh `num_classes`-way head and load the starting weights.

    Args:
        state: a preloaded `pretrained_state(spec)`, so trials do not re-read the checkpoint.

    Returns:
        (model in train mode on the CPU, what was dropped/left new).

    Raises:
        ModelError: weights unavailable offline or not fitting the arch.
    """
    if spec.is_timm:
        return _build_timm(spec, num_classes, state)
    import torchvision

    model = torchvision.models.get_model(spec.arch, weights=None, num_classes=num_classes)
    if spec.kind == "none":
        return model, LoadReport()
    state = state if state is not None else pretrained_state(spec)
    return model, _fit_state(model, state, spec, num_classes)


def _build_timm(spec: WeightsSpec, num_classes: int,
                state: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, LoadReport]:
    import timm

    name = spec.timm_name
    if spec.kind == "none":
        return timm.create_model(name, pretrained=False, num_classes=num_classes), LoadReport()
    if spec.kind == "local":
        state = state if state is not None else _load_checkpoint(spec.path)  # one-line error if unreadable
        try:  # timm's own local-file loading, as timm users do it (drops the 1000-class head)
            model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay=dict(file=str(spec.path)))
        except Exception:  # timm's RuntimeError for a misfit is long; our check below names it
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        # timm loads non-strictly when the head changes: re-check strictly and report the head.
        return model, _fit_state(model, state, spec, num_classes)
    full = name if spec.value == "DEFAULT" else f"{name}.{spec.value}"
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes)
    except Exception as err:  # huggingface_hub raises its own connection/lookup errors
        from huggingface_hub import constants  # the cache timm's hub download really used

        cache = constants.HF_HUB_CACHE
        raise _offline_message(spec, err, cache) from None
    if model.pretrained_cfg.get("num_classes") == num_classes:
        return model, LoadReport()  # timm kept the pretrained head
    return model, LoadReport(missing=tuple(sorted(head_names(model, num_classes))))


def weights_preprocess(spec: WeightsSpec, model: nn.Module | None = None) -> Preprocess:
    """Eval preprocessing defined by the weights: torchvision's `weights.transforms()` or timm's
    `pretrained_cfg`. A bare local torchvision checkpoint defines none, so ImageNet's
    resize 256 / crop 224 / mean / std are used (override them in `model.preprocess`)."""
    if spec.kind == "torchvision":
        t = _torchvision_enum(spec).transforms()
        return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                          t.interpolation.value)
    if spec.is_timm:
        import timm

        if model is not None:
            cfg = model.pretrained_cfg
        else:
            tag = spec.timm_name if spec.kind != "timm" or spec.value == "DEFAULT" else (
                f"{spec.timm_name}.{spec.value}")
            found = timm.models.get_pretrained_cfg(tag)
            cfg = found.to_dict() if found is not None else {
                "input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        crop = int(cfg["input_size"][-1])
        return Preprocess(int(round(crop / cfg.get("crop_pct", 0.875))), crop, tuple(cfg["mean"]),
                          tuple(cfg["std"]), cfg.get("interpolation", "bilinear"))
    return Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def resolve_preprocess(base: Preprocess, image_size: int | None, override) -> Preprocess:
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
        mean=tuple(override.mean or base.mean),
        std=tuple(override.std or base.std),
        interpolation=override.interpolation or base.interpolation,
    )


# ---- freeze depth -------------------------------------------------------------------------------

_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
_FEATURES_PREFIXES = ("efficientnet", "mobilenet", "mnasnet", "vgg", "alexnet", "convnext", "densenet")


def stages(model: nn.Module, arch: str) -> list[tuple[str, list[nn.Module]]]:
    """The ordered stages of `arch` that `freeze_depth` counts, as (name, modules).

    ResNet family: stem (conv1+bn1), layer1..layer4 (5 stages). torchvision models with a
    `features` Sequential (EfficientNet, MobileNetV2/V3, MNASNet, VGG, ConvNeXt, DenseNet): each child
    of `features`. timm models: the coarse groups of `model.group_matcher` (stem, then block stages),
    without the classifier.

    Raises:
        ModelError: the arch has no known stage list.
    """
    if arch.startswith(TIMM_PREFIX):
        from timm.models import group_modules

        groups = group_modules(model, model.group_matcher(coarse=True))
        head = {n for n, _ in model.named_modules() if n and model.get_submodule(n) is model.get_classifier()}
        named = dict(model.named_modules())
        result = []
        for _, names in sorted(groups.items()):
            names = [n for n in names if n not in head]
            if names:
                # Name a group by its top-level parts: "conv_stem+bn1", "blocks.0", "blocks.6+conv_head+bn2".
                parts = dict.fromkeys(
                    ".".join(n.split(".")[:2]) if n.split(".")[1:2] and n.split(".")[1].isdigit()
                    else n.split(".")[0] for n in names)
                result.append(("+".join(parts), [named[n] for n in names]))
        return result
    if arch.startswith(_RESNET_PREFIXES):
        return [("stem", [model.conv1, model.bn1])] + [
            (f"layer{i}", [getattr(model, f"layer{i}")]) for i in range(1, 5)]
    if arch.startswith(_FEATURES_PREFIXES) and isinstance(getattr(model, "features", None), nn.Sequential):
        return [(f"features.{i}", [m]) for i, m in enumerate(model.features.children())]
    if arch.startswith("regnet"):
        return [("stem", [model.stem])] + [
            (f"trunk_output.{n}", [m]) for n, m in model.trunk_output.named_children()]
    raise ModelError(
        f"training.freeze_depth: no stage list for arch '{arch}' (supported: ResNet/ResNeXt/"
        "Wide-ResNet, EfficientNet, MobileNet, MNASNet, VGG, ConvNeXt, DenseNet, RegNet, timm/*); "
        "use freeze_depth 0"
    )


def freeze(model: nn.Module, arch: str, depth: int) -> list[nn.Module]:
    """Freeze the first `depth` stages in place; return the frozen modules.

    Raises:
        ModelError: depth larger than the number of stages (names them).
    """
    if depth == 0:
        return []
    all_stages = stages(model, arch)
    if depth > len(all_stages):
        raise ModelError(
            f"training.freeze_depth: {depth} exceeds the {len(all_stages)} stages of {arch} "
            f"({', '.join(n for n, _ in all_stages)}); lower freeze_depth (or its search_space high)"
        )
    frozen = [m for _, modules in all_stages[:depth] for m in modules]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """`model.train()` but keep frozen stages in eval mode (BatchNorm statistics unchanged)."""
    model.train()
    for module in frozen:
        module.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
