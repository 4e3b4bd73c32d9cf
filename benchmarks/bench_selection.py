"""Selection variants on the offline study: champion val, champion test, probe test, wall time.

For each split (data.seed 0 = the shipped carve of val into val/test halves, and data.seed 1 =
a second, different carve) and each variant:
- `today`: no baselines, no re-runs, no refit (the selection before issue 8);
- `baselines`: + the linear probe and the seed recipe as candidates;
- `reruns`: + the top `--top-k` candidates re-run with `--reruns` further seeds, best mean wins;
- `refit`: + the champion refitted on train + val before the one test evaluation.
Each variant is a fresh study in its own store (`sweep run` + `sweep report` in process), so the
wall time is the whole product path. `probe_test` is the linear probe fitted on train alone and
evaluated on that split's test half (a measurement made here, outside any study; the product
never tests a non-champion). Prints one JSON line per run and a summary; `--out` writes JSON.

The budget is reduced so the whole grid runs on a 2-core CPU in reasonable time: by default 6
trials x 3 epochs at 160 px (the shipped file: 12 x 6 at 224 px). Say so when quoting numbers.

    PYTHONPATH=. python benchmarks/bench_selection.py --out bench_selection.json
    PYTHONPATH=. python benchmarks/bench_selection.py --variants today --splits 0 --n-trials 1 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(
    os.environ.get("SWEEP_SHARED")
    or next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared")
)

VARIANTS = {
    "today": {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0, "refit": False},
    "baselines": {"baselines": {"linear_probe": True, "seed_recipe": True}, "reruns": 0, "refit": False},
    "reruns": {"baselines": {"linear_probe": True, "seed_recipe": True}, "refit": False},
    "refit": {"baselines": {"linear_probe": True, "seed_recipe": True}, "refit": True},
}


def _overrides(args: argparse.Namespace, split: int, variant: str) -> list[str]:
    sel = VARIANTS[variant]
    sets = [
        f"data.root={SHARED / 'data' / 'hymenoptera_data'}",
        f"model.weights={SHARED / 'weights' / 'efficientnet_lite0_imagenet.pth'}",
        f"data.image_size={args.image_size}",
        f"data.seed={split}",
        f"data.num_workers={args.num_workers}",
        f"study.n_trials={args.n_trials}",
        f"training.epochs={args.epochs}",
        f"study.name=bench-{variant}-split{split}",
        f"selection.baselines.linear_probe={str(sel['baselines']['linear_probe']).lower()}",
        f"selection.baselines.seed_recipe={str(sel['baselines']['seed_recipe']).lower()}",
        f"selection.reruns={sel.get('reruns', args.reruns)}",
        f"selection.top_k={args.top_k}",
        f"selection.refit={str(sel['refit']).lower()}",
    ]
    return sets + args.set


def probe_test(cfg) -> float:
    """The linear probe fitted on train, accuracy on the split's test half (fraction 0-1)."""
    from pipeline import data as D
    from pipeline import model as M
    from pipeline import probe as P
    from pipeline import transforms as TX
    from pipeline.preflight import prepare
    from pipeline.train import evaluate

    prep = prepare(cfg, warn=lambda line: None)
    k, d = len(prep.splits.class_to_idx), cfg.data
    model, _ = M.build_model(prep.spec, k, prep.state)
    train, val = P.probe_loaders(prep.splits, prep.preprocess, d.batch_size, d.num_workers)
    P.fit_linear_probe(model, train, val, torch.device("cpu"), d.seed, num_classes=k)
    test = D.make_loader(
        prep.splits.root,
        prep.splits.test,
        TX.eval_transform(prep.preprocess),
        d.batch_size,
        d.num_workers,
        shuffle=False,
    )
    return evaluate(model, test, torch.nn.CrossEntropyLoss(), torch.device("cpu")).accuracy


def run_one(args: argparse.Namespace, split: int, variant: str) -> dict:
    from pipeline.config import load_study
    from pipeline.report import run_report
    from pipeline.study_run import run_study

    cfg = load_study(args.study, _overrides(args, split, variant))
    with tempfile.TemporaryDirectory() as home:
        os.environ["SWEEP_HOME"] = str(Path(home) / "mlruns")
        start = time.perf_counter()
        outcome = run_study(cfg)
        report = run_report(cfg, out=Path(home) / "report")
        wall = time.perf_counter() - start
        trials = outcome.study.get_trials(deepcopy=False)
    champion = next(t for t in trials if t.number == report.selected_trial)
    return {
        "split": split,
        "variant": variant,
        "champion": report.selected_trial,
        "champion_kind": champion.user_attrs.get("baseline") or "trial",
        "champion_val_selected": report.val_value,
        "champion_test": report.test.accuracy,
        "test_images": report.test.n_images,
        "trials": len(trials),
        "wall_seconds": wall,
        "notes": list(report.notes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "hymenoptera_offline.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
    from pipeline.config import load_study

    rows = []
    for split in args.splits:
        probe = probe_test(load_study(args.study, _overrides(args, split, "today")))
        for variant in args.variants:
            row = {**run_one(args, split, variant), "probe_test": probe}
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
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {
            "mean_champion_test": sum(r["champion_test"] for r in mine) / len(mine),
            "mean_gap": sum(r["champion_val_selected"] - r["champion_test"] for r in mine) / len(mine),
            "beats_probe_on_all_splits": all(r["champion_test"] >= r["probe_test"] for r in mine),
            "wall_vs_today": (
                sum(r["wall_seconds"] for r in mine)
                / max(sum(r["wall_seconds"] for r in rows if r["variant"] == "today"), 1e-9)
            )
            if "today" in args.variants
            else None,
        }
    result = {"budget": budget, "runs": rows, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
