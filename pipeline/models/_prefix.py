"""A model cut after its frozen stages: a fixed prefix and the trainable suffix.

With `freeze_depth = k` the first k stages (`model.stages`) are a fixed function in eval mode, so
`model(x) == suffix(prefix(x))` where `prefix` runs without autograd and its output can be
computed once per image and cached (pipeline/features.py).

How a model is cut: its forward is written as an ordered list of steps (per family below), the
cut goes right after the last step holding a frozen tensor, and then past any following steps
that are parameter-free and mode-independent (ReLU, pooling, flatten), so a fully frozen ResNet
caches pooled 512-d vectors. A cut is used only when every step before it holds frozen tensors
only, no step after it holds any, and `suffix(prefix(x))` equals `model(x)` in eval mode on a
random batch (relative tolerance 1e-4); otherwise `split` returns None and the caller falls back.
Families with a step list: torchvision ResNet/ResNeXt/Wide-ResNet and RegNet; torchvision models
whose forward is `features` -> `avgpool` -> flatten -> `classifier` (EfficientNet, MobileNetV3,
VGG, AlexNet); timm models with `forward_head` whose top-level children up to the last frozen
one are their forward_features (timm EfficientNet/MobileNet-Lite, ResNet, ...).
On the CPU the prefix runs in channels_last (same results within float tolerance; 1.5-3.4x
faster for EfficientNet-Lite0 in eval mode on this project's 2-core CPU machines, while the
training suffix stays in the default layout, which trains faster there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models import _model as M
from pipeline.models import _weights as W

# Parameter-free modules whose result does not depend on train/eval mode.
_FIXED = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
)
_RTOL, _ATOL = 1e-4, 1e-5  # the check's tolerance: float rounding, not a different function
_RESNETS = ("resnet", "resnext", "wide_resnet")


class Steps:
    """Calls its steps in order: `x -> s_n(...s_1(x))`."""

    def __init__(self, steps: list[Callable]):
        self.steps = steps

    def modules(self) -> list[nn.Module]:
        return [s for s in self.steps if isinstance(s, nn.Module)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


class Prefix(Steps):
    """The frozen stages: eval mode, no autograd, channels_last when asked; output contiguous."""

    def __init__(self, steps: list[Callable], channels_last: bool):
        super().__init__(steps)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.modules():
            module.eval()  # a fixed function: dropout/drop-path inside frozen stages stay off too
        with torch.no_grad():
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return super().__call__(x).contiguous()


@dataclass(frozen=True)
class Split:
    """`model(x) == suffix(prefix(x))`; `feature_shape` is one image's prefix output shape."""

    prefix: Prefix
    suffix: Steps
    feature_shape: tuple[int, ...]
    cut: int  # number of steps in the prefix

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` -> logits: the prefix without autograd, then the suffix."""
        return self.suffix(self.prefix(images))


def steps(model: nn.Module, arch: str) -> list[Callable] | None:
    """The forward of `model` as an ordered list of steps, or None for an unknown family."""
    if arch.startswith(W.TIMM_PREFIX):
        return _timm_steps(model, arch)
    part = model.get_submodule
    if arch.startswith(_RESNETS):
        return [
            *map(part, ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")),
            nn.Flatten(1),
            part("fc"),
        ]
    if arch.startswith("regnet"):
        return [part("stem"), *part("trunk_output").children(), part("avgpool"), nn.Flatten(1), part("fc")]
    if all(
        isinstance(getattr(model, n, None), nn.Module) for n in ("features", "avgpool", "classifier")
    ) and isinstance(part("features"), nn.Sequential):
        return [*part("features").children(), part("avgpool"), nn.Flatten(1), part("classifier")]
    return None


def _timm_steps(model: nn.Module, arch: str) -> list[Callable] | None:
    head = getattr(model, "forward_head", None)
    if not callable(head):
        return None
    grouped = {id(t) for _, modules in M.stages(model, arch) for m in modules for t in _tensors(m)}
    children = list(model.children())
    last = max((i for i, c in enumerate(children) if any(id(t) in grouped for t in _tensors(c))), default=-1)
    out: list[Callable] = []
    for child in children[: last + 1]:
        out += list(child.children()) if isinstance(child, nn.Sequential) else [child]
    return [*out, head]


def _tensors(step: object) -> list[torch.Tensor]:
    if not isinstance(step, nn.Module):
        return []
    return [*step.parameters(), *step.buffers()]


def split(
    model: nn.Module, arch: str, frozen: list[nn.Module], image_size: int, channels_last: bool = False
) -> Split | None:
    """Cut `model` after its frozen modules (`model.freeze`'s result), or None when it cannot.

    Args:
        image_size: side of the square input in px (the crop), used for the check and
            `feature_shape`.
        channels_last: run the prefix in channels_last (its modules are converted in place).

    Returns:
        The split, or None: no frozen modules, no step list for the arch, frozen and trainable
        tensors mixed within one step, or the check `suffix(prefix(x)) == model(x)` failed.
    """
    if not frozen:
        return None
    all_steps = steps(model, arch)
    if all_steps is None:
        return None
    fixed = {id(t) for m in frozen for t in _tensors(m)}
    owned = [[id(t) in fixed for t in _tensors(s)] for s in all_steps]
    holding = [i for i, flags in enumerate(owned) if any(flags)]
    if not holding:
        return None
    cut = holding[-1] + 1
    if not all(all(flags) for flags in owned[:cut]) or any(any(f) for f in owned[cut:]):
        return None
    while cut < len(all_steps) - 1 and isinstance(all_steps[cut], _FIXED):
        cut += 1
    prefix = Prefix(all_steps[:cut], channels_last)
    suffix = Steps(all_steps[cut:])
    if channels_last:
        for module in prefix.modules():
            module.to(memory_format=torch.channels_last)
    shape = _check(model, prefix, suffix, image_size)
    return None if shape is None else Split(prefix, suffix, shape, cut)


def _check(model: nn.Module, prefix: Prefix, suffix: Steps, size: int) -> tuple[int, ...] | None:
    """One eval-mode batch of 2 seeded random images through both; the feature shape or None.
    Leaves every module's train/eval mode and the global RNG as they were."""
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    x = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        model.eval()
        with torch.no_grad():
            whole = model(x)
            features = prefix(x)
            parts = suffix(features)
        ok = parts.shape == whole.shape and torch.allclose(parts, whole, rtol=_RTOL, atol=_ATOL)
    except (RuntimeError, TypeError, ValueError):  # a step list that does not fit this model
        ok = False
    finally:
        for module, mode in modes.items():
            module.training = mode
    return tuple(features.shape[1:]) if ok else None
