"""What the decoded-image cache costs augmentation: the same head-only trials (freeze depth 8,
augmentation strength 1) with crops taken from the cached augmentation sources (`cache.decoded_images:
true`, tensor transforms) and from each file decoded every epoch (false, PIL transforms).

Two `sweep run`s of one study whose search space holds one value per parameter, so its trials
differ only in their seed (a trial's seed is `data.seed + trial number`): best val accuracy per
seed and the fastest epoch of each side.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import common as C

SIZES = {
    "smoke": {"per_class": (4, 2, 2), "image_size": 32, "batch_size": 4, "num_workers": 0, "seeds": 2, "epochs": 2},
    "default": {
        "per_class": (32, 16, 8),
        "image_size": 160,
        "batch_size": 16,
        "num_workers": 2,
        "seeds": 3,
        "epochs": 5,
    },
}
TARGETS = {
    "mean_cached_minus_decoded": (">=", -0.02),  # the cache must not cost accuracy (2 points: noise here)
    "epoch_cached_vs_decoded": ("<=", 1.0),
}
KEYS = ("ratios", "best_val_accuracy", "epoch_seconds")


def tree(s: dict[str, Any], data: Path, decoded: bool) -> dict[str, Any]:
    return {
        "study": {
            "name": f"bench-aug-{'cached' if decoded else 'decoded'}",
            "n_trials": s["seeds"],
            "pruner": {"type": "none"},
        },
        "data": C.slice_data(s, data),
        "model": C.EFFICIENTNET,
        "training": {"epochs": s["epochs"], "lr": 0.01, "momentum": 0.9},
        "search_space": {
            "freeze_depth": {"type": "categorical", "choices": [8]},
            "aug_strength": {"type": "categorical", "choices": [1.0]},
        },
        "selection": C.NO_SELECTION,
        "cache": {"decoded_images": decoded},
    }


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    data = C.make_slice(work / "slice", *s["per_class"])
    best, epochs = {}, {}
    for side, decoded in (("cached", True), ("decoded", False)):
        t = tree(s, data, decoded)
        store = C.Store(work / side)
        C.sweep("run", C.study_file(work, t), store, "--no-report")
        trials = C.trials(store, t["study"]["name"])
        best[side] = [t.value for t in trials]
        epochs[side] = [C.after_first(C.epoch_seconds(t)) for t in trials]
    values = {
        "mean_cached_minus_decoded": statistics.mean(best["cached"]) - statistics.mean(best["decoded"]),
        "epoch_cached_vs_decoded": min(epochs["cached"]) / min(epochs["decoded"]),
    }
    return {"ratios": C.ratios_with_targets(values, TARGETS), "best_val_accuracy": best, "epoch_seconds": epochs}
