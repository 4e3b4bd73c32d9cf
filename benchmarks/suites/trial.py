"""One trial's epoch, sweep's fast paths against the PyTorch tutorial's loop, side by side.

sweep: one `sweep run` of a grid study over freeze depth {0, 8} x augmentation {0, 1} (4 trials,
no pruner, no baselines, no report); each trial's epoch seconds are read from the history it
stored. Tutorial: `benchmarks/bare.py` fine-tuning everything, and its fixed-feature-extractor
recipe, each in its own process. Same images (a fixed hymenoptera slice), model (timm
EfficientNet-Lite0, offline weights), batch size, epochs and torch threads. Epoch time is the
fastest epoch after epoch 0 (which fills caches and starts workers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import common as C

SIZES = {
    "smoke": {"per_class": (4, 2, 2), "image_size": 32, "batch_size": 4, "num_workers": 0, "epochs": 2},
    "default": {"per_class": (32, 16, 8), "image_size": 160, "batch_size": 16, "num_workers": 2, "epochs": 3},
}
TARGETS = {
    "throughput_depth0_vs_bare": (">=", 0.95),  # sweep's full fine-tuning no slower than the tutorial's
    "epoch_frozen_vs_bare": ("<=", 0.35),  # head-only with augmentation: frozen stages run once per image
    "epoch_frozen_aug0_vs_bare": ("<=", 0.05),  # head-only on cached features: the head alone
    "peak_rss_vs_bare": ("<=", 1.5),
}
KEYS = ("ratios", "epoch_seconds", "best_val_accuracy", "peak_rss_bytes", "sweep_wall_seconds")


def grid_study(s: dict[str, Any], data: Path) -> dict[str, Any]:
    """The study file: the four fast-path settings as a grid, every other knob fixed."""
    return {
        "study": {
            "name": "bench-trial",
            "n_trials": 4,
            "sampler": {"type": "grid", "seed": 0},
            "pruner": {"type": "none"},
        },
        "data": C.slice_data(s, data),
        "model": C.EFFICIENTNET,
        "training": {"epochs": s["epochs"], "lr": 0.01, "momentum": 0.9},
        "search_space": {
            "freeze_depth": {"type": "categorical", "choices": [0, 8]},
            "aug_strength": {"type": "categorical", "choices": [0.0, 1.0]},
        },
        "selection": C.NO_SELECTION,
    }


def bare(s: dict[str, Any], data: Path, fixed: bool, home: Path) -> dict[str, Any]:
    """The tutorial loop in a child process: its epoch seconds, best val accuracy, peak RSS."""
    kwargs = {
        "data_dir": str(data),
        "weights": str(C.WEIGHTS),
        "fixed": fixed,
        "epochs": s["epochs"],
        "lr": 0.01,
        "momentum": 0.9,
        "batch_size": s["batch_size"],
        "num_workers": s["num_workers"],
        "crop": s["image_size"],
        "resize": round(s["image_size"] / 0.875),
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    env = {**C.ENV, "SWEEP_HOME": str(home)}
    child = C.run_child([sys.executable, "-m", "benchmarks.bare", json.dumps(kwargs)], env)
    return {**json.loads(child.stdout.strip().splitlines()[-1]), "peak_rss_bytes": child.peak_rss_bytes}


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Measure both sides (module docstring); the ratios against TARGETS."""
    data = C.make_slice(work / "slice", *s["per_class"])
    store = C.Store(work / "sweep")
    study = C.study_file(work, grid_study(s, data))
    child = C.sweep("run", study, store, "--no-report")
    by_setting = {
        f"depth{t.params['freeze_depth']}_aug{t.params['aug_strength']:g}": t for t in C.trials(store, "bench-trial")
    }
    seconds = {k: C.epoch_seconds(t) for k, t in by_setting.items()}
    tutorial = {
        name: bare(s, data, fixed, work / name) for name, fixed in (("bare_finetune", False), ("bare_fixed", True))
    }
    seconds |= {k: v["epoch_seconds"] for k, v in tutorial.items()}
    fastest = {k: C.after_first(v) for k, v in seconds.items()}
    values = {
        "throughput_depth0_vs_bare": fastest["bare_finetune"] / fastest["depth0_aug1"],
        "epoch_frozen_vs_bare": fastest["depth8_aug1"] / fastest["bare_fixed"],
        "epoch_frozen_aug0_vs_bare": fastest["depth8_aug0"] / fastest["bare_fixed"],
        "peak_rss_vs_bare": child.peak_rss_bytes / tutorial["bare_finetune"]["peak_rss_bytes"],
    }
    best = {k: t.value for k, t in by_setting.items()} | {k: v["best_val_accuracy"] for k, v in tutorial.items()}
    return {
        "ratios": C.ratios_with_targets(values, TARGETS),
        "epoch_seconds": seconds,
        "best_val_accuracy": best,
        "peak_rss_bytes": {"sweep_run": child.peak_rss_bytes} | {k: v["peak_rss_bytes"] for k, v in tutorial.items()},
        "sweep_wall_seconds": child.wall_seconds,
        "method": "peak_rss_vs_bare: the whole `sweep run` process (four trials, MLflow, Optuna) over the "
        "tutorial's fine-tuning process; epochs: fastest after epoch 0, train + val",
    }
