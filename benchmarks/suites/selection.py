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
The rows and a summary per variant go to `reports/bench/selection.json`.

Sizes (budgets reduced so the grid runs on a 2-core CPU; the shipped file is 12 trials x 6 epochs at
224 px, say so when quoting numbers): default one split, 6 trials x 3 epochs at 128 px; full both
splits at 160 px (`make bench SUITE=selection SIZE=full`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

REPO = C.ROOT
SIZES = {
    "smoke": {"splits": [0], "n_trials": 1, "epochs": 1, "image_size": 32, "top_k": 2, "reruns": 1, "num_workers": 0},
    "default": {
        "splits": [0],
        "n_trials": 6,
        "epochs": 3,
        "image_size": 128,
        "top_k": 3,
        "reruns": 2,
        "num_workers": 0,
    },
    "full": {
        "splits": [0, 1],
        "n_trials": 6,
        "epochs": 3,
        "image_size": 160,
        "top_k": 3,
        "reruns": 2,
        "num_workers": 0,
    },
}
TARGETS = {
    "refit_minus_today_test": (">=", 0.0),  # the shipped selection must not test worse than best-single-val
    "refit_gap": ("<=", 0.03),  # val -> test gap of the registered champion (fraction 0-1)
    "refit_wall_vs_today": ("report", None),
}
KEYS = ("ratios", "runs", "summary")

# Two studies per split. `today` is a study of its own; `baselines`, `reruns` and `refit` are read
# off one study run with baselines and re-runs (the product's order: search, then re-runs, then the
# report), because each adds a stage after the previous one's trials: its trials before the re-runs
# are the `baselines` variant's, exactly (trials are seeded per trial number).
TODAY = {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0, "refit": False}
FULL = {"baselines": {"linear_probe": True, "seed_recipe": True}, "refit": False}
VARIANTS = ("today", "baselines", "reruns", "refit")


def _overrides(args: argparse.Namespace, split: int, name: str, sel: dict) -> list[str]:
    sets = [
        f"data.root={C.DATA}",
        f"model.weights={C.WEIGHTS}",
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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant on every split in `args.splits`; the rows and a summary per variant."""
    rows = [row for split in args.splits for row in run_split(args, split)]
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
    return {"runs": rows, "summary": summary}


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """The suite's entry for `benchmarks.run`: `measure` in a process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.suites.selection", json.dumps(s)]
    child = C.run_child(cmd, {**C.ENV, "SWEEP_HOME": str(work / "home")})
    result = json.loads(child.stdout.strip().splitlines()[-1])
    refit = result["summary"]["refit"]
    values = {
        "refit_minus_today_test": refit["mean_champion_test"] - result["summary"]["today"]["mean_champion_test"],
        "refit_gap": refit["mean_gap"],
        "refit_wall_vs_today": refit["wall_vs_today"],
    }
    return {"ratios": C.ratios_with_targets(values, TARGETS), **result}


if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    namespace = argparse.Namespace(study=str(REPO / "studies" / "hymenoptera_offline.yaml"), set=[], **settings)
    print(json.dumps(measure(namespace)))
