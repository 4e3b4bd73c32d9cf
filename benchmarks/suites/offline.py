"""The shipped offline study (`studies/hymenoptera_offline.yaml`) end to end, with the fast paths
off ("before": `cache.decoded_images: false`, `cache.frozen_features: false`, the plain path every
epoch took before them) and on ("after"): wall time, best val accuracy, trial states, and the
registered champion's accuracy on the sealed test split as the report stage stored it (the test
is evaluated once per study, for the champion only).

Each side is one `sweep run` (search, baselines, re-runs, report, registry) in a process and
stores of its own. Sizes: smoke and default shrink the budget with `--set` (say so when quoting);
full is the shipped file as is (about an hour per side on 2 cores: `make bench SUITE=offline SIZE=full`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import common as C

STUDY = C.ROOT / "studies" / "hymenoptera_offline.yaml"
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"set": ["study.n_trials=1", "training.epochs=1", "data.image_size=32", "selection.reruns=0"]},
    "default": {"set": ["study.n_trials=4", "training.epochs=3", "data.image_size=128"]},
    "full": {"set": []},
}
OFF = ["cache.decoded_images=false", "cache.frozen_features=false"]
TARGETS = {
    "wall_after_vs_before": ("<=", 0.6),
    "test_after_minus_before": (">=", -0.02),  # the fast paths must not cost test accuracy
}
KEYS = ("ratios", "before", "after")


def champion_test(store: C.Store, study_name: str) -> dict[str, Any]:
    """The one sealed-test evaluation the report stage stored in the study: trial, accuracy, images."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=store.storage)
    stored = [v for k, v in study.user_attrs.items() if k.startswith("sweep_test_eval:")]
    if len(stored) != 1:
        raise C.BenchError(f"study {study_name} holds {len(stored)} test evaluations, expected 1")
    return {k: stored[0][k] for k in ("trial_number", "accuracy", "n_images")}


def side(name: str, sets: list[str], work: Path) -> dict[str, Any]:
    import yaml

    store = C.Store(work / name)
    study_name = f"bench-offline-{name}"
    extra = [
        a
        for s in [*sets, f"study.name={study_name}", f"data.root={C.DATA}", f"model.weights={C.WEIGHTS}"]
        for a in ("--set", s)
    ]
    child = C.sweep("run", STUDY, store, *extra)
    trials = C.trials(store, study_name)
    direction = yaml.safe_load(STUDY.read_text())["study"]["direction"]
    values = [t.value for t in trials if t.value is not None]
    return {
        "wall_seconds": child.wall_seconds,
        "peak_rss_bytes": child.peak_rss_bytes,
        "best_value": max(values) if direction == "maximize" else min(values),
        "states": [t.state.name for t in trials],
        "champion_test": champion_test(store, study_name),
        "disk_bytes": store.disk_bytes(),
    }


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    before, after = side("before", [*s["set"], *OFF], work), side("after", s["set"], work)
    values = {
        "wall_after_vs_before": after["wall_seconds"] / before["wall_seconds"],
        "test_after_minus_before": after["champion_test"]["accuracy"] - before["champion_test"]["accuracy"],
    }
    return {"ratios": C.ratios_with_targets(values, TARGETS), "before": before, "after": after}
