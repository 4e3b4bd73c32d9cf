"""A trial's per-epoch record in Optuna: one short user attr per epoch.

The objective writes each finished epoch as the trial user attr `epoch_<k>` (k = the 0-based step):
the epoch's MLflow metrics (`EpochResult.metrics()` names) rounded to what the figures carry, e.g.
`{"train_loss": 0.3361, "train_accuracy": 0.9016, "val_loss": 0.184732, "val_accuracy": 0.934211,
"epoch_lr": 0.001, "epoch_seconds": 12.4}`. One attr per epoch keeps every attr about 130
characters however many epochs a trial runs, so optuna-dashboard's trial page, which prints each
attr on one line, stays readable (a single list of every epoch made it 8,000 px wide), and each
epoch is written once instead of the whole list again after every epoch.

Readers use `epoch_history`, which also reads the single `history` list of dicts that studies run
before this format hold, so the report works on both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from pipeline.train import EpochResult

LEGACY_ATTR = "history"  # one list of `dataclasses.asdict(EpochResult)` per epoch (older studies)
_EPOCH_KEY = re.compile(r"^epoch_(\d+)$")
# Significant digits kept per metric: val figures choose and rank trials, so they keep enough digits
# to tell apart any two accuracies on up to 100,000 images; the rest are for reading.
_DIGITS = {"val_accuracy": 6, "val_loss": 6, "train_loss": 4, "train_accuracy": 4, "epoch_lr": 4, "epoch_seconds": 3}


def epoch_attr(result: EpochResult) -> tuple[str, dict[str, float]]:
    """(user attr key, value) recording one epoch: `epoch_<k>` and its rounded metrics."""
    metrics = result.metrics()
    return f"epoch_{result.epoch}", {k: float(f"{v:.{_DIGITS.get(k, 6)}g}") for k, v in metrics.items()}


def epoch_history(user_attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A trial's epochs in order, each as `dataclasses.asdict(EpochResult)`: `epoch` (0-based),
    `train_loss`, `train_accuracy`, `val_loss`, `val_accuracy` (fractions 0-1, losses in nats per
    image), `lr` (the epoch's scheduled rate) and `seconds` (wall time of the epoch).

    Reads the `epoch_<k>` attrs, else the older single `history` list; attrs reset to None (a
    retried trial's inherited epochs, see `stale_keys`) are skipped. Empty when no epoch ran.
    """
    epochs = []
    for key, value in user_attrs.items():
        match = _EPOCH_KEY.match(key)
        if match and isinstance(value, dict):
            epochs.append(dataclasses.asdict(EpochResult.from_metrics(int(match.group(1)), value)))
    if epochs:
        return sorted(epochs, key=lambda h: h["epoch"])
    return list(user_attrs.get(LEGACY_ATTR) or [])


def stale_keys(user_attrs: Mapping[str, Any]) -> list[str]:
    """Keys of per-epoch attrs (either format) present in `user_attrs` with a value: what a
    retried trial inherits from the failed one and must reset before its own epochs."""
    return [k for k, v in user_attrs.items() if v is not None and (k == LEGACY_ATTR or _EPOCH_KEY.match(k))]
