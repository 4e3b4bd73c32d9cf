"""The offline study with the fast paths off ("before") and on ("after"): wall time, best val
accuracy, and the best trial's accuracy on the sealed test split (evaluated once per study).

    python benchmarks/offline_study.py [--study studies/hymenoptera_offline.yaml]
        [--out reports/bench/offline_study.json] [--set KEY.PATH=VALUE ...]

Both studies run through the same driver as `make bench` (benchmarks/bench.py: Optuna RDB
storage, MLflow runs, checkpoints, `fit_config` per trial), one after the other, each in its own
process and store folder; "before" sets `cache.decoded_images: false` and
`cache.frozen_features: false`, which is the plain path every epoch took before the fast paths.
Long: the whole study twice (about an hour on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OFF = ["cache.decoded_images=false", "cache.frozen_features=false"]


def test_accuracy(cfg, prep, checkpoint: Path) -> float:
    """Accuracy (fraction 0-1) of a trial checkpoint on the test split, eval transform."""
    import torch

    from pipeline.data import _splits as D
    from pipeline.data import _transforms as TX
    from pipeline.models import TrialCheckpoint
    from pipeline.models import _model as M
    from pipeline.training import evaluate, pick_device

    saved = TrialCheckpoint.load(checkpoint)
    model, _ = M.build_model(prep.spec, len(prep.splits.class_to_idx), prep.state)
    model.load_state_dict(saved.state_dict)
    loader = D.make_loader(
        prep.splits.root, prep.splits.test, TX.eval_transform(prep.preprocess), cfg.data.batch_size, 0, shuffle=False
    )
    return evaluate(model, loader, torch.nn.CrossEntropyLoss(), pick_device(cfg.training.device)).accuracy


def child(study: Path, overrides: list[str]) -> dict:
    from benchmarks.bench import run_study
    from pipeline.config import load_study
    from pipeline.models import TrialCheckpoint
    from pipeline.training import _preflight as preflight
    from pipeline.training._machine import configure_threads

    configure_threads()
    cfg = load_study(study, overrides)
    result = run_study(cfg)
    prep = preflight.prepare(cfg, warn=lambda _: None)
    path = TrialCheckpoint.path_for(cfg.study.name, result["best_trial"])
    result["test_accuracy"] = test_accuracy(cfg, prep, path)
    result["test_images"] = len(prep.splits.test)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "hymenoptera_offline.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "offline_study.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", choices=["before", "after"], help="run one of the two studies")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.study, args.overrides)))
        return
    report = {}
    for name, extra in (("before", OFF), ("after", [])):
        if args.only and name != args.only:
            continue
        home = args.out.parent / "offline_home" / name
        env = {
            **os.environ,
            "SWEEP_HOME": str(home),
            "PYTHONPATH": str(ROOT),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
        sets = [a for s in [*args.overrides, *extra] for a in ("--set", s)]
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--study", str(args.study), *sets],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode != 0:
            sys.exit(f"offline study ({name}) failed:\n{done.stderr[-3000:]}")
        report[name] = json.loads(done.stdout.strip().splitlines()[-1])
        report[name]["process_seconds"] = time.perf_counter() - start
        r = report[name]
        print(
            f"{name:6}: wall {r['wall_seconds']:.0f} s, best val {r['best_value']:.3f}, "
            f"test {r['test_accuracy']:.3f} ({r['test_images']} images), states {r['states']}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if len(report) == 2:
        print(f"wall after / before: {report['after']['wall_seconds'] / report['before']['wall_seconds']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
