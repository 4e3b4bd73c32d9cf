"""Wall time of one tiny study with 1 worker and with N workers (`sweep run --workers N`) on this machine.

The same study both times: generated 32 px images (2 classes), ResNet-18 from scratch, `--epochs`
epochs, `--trials` trials, random sampler, no pruner, on a journal storage and an embedded MLflow
store of its own per run (`SWEEP_HOME`), without the report. Each run is the real CLI in a
subprocess, so the wall time includes every worker's start-up (imports, pre-flight), which is what a
user waits for. Writes `reports/bench/workers.json` (and prints it). A measurement, not a test.

    PYTHONPATH=. python benchmarks/bench_workers.py            # 1 vs 3 workers, 12 trials x 3 epochs
    PYTHONPATH=. python benchmarks/bench_workers.py --workers 2 --trials 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"ants": (200, 40, 40), "bees": (40, 40, 200)}


def make_images(root: Path, per_class: dict[str, int], size: int = 32) -> Path:
    """root/<split>/<class>/img_<i>.png: the class colour plus seeded noise."""
    for s_index, (split, n) in enumerate(per_class.items()):
        for c_index, (cls, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                rng = np.random.default_rng(1000 * s_index + 100 * c_index + i)
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                path = root / split / cls / f"img_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


def study_file(folder: Path, images: Path, trials: int, epochs: int) -> Path:
    tree = {
        "study": {
            "name": "bench",
            "n_trials": trials,
            "sampler": {"type": "random", "seed": 0},
            "pruner": {"type": "none"},
        },
        "data": {"root": str(images), "image_size": 32, "batch_size": 8, "num_workers": 0, "seed": 0},
        "model": {"arch": "resnet18", "weights": "none"},
        "training": {"epochs": epochs, "lr": 0.01},
        "search_space": {
            "lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
            "freeze_depth": {"type": "int", "low": 0, "high": 2},
        },
        "registry": {"model_name": "bench-classifier", "alias": "champion"},
        # The search alone: the probe would be fitted once by whichever worker starts first, and
        # the re-runs add a fixed tail; both would blur the 1-vs-N comparison of the trials.
        "selection": {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run(workers: int, study: Path, home: Path) -> dict:
    """One `sweep run` of the study with `workers` workers; its wall time and the trials' states."""
    journal = home / "optuna.journal"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(study),
        "--no-report",
        "--quiet",
        "--storage",
        f"journal:///{journal}",
    ]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "SWEEP_HOME": str(home), "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials()
    return {
        "workers": workers,
        "seconds": round(seconds, 1),
        "trials": len(trials),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "trial_seconds_sum": round(sum(t.user_attrs.get("seconds", 0.0) for t in trials), 1),
        "processes": len({t.user_attrs.get("pid") for t in trials}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="workers of the parallel run")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "workers.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        base = Path(tmp)
        images = make_images(base / "images", {"train": 16, "val": 12})
        study = study_file(base, images, args.trials, args.epochs)
        runs = [run(n, study, base / f"home-{n}") for n in (1, args.workers)]
    result = {
        "study": {
            "trials": args.trials,
            "epochs": args.epochs,
            "arch": "resnet18",
            "image_size": 32,
            "images": {"train": 32, "val": 12, "test": 12},
        },
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_1m": os.getloadavg()[0],
            "python": platform.python_version(),
            "processor": platform.machine(),
        },
        "runs": runs,
        "speedup": round(runs[0]["seconds"] / runs[1]["seconds"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
