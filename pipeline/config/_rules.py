"""Rules of the libraries a study file must meet, checked before anything runs: architecture
names torchvision and timm know, whether an architecture has BatchNorm, and the names MLflow's
model registry accepts. Heavy imports (torch, torchvision, timm) happen only inside the checks.
"""

from __future__ import annotations

import difflib
import re
import warnings
from functools import lru_cache

TIMM_PREFIX = "timm/"


@lru_cache(maxsize=1)
def _torchvision_archs() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise `ValueError` (a config problem) when `arch` names no torchvision classification model
    (`torchvision.models.list_models()`) and no timm model (`timm/NAME[.tag]`)."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        name = arch[len(TIMM_PREFIX) :]
        if not timm.is_model(name.split(".")[0]):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
            raise ValueError(f"unknown arch '{arch}': timm has no model '{name}'{hint} (see timm.list_models())")
        return
    if arch not in _torchvision_archs():
        close = difflib.get_close_matches(arch, _torchvision_archs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown arch '{arch}'{hint} (use a torchvision classification model from "
            "torchvision.models.list_models(), e.g. resnet18, efficientnet_b0, mobilenet_v3_large, "
            "or timm/NAME)"
        )


@lru_cache(maxsize=16)
def has_batch_norm(arch: str) -> bool:
    """Whether `arch` (a name `check_arch` accepts) contains BatchNorm layers.

    The model is built without weights on PyTorch's meta device (no memory, ~0.1 s); the few
    torchvision models whose initialisation reads tensor values (RegNet) are built on the CPU.
    """
    import torch
    from torch import nn

    def build() -> nn.Module:
        if arch.startswith(TIMM_PREFIX):
            import timm

            return timm.create_model(arch[len(TIMM_PREFIX) :].split(".")[0], pretrained=False)
        import torchvision

        return torchvision.models.get_model(arch, weights=None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. GoogLeNet's init_weights FutureWarning
        try:
            with torch.device("meta"):
                model = build()
        except NotImplementedError:  # "Cannot copy out of meta tensor"
            model = build()
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, norms) for m in model.modules())


def model_name_problem(name: str) -> str | None:
    """Why MLflow's registry would refuse `name` as a registered model name, or None.

    MLflow's rules (mlflow.utils.validation, whose validators are private): not blank; no '/' or
    ':'; not '.' nor starting with '..' (names are used as paths); its file store also refuses '%'.
    A '?' is refused too: it would end the path of the `models:/NAME@alias` URI the model is
    loaded back with.
    """
    if not name.strip():
        return "a registered model name cannot be blank"
    bad = [c for c in "/:%?" if c in name]
    if bad:
        fixed = re.sub(r"[/:%?]", "-", name)
        return (
            f"{name!r} contains {' and '.join(repr(c) for c in bad)}: MLflow registered model "
            f"names cannot contain '/', ':' or '%' ('?' breaks models:/ URIs); use e.g. {fixed!r}"
        )
    if name == "." or name.startswith(".."):
        return f"{name!r}: MLflow treats model names as paths and refuses '.' and names starting with '..'"
    return None


def alias_problem(alias: str) -> str | None:
    """Why MLflow would refuse `alias` for a registered model, or None.

    MLflow's rules: letters, digits, '_' and '-' only, at most 255 characters; `latest` (any case)
    and `v<digits>` / `V<digits>` are reserved (`models:/NAME@latest` and `models:/NAME@v3` mean
    the newest version and version 3).
    """
    if not re.fullmatch(r"[\w-]+", alias):
        return f"{alias!r}: an MLflow alias may only contain letters, digits, underscores (_) and dashes (-)"
    if len(alias) > 255:
        return f"an MLflow alias has at most 255 characters (this one has {len(alias)})"
    if alias.lower() == "latest":
        return (
            f"{alias!r} is reserved by MLflow (models:/NAME@latest always means the newest "
            "version); choose another alias, e.g. champion"
        )
    if re.fullmatch(r"[vV]\d+", alias):
        return (
            f"{alias!r} is reserved by MLflow for version aliases (models:/NAME@{alias} means "
            f"version {int(alias[1:])}); choose another alias, e.g. champion"
        )
    return None
