"""`make bench`: sweep's fast paths side by side with the bare tutorial loop; writes JSON.

    python benchmarks/bench.py [--out reports/bench/bench.json] [--data DIR] [--weights FILE]

Same images (a fixed slice of hymenoptera: 32 + 32 train, 16 + 16 val JPEGs, the first by name),
same model (timm EfficientNet-Lite0, the offline study's weights), same batch size, same torch
threads, one process at a time: each measurement runs in its own child process (`--part`), with
its own cold store folder, so peak memory and first-epoch costs are its own. Epoch times are the
median of epochs 1.. (epoch 0 fills caches and starts workers); ratios are the result, absolute
seconds depend on the machine and its load. sweep's side always goes through the product's own
`pipeline.training.fit_config` (the study objective's entry point) and `pipeline.training`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

S = {
    "train_per_class": 32,
    "val_per_class": 16,
    "test_per_class": 8,
    "image_size": 160,
    "batch_size": 16,
    "num_workers": 2,
    "epochs": 3,
    "lr": 0.01,
    "momentum": 0.9,
    "study_trials": 8,
    "study_epochs": 4,
    "seed": 0,
    "aug_epochs": 5,
    "aug_seeds": 3,
}
SPACE = {
    "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
    "momentum": {"type": "float", "low": 0.5, "high": 0.99},
    "freeze_depth": {"type": "int", "low": 0, "high": 8},
    "aug_strength": {"type": "float", "low": 0.0, "high": 1.0},
}
TARGETS = {
    "throughput_depth0_vs_bare": (">=", 0.95),
    "epoch_frozen_vs_bare": ("<=", 0.35),
    "epoch_frozen_aug0_vs_bare": ("<=", 0.05),
    "sweep_pruned_vs_unpruned_wall": ("<=", 0.6),
    "sweep_pruned_minus_unpruned_best": (">=", -0.01),
    "tracking_overhead_share": ("<=", 0.01),
    "peak_rss_vs_bare": ("<=", 1.5),
    "study_vs_usual_wall": ("report", None),
}


def make_slice(source: Path, target: Path) -> Path:
    """Symlink the fixed slice: train/<class> first 32 JPEGs, val/<class> first 16, test/<class> next 8."""
    counts = {
        "train": (("train", 0, S["train_per_class"]),),
        "val": (("val", 0, S["val_per_class"]), ("test", S["val_per_class"], S["val_per_class"] + S["test_per_class"])),
    }
    for src_split, outs in counts.items():
        for cls in sorted(p.name for p in (source / src_split).iterdir() if p.is_dir()):
            files = sorted(p for p in (source / src_split / cls).iterdir() if p.suffix.lower() == ".jpg")
            for split, lo, hi in outs:
                folder = target / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for f in files[lo:hi]:
                    link = folder / f.name
                    if not link.exists():
                        link.symlink_to(f.resolve())
    return target


def study_tree(data: Path, weights: Path, name: str, **training) -> dict:
    return {
        "study": {"name": name, "n_trials": S["study_trials"], "sampler": {"type": "tpe", "seed": S["seed"]}},
        "data": {
            "root": str(data),
            "test": "test",
            "image_size": S["image_size"],
            "batch_size": S["batch_size"],
            "num_workers": S["num_workers"],
            "seed": S["seed"],
        },
        "model": {
            "arch": "timm/efficientnet_lite0",
            "weights": str(weights),
            "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        },
        "training": {"epochs": S["epochs"], "lr": S["lr"], "momentum": S["momentum"]} | training,
        "search_space": SPACE,
    }


def config(tree: dict, folder: Path):
    """Write the study file and load it the way `sweep run` does."""
    import yaml

    from pipeline.config import load_study

    path = folder / f"{tree['study']['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return load_study(path)


def after_first(seconds: list[float]) -> float:
    """Best epoch time after epoch 0: on a machine shared with other jobs the fastest epoch is
    the one least disturbed by them (timeit's rule); epoch 0 fills caches and starts workers."""
    return min(seconds[1:] or seconds)


# ---- parts (each runs in its own process) -------------------------------------------------------


def part_bare(args, fixed: bool) -> dict:
    from benchmarks import bare
    from pipeline.training import pick_device

    pp_resize = round(S["image_size"] / 0.875)
    return bare.run(
        args.data_slice,
        args.weights,
        fixed=fixed,
        epochs=S["epochs"],
        lr=S["lr"],
        momentum=S["momentum"],
        batch_size=S["batch_size"],
        num_workers=S["num_workers"],
        crop=S["image_size"],
        resize=pp_resize,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        device=pick_device("auto"),
    )


def part_sweep(args, depth: int, aug: float, decoded: bool = True) -> dict:
    from pipeline.data import _imagecache as imagecache
    from pipeline.training import _preflight as preflight
    from pipeline.training import fit_config

    tree = study_tree(args.data_slice, args.weights, "bench-trial", freeze_depth=depth, aug_strength=aug)
    tree["cache"] = {"decoded_images": decoded}
    cfg = config(tree, args.work)
    prep = preflight.prepare(cfg, warn=lambda _: None)
    result = fit_config(cfg, prep, seed=S["seed"])
    return {
        "epoch_seconds": [h.seconds for h in result.history],
        "best_val_accuracy": result.best_value,
        "images": imagecache.totals(),
    }


def part_augmentation(args) -> dict:
    """What augmentation sees: the same trials (every stage frozen, aug 1) with crops from the
    cached augmentation sources (tensor transforms) vs from the file decoded each epoch (PIL
    transforms), over three seeds; best val accuracy."""
    from pipeline.training import _preflight as preflight
    from pipeline.training import fit_config

    out: dict[str, list[float]] = {"cached": [], "decoded": []}
    for decoded in (True, False):
        tree = study_tree(
            args.data_slice, args.weights, "bench-aug", freeze_depth=8, aug_strength=1.0, epochs=S["aug_epochs"]
        )
        tree["cache"] = {"decoded_images": decoded}
        cfg = config(tree, args.work)
        prep = preflight.prepare(cfg, warn=lambda _: None)
        for seed in range(S["aug_seeds"]):
            out["cached" if decoded else "decoded"].append(fit_config(cfg, prep, seed=seed).best_value)
    return {**out, "mean_cached_minus_decoded": statistics.mean(out["cached"]) - statistics.mean(out["decoded"])}


def part_study(args, pruner: str) -> dict:
    tree = study_tree(args.data_slice, args.weights, f"bench-{pruner}")
    tree["training"]["epochs"] = S["study_epochs"]
    if pruner == "none":
        tree["study"]["pruner"] = {"type": "none"}
    return run_study(config(tree, args.work))


def run_study(cfg) -> dict:
    """A study through the product's pieces: Optuna RDB storage with heartbeats
    (`tune.open_study`), the same per-trial sampler seeding (`tune.reseed`), MLflow parent and
    nested runs (`track.Tracker`), trial checkpoints, and `fit_config` for every trial."""
    import dataclasses

    import optuna
    import psutil

    from pipeline.config import _stores as stores
    from pipeline.data import _imagecache as imagecache
    from pipeline.models import TrialCheckpoint
    from pipeline.search import _tune as tune
    from pipeline.tracking import Tracker
    from pipeline.training import _preflight as preflight
    from pipeline.training import fit_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    prep = preflight.prepare(cfg, warn=lambda _: None)
    study = tune.open_study(cfg, stores.storage_url(cfg))
    tracker = Tracker(stores.tracking_uri(cfg), cfg.experiment_name, stores.artifact_root(), warn=print)
    tracker.open_parent(cfg.study.name, None, {})
    spent = {"tracking": 0.0, "epochs": 0.0, "trial_runs": 0.0}
    rss: list[int] = []  # resident bytes after each trial: must not grow with the trial count

    def objective(trial: optuna.Trial) -> float:
        c = cfg.with_params(tune.suggest(trial, cfg.search_space))
        t0 = time.perf_counter()
        run_id = tracker.start_trial(cfg.study.name, trial.number, trial.params)
        spent["trial_runs"] += time.perf_counter() - t0
        history: list[dict] = []

        def on_epoch(result) -> None:
            t1 = time.perf_counter()
            history.append(dataclasses.asdict(result))
            trial.set_user_attr("history", history)
            tracker.log_metrics(run_id, result.metrics(), step=result.epoch)
            trial.report(result.val_accuracy, step=result.epoch)
            prune = trial.should_prune()
            spent["tracking"] += time.perf_counter() - t1
            spent["epochs"] += result.seconds
            if prune:
                raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

        try:
            fitted = fit_config(c, prep, c.data.seed + trial.number, on_epoch)
        except optuna.TrialPruned:
            tracker.end_trial(run_id, "PRUNED")
            raise
        TrialCheckpoint(
            fitted.best_state,
            cfg.model.arch,
            prep.spec.origin(),
            prep.splits.class_to_idx,
            prep.preprocess.to_dict(),
            trial.number,
            fitted.best_epoch,
            cfg.study.metric,
            fitted.best_value,
            trial.params,
        ).save(TrialCheckpoint.path_for(cfg.study.name, trial.number))
        tracker.end_trial(run_id, "COMPLETE")
        return fitted.best_value

    while len(study.get_trials(deepcopy=False, states=tune.FINISHED)) < cfg.study.n_trials:
        tune.reseed(study, cfg.study.sampler.seed)
        study.optimize(objective, n_trials=1, gc_after_trial=True)
        rss.append(psutil.Process().memory_info().rss)
    tracker.close_parent("FINISHED")
    trials = study.get_trials(deepcopy=False)
    return {
        "wall_seconds": time.perf_counter() - start,
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "states": [t.state.name for t in trials],
        "params": [t.params for t in trials],
        "epochs_run": [len(t.intermediate_values) for t in trials],
        "tracking_seconds": spent["tracking"],
        "epoch_seconds": spent["epochs"],
        "trial_run_seconds": spent["trial_runs"],
        "images": imagecache.totals(),
        "rss_after_trial": rss,
    }


def part_usual(args) -> dict:
    """The same study the usual way: Optuna (in-memory storage) + optuna-integration's
    MLflowCallback around the tutorial loop, the same trial parameters (enqueued from the sweep
    study), epochs, sampler seed and pruner; freeze depth as `requires_grad = False` on the
    first k stages and the same augmentation map (`data.train_transform`)."""
    import optuna
    import torch
    from optuna_integration import MLflowCallback
    from torch import nn, optim

    from benchmarks import bare
    from pipeline.config import _stores as stores
    from pipeline.data import _transforms as TX
    from pipeline.models import _model as M
    from pipeline.training import pick_device

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = json.loads(Path(args.params).read_text())
    start = time.perf_counter()
    device = pick_device("auto")
    pp = TX.Preprocess(round(S["image_size"] / 0.875), S["image_size"], (0.5,) * 3, (0.5,) * 3)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=S["seed"]),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    for p in params:
        study.enqueue_trial(p)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        momentum = trial.suggest_float("momentum", 0.5, 0.99)
        depth = trial.suggest_int("freeze_depth", 0, 8)
        aug = trial.suggest_float("aug_strength", 0.0, 1.0)
        tf = {"train": TX.train_transform(pp, aug), "val": TX.eval_transform(pp)}
        dataloaders, sizes = bare.loaders(args.data_slice, tf, S["batch_size"], S["num_workers"])
        torch.manual_seed(S["seed"] + trial.number)
        model = bare.efficientnet(args.weights).to(device)
        for _, modules in M.stages(model, "timm/efficientnet_lite0")[:depth]:
            for m in modules:
                m.requires_grad_(False)
        optimizer = optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
        scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

        def report(epoch: int, acc: float) -> None:
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        _, best, _ = bare.train_model(
            model,
            dataloaders,
            sizes,
            nn.CrossEntropyLoss(),
            optimizer,
            scheduler,
            S["study_epochs"],
            device,
            on_epoch=report,
        )
        return best

    callback = MLflowCallback(tracking_uri=stores.default_tracking_uri(), metric_name="val_accuracy")
    study.optimize(objective, n_trials=len(params), callbacks=[callback])
    return {
        "wall_seconds": time.perf_counter() - start,
        "best_value": study.best_value,
        "states": [t.state.name for t in study.trials],
    }


PARTS = {
    "bare_finetune": lambda a: part_bare(a, fixed=False),
    "bare_fixed": lambda a: part_bare(a, fixed=True),
    "sweep_depth0_aug1": lambda a: part_sweep(a, 0, 1.0),
    "sweep_depth0_aug1_decoded": lambda a: part_sweep(a, 0, 1.0, decoded=False),
    "sweep_frozen_aug1": lambda a: part_sweep(a, 8, 1.0),
    "sweep_frozen_aug0": lambda a: part_sweep(a, 8, 0.0),
    "study_pruned": lambda a: part_study(a, "median"),
    "study_unpruned": lambda a: part_study(a, "none"),
    "study_usual": part_usual,
    "augmentation": part_augmentation,
}


def child(args) -> None:
    from pipeline.training._machine import configure_threads

    configure_threads()  # the same intra-op threads in every part, bare loop included
    began = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load = os.getloadavg()[0]
    result = PARTS[args.part](args)
    # Other jobs on the machine slow some parts more than others: their load is part of the record.
    result["load_average_1m"] = [load, os.getloadavg()[0]]
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_rss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["started"] = began
    print(json.dumps(result))


def run_part(name: str, args, extra: list[str] = ()) -> dict:
    home = args.work / "home" / name
    env = {
        **os.environ,
        "SWEEP_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    cmd = [
        sys.executable,
        __file__,
        "--part",
        name,
        "--work",
        str(args.work),
        "--data",
        str(args.data),
        "--weights",
        str(args.weights),
        *extra,
    ]
    print(f"  {name} ...", end="", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"\nbench part {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    print(f" {result['process_seconds']:.1f} s")
    return result


def machine() -> dict:
    import psutil
    import torch

    from pipeline.training._machine import cpu_cores

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor()
    )
    return {
        "cpu_model": model,
        "cores_usable": cpu_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": min(torch.get_num_threads(), cpu_cores()),
        "ram_bytes": psutil.virtual_memory().total,
        "load_average_1m_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    if op == "report":
        return "reported"
    ok = value >= target if op == ">=" else value <= target
    return f"{'met' if ok else 'NOT met'} ({op} {target})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "bench.json")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "hymenoptera_data")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "efficientnet_lite0_imagenet.pth")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: beside --out)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = (args.work or args.out.parent / "work").resolve()
    args.data_slice = args.work / "slice"
    if args.part:
        return child(args)
    for path, what in ((args.data, "data (run `make data`)"), (args.weights, "weights (see ../shared/weights)")):
        if not path.exists():
            sys.exit(f"bench: {path} not found: {what}")
    import shutil

    shutil.rmtree(args.work / "home", ignore_errors=True)  # every part starts cold
    make_slice(args.data, args.data_slice)
    began = dt.datetime.now(dt.UTC)
    info = machine()
    print(
        f"bench: {S['train_per_class'] * 2} train / {S['val_per_class'] * 2} val images at "
        f"{S['image_size']} px, {info['torch_threads']} torch threads, {info['cpu_model']}"
    )
    r = {name: run_part(name, args) for name in PARTS if name != "study_usual"}
    params_file = args.work / "study_params.json"
    params_file.write_text(json.dumps(r["study_pruned"]["params"]))
    r["study_usual"] = run_part("study_usual", args, ["--params", str(params_file)])
    ended = dt.datetime.now(dt.UTC)
    bare, bare_fixed = after_first(r["bare_finetune"]["epoch_seconds"]), after_first(r["bare_fixed"]["epoch_seconds"])
    pruned, unpruned = r["study_pruned"], r["study_unpruned"]
    ratios = {
        "throughput_depth0_vs_bare": bare / after_first(r["sweep_depth0_aug1"]["epoch_seconds"]),
        "epoch_frozen_vs_bare": after_first(r["sweep_frozen_aug1"]["epoch_seconds"]) / bare_fixed,
        "epoch_frozen_aug0_vs_bare": after_first(r["sweep_frozen_aug0"]["epoch_seconds"]) / bare_fixed,
        "sweep_pruned_vs_unpruned_wall": pruned["wall_seconds"] / unpruned["wall_seconds"],
        "sweep_pruned_minus_unpruned_best": pruned["best_value"] - unpruned["best_value"],
        "tracking_overhead_share": pruned["tracking_seconds"] / pruned["epoch_seconds"],
        "peak_rss_vs_bare": r["sweep_depth0_aug1"]["peak_rss_bytes"] / r["bare_finetune"]["peak_rss_bytes"],
        "study_vs_usual_wall": r["study_usual"]["wall_seconds"] / pruned["wall_seconds"],
    }
    report = {
        **{k: round(v, 4) for k, v in ratios.items()},
        "images_decoded_per_study": {
            "files": 2 * (S["train_per_class"] + S["val_per_class"]),
            "decoded": {k: r[k]["images"]["decoded"] for k in ("study_pruned", "study_unpruned")},
        },
        "machine": info,
        "timestamps": {
            "started": began.isoformat(timespec="seconds"),
            "ended": ended.isoformat(timespec="seconds"),
            "seconds": round((ended - began).total_seconds(), 1),
        },
        "method": {
            "epochs": "fastest epoch (train + val) among epochs 1.. of one run (a shared machine disturbs "
            "some epochs; epoch 0 fills caches and starts workers); all epoch times in details",
            "augmentation": "best val accuracy, freeze_depth 8, aug 1, 3 seeds: augmentation from the cached "
            "sources vs from the file decoded every epoch (details.augmentation)",
            "throughput_depth0_vs_bare": "images/s of sweep's trial epoch (freeze 0, aug 1) / the tutorial loop's",
            "studies": "Optuna API driving pipeline.training.fit_config per trial with the product's storage "
            "(tune.open_study: SQLite RDB + heartbeats), tune.reseed, track.Tracker nested runs and "
            "trial checkpoints, because `sweep run`'s objective (tune.Objective._fit) is being moved "
            "onto fit_config in parallel; once it is, `sweep run` takes the same fast paths",
            "tracking_overhead_share": "time in trial.set_user_attr + Tracker.log_metrics + trial.report + "
            "should_prune per epoch / epoch time, pruned study",
            "peak_rss_vs_bare": "ru_maxrss of the trial process (sweep: freeze 0, aug 1) / the tutorial "
            "loop's main process (its DataLoader workers are separate processes, in details)",
            "study_vs_usual_wall": "wall of the usual study (Optuna + optuna-integration MLflowCallback around "
            "the tutorial loop, same enqueued trial parameters, epochs, pruner) / the "
            "pruned sweep study's wall; > 1 means sweep is faster",
        },
        "targets": {k: verdict(k, v) for k, v in ratios.items()},
        "settings": S,
        "details": r,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{'key':36} {'value':>9}  target")
    for key, value in ratios.items():
        print(f"{key:36} {value:9.3f}  {verdict(key, value)}")
    best = {k: round(r[k]["best_val_accuracy"], 3) for k in r if "best_val_accuracy" in r[k]}
    print(f"best val accuracy per run: {best}")
    aug = r["augmentation"]
    print(
        f"augmentation from cached vs decoded images, best val accuracy over seeds: {aug['cached']} vs "
        f"{aug['decoded']} (mean difference {aug['mean_cached_minus_decoded']:+.3f})"
    )
    print(f"images decoded per study: {report['images_decoded_per_study']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
