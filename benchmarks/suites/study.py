"""A whole search: `sweep run` with the median pruner against the same study unpruned, and against
the usual way (Optuna + optuna-integration's MLflowCallback around the tutorial loop,
`benchmarks/usual.py`, given the pruned study's trial parameters).

Each is one process with stores of its own. The searched parameters are the shipped offline
study's (lr, momentum, freeze depth, augmentation); no baselines and no re-runs, so the three
studies run the same number of trials. What is read back is what the product stored: trial states,
values, epochs run, epoch seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import common as C

SIZES = {
    "smoke": {"per_class": (4, 2, 2), "image_size": 32, "batch_size": 4, "num_workers": 0, "trials": 3, "epochs": 2},
    "default": {
        "per_class": (32, 16, 8),
        "image_size": 160,
        "batch_size": 16,
        "num_workers": 2,
        "trials": 8,
        "epochs": 4,
    },
}
SPACE = {
    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    "freeze_depth": {"type": "int", "low": 0, "high": 8},
    "aug_strength": {"type": "float", "low": 0.0, "high": 1.0},
}
TARGETS = {
    "sweep_pruned_vs_unpruned_wall": ("<=", 0.6),
    "sweep_pruned_minus_unpruned_best": (">=", -0.01),  # pruning must not cost the best trial
    "outside_epochs_share": ("report", None),  # start-up, pre-flight, tracking, checkpoints / wall
    "usual_vs_sweep_wall": ("report", None),  # > 1: sweep is faster than the usual script
}
KEYS = ("ratios", "studies")


def tree(s: dict[str, Any], data: Path, name: str, pruner: str) -> dict[str, Any]:
    pruning = {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1} if pruner == "median" else {"type": pruner}
    return {
        "study": {"name": name, "n_trials": s["trials"], "sampler": {"type": "tpe", "seed": 0}, "pruner": pruning},
        "data": C.slice_data(s, data),
        "model": C.EFFICIENTNET,
        "training": {"epochs": s["epochs"], "lr": 0.01, "momentum": 0.9},
        "search_space": SPACE,
        "selection": C.NO_SELECTION,
    }


def sweep_study(s: dict[str, Any], data: Path, work: Path, pruner: str) -> dict[str, Any]:
    """One `sweep run --no-report` of the study; what it stored, its wall time and peak RSS."""
    name = f"bench-{pruner}"
    store = C.Store(work / name)
    child = C.sweep("run", C.study_file(work, tree(s, data, name, pruner)), store, "--no-report")
    trials = C.trials(store, name)
    epochs = sum(sum(C.epoch_seconds(t)) for t in trials)
    return {
        "wall_seconds": child.wall_seconds,
        "peak_rss_bytes": child.peak_rss_bytes,
        "best_value": max(t.value for t in trials if t.value is not None),
        "states": [t.state.name for t in trials],
        "epochs_run": [len(C.epoch_seconds(t)) for t in trials],
        "epoch_seconds_sum": epochs,
        "params": [t.params for t in trials],
    }


def usual_study(s: dict[str, Any], data: Path, work: Path, params: list[dict[str, Any]]) -> dict[str, Any]:
    home = work / "usual"
    args = {
        "data_dir": str(data),
        "weights": str(C.WEIGHTS),
        "tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
        "params": params,
        "epochs": s["epochs"],
        "image_size": s["image_size"],
        "batch_size": s["batch_size"],
        "num_workers": s["num_workers"],
    }
    child = C.run_child(
        [sys.executable, "-m", "benchmarks.usual", json.dumps(args)], {**C.ENV, "SWEEP_HOME": str(home)}
    )
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "peak_rss_bytes": child.peak_rss_bytes}


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    data = C.make_slice(work / "slice", *s["per_class"])
    pruned, unpruned = (sweep_study(s, data, work, p) for p in ("median", "none"))
    usual = usual_study(s, data, work, pruned["params"])
    values = {
        "sweep_pruned_vs_unpruned_wall": pruned["wall_seconds"] / unpruned["wall_seconds"],
        "sweep_pruned_minus_unpruned_best": pruned["best_value"] - unpruned["best_value"],
        "outside_epochs_share": 1 - pruned["epoch_seconds_sum"] / pruned["wall_seconds"],
        "usual_vs_sweep_wall": usual["wall_seconds"] / pruned["wall_seconds"],
    }
    return {
        "ratios": C.ratios_with_targets(values, TARGETS),
        "studies": {"pruned": pruned, "unpruned": unpruned, "usual": usual},
    }
