"""One trial checkpoint format: what a trial saves at its best epoch and the report loads back.

A checkpoint is a `torch.save` of plain values and tensors (loadable with `weights_only=True`),
written atomically (temporary file + `os.replace`) so a killed save never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import checkpoint_dir
from pipeline.core import RegistryError, first_line


@dataclass(frozen=True)
class TrialCheckpoint:
    """The best-epoch weights of one trial plus what is needed to rebuild and use them alone.

    Attributes:
        state_dict: the classifier's weights (CPU tensors) at `best_epoch`.
        arch: `model.arch` (torchvision name or `timm/NAME`).
        weights_origin: where the pretrained weights came from (`WeightsSpec.origin()`).
        class_to_idx: class name -> output index, built from the train split.
        preprocess: `Preprocess.to_dict()` of the eval transform (resize, crop, mean, std, ...).
        trial_number: the Optuna trial number.
        best_epoch: 0-based epoch whose weights these are.
        metric: the study's metric name (`val_accuracy` or `val_loss`).
        value: the trial's best value of `metric` (fraction 0-1 for accuracy).
        params: the trial's sampled parameters.
    """

    state_dict: dict[str, torch.Tensor]
    arch: str
    weights_origin: str
    class_to_idx: dict[str, int]
    preprocess: dict[str, Any]
    trial_number: int
    best_epoch: int
    metric: str
    value: float
    params: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def path_for(study_name: str, trial_number: int) -> Path:
        """Default location: `<store>/checkpoints/<study>/trial-<n>.pt`."""
        return checkpoint_dir(study_name) / f"trial-{trial_number}.pt"

    def save(self, path: Path) -> Path:
        """Write atomically to `path` (parents created); returns `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(dataclasses.asdict(self), tmp)
        os.replace(tmp, path)  # a killed save never leaves a half-written checkpoint
        return path

    @classmethod
    def load(cls, path: Path) -> TrialCheckpoint:
        """Read a checkpoint on the CPU (`weights_only=True`: tensors and plain values only).

        Raises:
            RegistryError: the file is missing, unreadable or not a trial checkpoint.
        """
        if not path.is_file():
            raise RegistryError(
                f"{path}: checkpoint of the selected trial not found; re-run the trial "
                "(`sweep run` with a new study name) or restore the file"
            )
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            return cls(**record)
        except (OSError, RuntimeError, TypeError, ValueError, EOFError) as err:
            raise RegistryError(
                f"{path}: checkpoint cannot be read ({first_line(err)}); restore the file or re-run the study"
            ) from None


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (`hashlib.file_digest`, streamed)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve(recorded: str | None, study_name: str, trial_number: int) -> Path:
    """A trial's checkpoint file: the path it recorded when that file exists, else the default
    location (the recorded path may be relative to another working directory)."""
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    return TrialCheckpoint.path_for(study_name, trial_number)


def remove(paths: Iterable[Path]) -> list[Path]:
    """Delete the given checkpoint files that exist; returns those deleted."""
    deleted = []
    for path in paths:
        if path.is_file():
            path.unlink()
            deleted.append(path)
    return deleted
