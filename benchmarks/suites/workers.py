"""Many workers on one machine: the same tiny study with 1 worker and with N (`sweep run
--workers N`) on a journal storage, each run in stores of its own, wall time of the real CLI
(every worker's start-up included: what a user waits for).

Generated 32 px images (two colours plus seeded noise), ResNet-18 from scratch, random sampler, no
pruner, no baselines (the probe would be fitted once by whichever worker starts first) and no
report: the comparison is of the trials alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import common as C

SIZES = {
    "smoke": {"workers": 2, "trials": 2, "epochs": 1, "per_class": (8, 4)},
    "default": {"workers": 3, "trials": 12, "epochs": 3, "per_class": (16, 12)},
}
TARGETS = {"speedup": ("report", None)}  # 1-worker wall / N-worker wall; bounded by the cores usable
KEYS = ("ratios", "runs")
COLOURS = {"ants": (200, 40, 40), "bees": (40, 40, 200)}


def make_images(root: Path, per_split: dict[str, int], size: int = 32) -> Path:
    """root/<split>/<class>/img_<i>.png: the class colour plus seeded noise."""
    for s_index, (split, n) in enumerate(per_split.items()):
        for c_index, (cls, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                rng = np.random.default_rng(1000 * s_index + 100 * c_index + i)
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                path = root / split / cls / f"img_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


def tree(s: dict[str, Any], images: Path) -> dict[str, Any]:
    return {
        "study": {
            "name": "bench-workers",
            "n_trials": s["trials"],
            "sampler": {"type": "random", "seed": 0},
            "pruner": {"type": "none"},
        },
        "data": {"root": str(images), "image_size": 32, "batch_size": 8, "num_workers": 0, "seed": 0},
        "model": {"arch": "resnet18", "weights": "none"},
        "training": {"epochs": s["epochs"], "lr": 0.01},
        "search_space": {
            "lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
            "freeze_depth": {"type": "int", "low": 0, "high": 2},
        },
        "selection": C.NO_SELECTION,
    }


def one(study: Path, work: Path, workers: int) -> dict[str, Any]:
    store = C.Store(work / f"workers-{workers}", journal=True)
    extra = ["--no-report"] + (["--workers", str(workers)] if workers > 1 else [])
    child = C.sweep("run", study, store, *extra)
    trials = C.trials(store, "bench-workers")
    return {
        "workers": workers,
        "seconds": round(child.wall_seconds, 1),
        "trials": len(trials),
        "complete": sum(t.state.name == "COMPLETE" for t in trials),
        "trial_seconds_sum": round(sum(t.user_attrs.get("seconds", 0.0) for t in trials), 1),
        "processes": len({t.user_attrs.get("pid") for t in trials}),
    }


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    train, val = s["per_class"]
    study = C.study_file(work, tree(s, make_images(work / "images", {"train": train, "val": val})))
    runs = [one(study, work, n) for n in (1, s["workers"])]
    return {
        "ratios": C.ratios_with_targets({"speedup": runs[0]["seconds"] / runs[1]["seconds"]}, TARGETS),
        "runs": runs,
    }
