"""Selection variants on the offline study: champion val, champion test, probe test, wall time.

For each split (data.seed 0 = the shipped carve of val into val/test halves, and data.seed 1 =
a second, different carve) and each variant:
- `today`: no baselines, no re-runs, no refit (the selection before issue 8);
- `baselines`: + the linear probe and the seed recipe as candidates;
- `reruns`: + the top `--top-k` candidates re-run with `--reruns` further seeds, best mean wins;
- `refit`: + the champion refitted on train + val before the one test evaluation.
`today` is a study of its own; the other three are read off one study with baselines and re-runs,
each variant adding a stage after the previous one's trials (trials are seeded per trial number, so
that study's trials before the re-runs are the `baselines` study's): `baselines` = the best single
val among the non-re-run trials, wall time without the re-runs' trial seconds; `reruns` = that
study's report (champion by mean), whole wall time; `refit` = its champion refitted, plus the refit
and test time. Wall times are the whole product path (`sweep run` + `sweep report` in process),
each study in a store of its own (no cache carried over from the other study).
`probe_test` is the study's linear-probe trial (fitted on train alone) on that split's test half.
Testing non-champions is a measurement made here only; the product tests the champion once.
Prints one JSON line per variant and a summary; `--out` writes JSON.

The budget is reduced so the whole grid runs on a 2-core CPU in reasonable time: by default 6
trials x 3 epochs at 160 px (the shipped file: 12 x 6 at 224 px). Say so when quoting numbers.

    PYTHONPATH=. python benchmarks/bench_selection.py --out bench_selection.json
    PYTHONPATH=. python benchmarks/bench_selection.py --splits 0 --n-trials 2 --epochs 1 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(
    os.environ.get("SWEEP_SHARED")
    or next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared")
)

# Two studies per split. `today` is a study of its own; `baselines`, `reruns` and `refit` are read
# off one study run with baselines and re-runs (the product's order: search, then re-runs, then the
# report), because each adds a stage after the previous one's trials: its trials before the re-runs
# are the `baselines` variant's, exactly (trials are seeded per trial number).
TODAY = {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0, "refit": False}
FULL = {"baselines": {"linear_probe": True, "seed_recipe": True}, "refit": False}
VARIANTS = ("today", "baselines", "reruns", "refit")


def _overrides(args: argparse.Namespace, split: int, name: str, sel: dict) -> list[str]:
    sets = [
        f"data.root={SHARED / 'data' / 'hymenoptera_data'}",
        f"model.weights={SHARED / 'weights' / 'efficientnet_lite0_imagenet.pth'}",
        f"data.image_size={args.image_size}",
        f"data.seed={split}",
        f"data.num_workers={args.num_workers}",
        f"study.n_trials={args.n_trials}",
        f"training.epochs={args.epochs}",
        f"study.name=bench-{name}-split{split}",
        f"selection.baselines.linear_probe={str(sel['baselines']['linear_probe']).lower()}",
        f"selection.baselines.seed_recipe={str(sel['baselines']['seed_recipe']).lower()}",
        f"selection.reruns={sel.get('reruns', args.reruns)}",
        f"selection.top_k={args.top_k}",
        f"selection.refit={str(sel['refit']).lower()}",
        "registry.keep_top_k=1000",  # keep every checkpoint: variants read off one study test theirs
    ]
    return sets + args.set


def _test(cfg, trial) -> float:
    """Accuracy (fraction 0-1) of `trial`'s checkpoint on the split's test half: a measurement of
    this benchmark, outside the product (which tests the champion only)."""
    from pipeline.champion._comparison import checkpoint_path
    from pipeline.champion._evaluation import evaluate_on_test
    from pipeline.models import TrialCheckpoint, sha256

    path = checkpoint_path(trial, cfg.study.name)
    return evaluate_on_test(cfg, TrialCheckpoint.load(path), sha256(path)).accuracy


def _seconds(trials) -> float:
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete)


def run_split(args: argparse.Namespace, split: int) -> list[dict]:
    """The four variants on one split (see the module doc); one dict per variant."""
    from pipeline.champion import _champion as champion
    from pipeline.champion._evaluation import evaluate_on_test
    from pipeline.config import load_study
    from pipeline.search import BASELINE_ATTR, candidate_table, choose_champion
    from pipeline.search._selection import is_rerun
    from pipeline.stages import run_report, run_study

    rows = []
    with tempfile.TemporaryDirectory() as home:
        # A store of its own per study: the second must not find the first's decoded-image cache.
        os.environ["SWEEP_HOME"] = str(Path(home) / "today")
        cfg = load_study(args.study, _overrides(args, split, "today", TODAY))
        start = time.perf_counter()
        run_study(cfg)
        report = run_report(cfg, out=Path(home) / "report-today")
        rows.append(
            {
                "variant": "today",
                "champion": report.selected_trial,
                "kind": "trial",
                "val": report.val_value,
                "test": report.test.accuracy,
                "wall_seconds": time.perf_counter() - start,
            }
        )
        os.environ["SWEEP_HOME"] = str(Path(home) / "full")
        cfg = load_study(args.study, _overrides(args, split, "full", FULL))
        start = time.perf_counter()
        study = run_study(cfg).study
        report = run_report(cfg, out=Path(home) / "report-full")  # selection.refit false: the `reruns` variant
        wall = time.perf_counter() - start
        trials = study.get_trials(deepcopy=False)
        reruns = [t for t in trials if is_rerun(t)]
        originals = [t for t in trials if not is_rerun(t)]
        table = candidate_table(originals, args.top_k, cfg.study.direction)
        best = next(t for t in trials if t.number == choose_champion(table, cfg.study.direction))
        probe = next(t for t in trials if t.user_attrs.get(BASELINE_ATTR) == "linear_probe")
        probe_test = _test(cfg, probe)
        rows.append(
            {
                "variant": "baselines",
                "champion": best.number,
                "kind": best.user_attrs.get(BASELINE_ATTR) or "trial",
                "val": best.value,
                "test": _test(cfg, best),
                "wall_seconds": wall - _seconds(reruns),
            }
        )
        choice = champion.choose(trials, cfg)
        kind = choice.selected.user_attrs.get(BASELINE_ATTR) or "trial"
        rows.append(
            {
                "variant": "reruns",
                "champion": report.selected_trial,
                "kind": kind,
                "val": choice.val,
                "test": report.test.accuracy,
                "wall_seconds": wall,
            }
        )
        refit_cfg = load_study(args.study, [*_overrides(args, split, "full", FULL), "selection.refit=true"])
        start = time.perf_counter()
        checkpoint, _, sha, _ = champion.tested_model(study, refit_cfg, choice)
        refit_test = evaluate_on_test(refit_cfg, checkpoint, sha).accuracy
        rows.append(
            {
                "variant": "refit",
                "champion": report.selected_trial,
                "kind": kind,
                "val": choice.val,
                "test": refit_test,
                "wall_seconds": wall + time.perf_counter() - start,
            }
        )
        counts = {"trials": len(trials), "reruns": len(reruns), "probe_val": probe.value}
    return [{"split": split, **row, "probe_test": probe_test, **counts} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "hymenoptera_offline.yaml"))
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 1], help="data.seed values")
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--reruns", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    rows = []
    for split in args.splits:
        for row in run_split(args, split):
            print(json.dumps(row), flush=True)
            rows.append(row)
    budget = {
        "n_trials": args.n_trials,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "top_k": args.top_k,
        "reruns": args.reruns,
    }
    summary = {}
    today_wall = sum(r["wall_seconds"] for r in rows if r["variant"] == "today")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {
            "mean_champion_test": sum(r["test"] for r in mine) / len(mine),
            "mean_gap": sum(r["val"] - r["test"] for r in mine) / len(mine),
            "beats_probe_on_all_splits": all(r["test"] >= r["probe_test"] for r in mine),
            "wall_vs_today": sum(r["wall_seconds"] for r in mine) / max(today_wall, 1e-9),
        }
    result = {"budget": budget, "runs": rows, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
