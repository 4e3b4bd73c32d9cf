"""A trial's per-epoch record in Optuna: one short user attr per epoch.

The objective writes each finished epoch as the trial user attr `epoch_<kk>` (the 0-based step,
two digits so the attrs sort in epoch order): the epoch's figures rounded to what they carry,
e.g. `{"train_loss": 0.3361, "train_acc": 0.9016, "val_loss": 0.184732, "val_acc": 0.934211,
"lr": 0.001, "seconds": 12.4}` (accuracies as fractions 0-1; `lr` is the rate that epoch trained
with, after the schedule; `seconds` its wall time). One attr per epoch keeps each line under 125
characters however many epochs a trial runs, so optuna-dashboard's trial page, which prints each
attr on one line, fits a 1600 px screen (one list of every epoch made it 8,000 px wide), and each
epoch is written once instead of the whole list again after every epoch.

Readers use `epoch_history`, which also reads the single `history` list of dicts that studies run
before this format hold, so the report works on both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from pipeline.training import EpochResult

LEGACY_ATTR = "history"  # one list of `dataclasses.asdict(EpochResult)` per epoch (older studies)
_EPOCH_KEY = re.compile(r"^epoch_(\d+)$")
# Significant digits kept: val figures rank trials in the report, so they keep enough to tell any two
# accuracies on up to 100,000 images apart; the rest are for reading.
_DIGITS = {"val_accuracy": 6, "val_loss": 6, "train_loss": 4, "train_accuracy": 4, "lr": 4, "seconds": 3}
_SHORT = {"train_accuracy": "train_acc", "val_accuracy": "val_acc"}  # field -> key in the attr
_FIELD = {short: field for field, short in _SHORT.items()}


def epoch_attr(result: EpochResult) -> tuple[str, dict[str, float]]:
    """(user attr key, value) recording one epoch: `epoch_<kk>` and its rounded figures."""
    figures = {k: v for k, v in dataclasses.asdict(result).items() if k != "epoch"}
    return f"epoch_{result.epoch:02d}", {_SHORT.get(k, k): float(f"{v:.{_DIGITS[k]}g}") for k, v in figures.items()}


def epoch_history(user_attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A trial's epochs in order, each as `dataclasses.asdict(EpochResult)`: `epoch` (0-based),
    `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy` (fractions 0-1, losses in nats per
    image), `lr` (the epoch's scheduled rate) and `seconds` (wall time of the epoch).

    Reads the `epoch_<kk>` attrs, else the older single `history` list; attrs reset to None (a
    retried trial's inherited epochs, see `stale_keys`) are skipped. Empty when no epoch ran.
    """
    epochs = [
        {"epoch": int(match.group(1)), **{str(_FIELD.get(k, k)): v for k, v in value.items()}}
        for key, value in user_attrs.items()
        if (match := _EPOCH_KEY.match(key)) and isinstance(value, dict)
    ]
    if epochs:
        return sorted(epochs, key=lambda h: h["epoch"])
    return list(user_attrs.get(LEGACY_ATTR) or [])


def stale_keys(user_attrs: Mapping[str, Any]) -> list[str]:
    """Keys of per-epoch attrs (either format) present in `user_attrs` with a value: what a
    retried trial inherits from the failed one and must reset before its own epochs."""
    return [k for k, v in user_attrs.items() if v is not None and (k == LEGACY_ATTR or _EPOCH_KEY.match(k))]
