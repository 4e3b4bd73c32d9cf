"""The walk of one study through the code: which of `pipeline`'s modules a tiny `sweep run` +
`sweep report` enters, and the moves between them (caller module -> callee module), counted from
the calls themselves (`sys.setprofile` in every thread).

    PYTHONPATH=. python scripts/trial_walk.py [--out reports/walk.json]

A tiny generated study (2 classes of 32 px images, ResNet-18 from scratch, 2 trials x 1 epoch with
the shipped selection: linear probe, seed recipe, re-runs and refit) from the study file to the
registered model. A move "back up a layer" is a call from a module into one of a higher layer of
the checkout's import-linter `layers` contract (callbacks and observers make them). Runs on any
checkout of this project that has `stages.run_study` or the older flat `study_run.run_study`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def layer_ranks() -> dict[str, int]:
    """Top-level part of a `pipeline` module -> index in the first layers contract (0 = top)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c["layers"] for c in tool["contracts"] if c["type"] == "layers")
    return {name.strip(): i for i, line in enumerate(layers) for name in line.split("|")}


def make_study(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 8)):
        for label, colour in (("ants", (200, 40, 40)), ("bees", (40, 40, 200))):
            for i in range(n):
                path = root / "images" / split / label / f"img_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path)
    tree = {
        "study": {"name": "walk", "n_trials": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
        "data": {"root": str(root / "images"), "image_size": 32, "batch_size": 8, "num_workers": 0, "seed": 0},
        "model": {"arch": "resnet18", "weights": "none"},
        "training": {"epochs": 1, "lr": 0.01},
        "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}},
        "registry": {"model_name": "walk-classifier", "alias": "champion"},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def stage_functions():  # type: ignore[no-untyped-def]
    try:
        from pipeline.config import load_study
        from pipeline.stages import run_report, run_study
    except ImportError:  # the flat layout
        from pipeline.config import load_study  # type: ignore[no-redef]
        from pipeline.report import run_report  # type: ignore[no-redef]
        from pipeline.study_run import run_study  # type: ignore[no-redef]
    return load_study, run_study, run_report


def walk(study: Path) -> tuple[Counter[tuple[str, str]], set[str]]:
    load_study, run_study, run_report = stage_functions()
    moves: Counter[tuple[str, str]] = Counter()
    entered: set[str] = set()

    def profile(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("pipeline."):
            return
        entered.add(callee)
        caller_frame = frame.f_back
        caller = caller_frame.f_globals.get("__name__", "") if caller_frame is not None else ""
        if caller.startswith("pipeline.") and caller != callee:
            moves[(caller, callee)] += 1

    cfg = load_study(study)
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run_study(cfg)
        run_report(cfg, out=study.parent / "report")
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return moves, entered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ranks = layer_ranks()
    total = len([p for p in (REPO / "pipeline").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SWEEP_HOME"] = str(Path(tmp) / "mlruns")
        moves, entered = walk(make_study(Path(tmp)))

    def rank(module: str) -> int:
        return ranks.get(module.split(".")[1], len(ranks))

    entered = {m for m in entered if not m.endswith("__init__") and m.count(".") >= 1}
    up = [(a, b) for a, b in moves if rank(b) < rank(a)]
    result = {
        "modules_in_package": total,
        "modules_entered": len(entered),
        "moves": len(moves),
        "moves_up_a_layer": len(up),
        "calls_across_modules": sum(moves.values()),
        "up": sorted(f"{a} -> {b}" for a, b in up),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
