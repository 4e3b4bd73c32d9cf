"""Architectures, building a model with its starting weights and new head, and freeze depth.

`arch` is a torchvision classification model name (`torchvision.models.get_model`) or `timm/NAME`.
`weights` (see pipeline/weights.py): `none`, a torchvision weights name or timm pretrained tag,
or a local checkpoint path.
Head tensors whose shape differs from the new head are dropped and reported in `LoadReport`.

Freeze depth (see ../shared/DESIGN.md): each family is an ordered list of stages; `freeze_depth=k`
freezes the first k: `requires_grad=False`, left out of the optimizer, kept in eval mode so
BatchNorm running statistics do not move. With no trainable input, autograd records nothing for
them. The new head is never part of a stage, so it always trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.core import ModelError, first_line
from pipeline.models._weights import (
    TIMM_PREFIX,
    LoadReport,
    WeightsSpec,
    load_checkpoint,
    offline_message,
    pretrained_state,
)

logger = logging.getLogger(__name__)


def head_names(model: nn.Module, num_classes: int) -> set[str]:
    """State-dict names of the classification head: timm's `get_classifier()`, else the last
    Linear (or 1x1 Conv2d, SqueezeNet) with `num_classes` outputs."""
    if hasattr(model, "get_classifier"):
        head = as_timm(model).get_classifier()
        found = [n for n, m in model.named_modules() if m is head]
    else:
        found = [
            n
            for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) and m.out_features == num_classes)
            or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
        ][-1:]
    return {f"{n}.{k}" for n in found for k, _ in model.get_submodule(n).named_parameters()}


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], spec: WeightsSpec, num_classes: int) -> LoadReport:
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


def build_model(
    spec: WeightsSpec, num_classes: int, state: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, LoadReport]:
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
    assert state is not None  # torchvision and local weights always have a state_dict
    return model, _fit_state(model, state, spec, num_classes)


def _build_timm(
    spec: WeightsSpec, num_classes: int, state: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, LoadReport]:
    import timm

    name = spec.timm_name
    if spec.kind == "none":
        return timm.create_model(name, pretrained=False, num_classes=num_classes), LoadReport()
    if spec.kind == "local":
        assert spec.path is not None  # resolve_weights sets it for every local checkpoint
        state = state if state is not None else load_checkpoint(spec.path)  # one-line error if unreadable
        try:  # timm's own local-file loading, as timm users do it (drops the 1000-class head)
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=dict(file=str(spec.path))
            )
        except (RuntimeError, ValueError, KeyError, OSError) as err:
            # timm's message for a misfit is pages of tensor names; the strict check below names the
            # first misfit in one line, and timm's own reason stays in the debug log.
            logger.debug("timm could not load %s into %s itself: %s", spec.path, name, first_line(err))
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        # timm loads non-strictly when the head changes: re-check strictly and report the head.
        return model, _fit_state(model, state, spec, num_classes)
    full = name if spec.value == "DEFAULT" else f"{name}.{spec.value}"
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes)
    except Exception as err:  # noqa: BLE001  huggingface_hub raises its own connection/lookup errors
        from huggingface_hub import constants  # the cache timm's hub download really used

        cache = constants.HF_HUB_CACHE
        raise offline_message(spec, err, cache) from None
    if as_timm(model).pretrained_cfg.get("num_classes") == num_classes:
        return model, LoadReport()  # timm kept the pretrained head
    return model, LoadReport(missing=tuple(sorted(head_names(model, num_classes))))


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

        groups = group_modules(model, as_timm(model).group_matcher(coarse=True))
        classifier = as_timm(model).get_classifier()
        head = {n for n, _ in model.named_modules() if n and model.get_submodule(n) is classifier}
        named = dict(model.named_modules())
        result = []
        for _, names in sorted(groups.items()):
            names = [n for n in names if n not in head]
            if names:
                # Name a group by its top-level parts: "conv_stem+bn1", "blocks.0", "blocks.6+conv_head+bn2".
                parts = dict.fromkeys(
                    ".".join(n.split(".")[:2]) if n.split(".")[1:2] and n.split(".")[1].isdigit() else n.split(".")[0]
                    for n in names
                )
                result.append(("+".join(parts), [named[n] for n in names]))
        return result
    if arch.startswith(_RESNET_PREFIXES):
        stem = [model.get_submodule("conv1"), model.get_submodule("bn1")]
        return [("stem", stem)] + [(f"layer{i}", [model.get_submodule(f"layer{i}")]) for i in range(1, 5)]
    features = getattr(model, "features", None)
    if arch.startswith(_FEATURES_PREFIXES) and isinstance(features, nn.Sequential):
        return [(f"features.{i}", [m]) for i, m in enumerate(features.children())]
    if arch.startswith("regnet"):
        trunk = model.get_submodule("trunk_output").named_children()
        return [("stem", [model.get_submodule("stem")])] + [(f"trunk_output.{n}", [m]) for n, m in trunk]
    raise ModelError(
        f"training.freeze_depth: no stage list for arch '{arch}' (supported: ResNet/ResNeXt/"
        "Wide-ResNet, EfficientNet, MobileNet, MNASNet, VGG, ConvNeXt, DenseNet, RegNet, timm/*); "
        "use freeze_depth 0"
    )


def as_timm(model: nn.Module) -> Any:
    """`model` as a timm model (get_classifier, group_matcher, pretrained_cfg): nn.Module's
    `__getattr__` is typed for parameters, buffers and submodules only."""
    return model


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


def set_train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    """`model.train()` but keep frozen stages in eval mode (BatchNorm statistics unchanged)."""
    model.train()
    for module in frozen:
        module.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
