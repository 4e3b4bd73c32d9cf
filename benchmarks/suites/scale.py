"""How a sweep's cost grows with the data: images, classes, image size.

Each case is a generated ImageFolder tree (`common.make_tree`: real hymenoptera JPEGs dealt over C
classes, so decoding costs what it costs; labels carry no signal) and one `sweep run --no-report`
of the linear probe (where on) plus one fixed trial, then `sweep report`, each in a child process with its
own `SWEEP_HOME`. What the product stored and printed gives each stage's cost:
- scan: the pre-flight's "scanned N image files in S s" line;
- probe: the linear-probe trial's seconds (its feature pass + the logistic-regression fit);
- epochs: the trial's stored epoch seconds. Head-only trials (every stage frozen, no
  augmentation) run 2 epochs: epoch 0 decodes into the cache and computes the frozen features,
  epoch 1 trains the head on them; fine-tuning trials (freeze depth 0, augmentation) run 1;
- overhead: the trial's wall seconds less its epochs (model build, MLflow logging, checkpoint);
- report: the `sweep report` child's wall seconds (imports, test pass, plots, registry), for the
  cases that time it;
- memory: peak RSS of each child (`ru_maxrss`); disk: bytes under `SWEEP_HOME` by folder.
Costs are also given per 1k images of the tree (train + val + test).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from benchmarks import common as C

HEAD, FINETUNE = "head", "finetune"


def _case(
    images: int,
    classes: int,
    px: int,
    mode: str,
    probe: bool = True,
    memory_mb: int | None = None,
    report: bool = False,
) -> dict:
    return {
        "images": images,
        "classes": classes,
        "image_size": px,
        "mode": mode,
        "probe": probe,
        "memory_mb": memory_mb,
        "report": report,
    }


SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "batch_size": 16,
        "cases": {
            "n_small": _case(60, 3, 32, HEAD, report=True),
            "n_large": _case(120, 3, 32, HEAD, report=True),
            "c_many": _case(80, 20, 32, FINETUNE, probe=False, report=True),
            "c_probe": _case(40, 10, 32, HEAD),
            "ft_small": _case(40, 3, 32, FINETUNE, probe=False),
            "big_ref": _case(30, 3, 64, HEAD, probe=False, memory_mb=0),
            "big": _case(120, 3, 64, HEAD, probe=False, memory_mb=1),
        },
    },
    "default": {
        "batch_size": 32,
        "cases": {
            "n_small": _case(1000, 10, 64, HEAD, report=True),
            "n_mid": _case(4000, 10, 64, HEAD, report=True),
            "n_large": _case(16000, 10, 64, HEAD, report=True),
            "c_100": _case(4000, 100, 64, HEAD, report=True),
            "c_many": _case(4000, 1000, 64, FINETUNE, probe=False, report=True),
            "c_probe": _case(1000, 200, 64, HEAD),  # the user's 200-class case: the probe at many classes
            "ft_small": _case(1000, 10, 64, FINETUNE, probe=False),
            "big_ref": _case(200, 10, 224, HEAD, probe=False, memory_mb=0),
            "big": _case(2000, 10, 224, HEAD, probe=False, memory_mb=128),
        },
    },
    "full": {
        "batch_size": 32,
        "cases": {
            "n_small": _case(1000, 10, 64, HEAD, report=True),
            "n_mid": _case(16000, 10, 64, HEAD, report=True),
            "n_large": _case(64000, 10, 64, HEAD, report=True),
            "c_100": _case(16000, 100, 64, HEAD, report=True),
            "c_many": _case(16000, 1000, 64, FINETUNE, probe=False, report=True),
            "c_probe": _case(4000, 200, 64, HEAD),
            "ft_small": _case(1000, 10, 64, FINETUNE, probe=False),
            "big_ref": _case(200, 10, 224, HEAD, probe=False, memory_mb=0),
            "big": _case(16000, 10, 224, HEAD, probe=False, memory_mb=1024),
        },
    },
}
TARGETS = {
    "per_image_head_largest_vs_smallest": ("<=", 1.2),  # scan + probe + epochs + overhead per image
    "per_image_scan_largest_vs_smallest": ("<=", 1.2),
    "per_image_finetune_epoch_largest_vs_smallest": ("<=", 1.2),
    "report_vs_finetune_epoch_many_classes": ("<=", 0.1),
    "cache_rss_over_memory_budget": ("<=", 1.0),  # peak RSS above the no-cache run, over the budget
}
KEYS = ("ratios", "cases", "method")
SCANNED = re.compile(r"scanned (\d+) image files in ([\d.]+) s")
FROZEN_DEPTH = 8  # every stage of EfficientNet-Lite0: head-only


def study(name: str, case: dict[str, Any], data: Path, batch_size: int) -> dict[str, Any]:
    """The case's study file: the probe (when on) and one fixed trial, no selection re-runs."""
    head = case["mode"] == HEAD
    return {
        "study": {"name": name, "n_trials": 2 if case["probe"] else 1, "sampler": {"type": "grid", "seed": 0}},
        "data": {"root": str(data), "test": "test", "image_size": case["image_size"], "batch_size": batch_size},
        "model": C.EFFICIENTNET,
        "training": {"epochs": 2 if head else 1, "lr": 0.01, "momentum": 0.9},
        "search_space": {
            "freeze_depth": {"type": "categorical", "choices": [FROZEN_DEPTH if head else 0]},
            "aug_strength": {"type": "categorical", "choices": [0.0 if head else 1.0]},
        },
        "selection": {
            "baselines": {"linear_probe": case["probe"], "seed_recipe": False},
            "reruns": 0,
            "refit": False,
        },
        "cache": {"max_memory_mb": case["memory_mb"]},
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def measure(name: str, case: dict[str, Any], work: Path, batch_size: int, trees: Path) -> dict[str, Any]:
    """Run one case (module docstring); its stage seconds, memory and disk."""
    from pipeline.search import TrialRecord

    data = C.make_tree(trees / f"{case['images']}x{case['classes']}", case["images"], case["classes"])
    files = sum(1 for p in data.rglob("*.jpg"))
    store = C.Store(work / name)
    path = C.study_file(work / name, study(f"scale-{name}", case, data, batch_size))
    ran = C.sweep("run", path, store, "--no-report", quiet=False, timeout=7200)
    reported = C.sweep("report", path, store, timeout=3600) if case["report"] else None
    scan = SCANNED.search(ran.stderr)
    if scan is None or int(scan.group(1)) != files:
        raise C.BenchError(f"{name}: no 'scanned {files} image files' line in the run's output")
    records = [TrialRecord.from_frozen(t) for t in C.trials(store, f"scale-{name}")]
    trial = next(r for r in records if not r.is_probe)
    probe = next((r for r in records if r.is_probe), None)
    epochs = [float(e["seconds"]) for e in trial.history]
    seconds = {
        "scan": float(scan.group(2)),
        "probe": probe.seconds if probe and probe.seconds is not None else 0.0,
        **{f"epoch{i}": s for i, s in enumerate(epochs)},
        "overhead": (trial.seconds or 0.0) - sum(epochs),
        **({"report": reported.wall_seconds} if reported else {}),
    }
    home = store.home
    disk = {
        "cache": folder_bytes(home / "cache") if (home / "cache").exists() else 0,
        "reports": folder_bytes(store.reports),
        "total": folder_bytes(home),
    }
    return {
        **case,
        "files": files,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "per_1k_images": {k: round(1000 * v / files, 3) for k, v in seconds.items()},
        "run_wall_seconds": round(ran.wall_seconds, 1),
        "peak_rss_bytes": {"run": ran.peak_rss_bytes, **({"report": reported.peak_rss_bytes} if reported else {})},
        "disk_bytes": disk,
        "cache_line": next((ln for ln in ran.stdout.splitlines() if ln.startswith("cache ")), None),
    }


def per_image(case: dict[str, Any], *stages: str) -> float:
    return sum(case["seconds"].get(s, 0.0) for s in stages) / case["files"]


def run(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """Every case of the size, then the growth ratios (TARGETS)."""
    trees = work / "trees"
    cases = {name: measure(name, case, work, s["batch_size"], trees) for name, case in s["cases"].items()}
    small, large = cases["n_small"], cases["n_large"]
    head_stages = ("scan", "probe", "epoch0", "epoch1", "overhead")
    many, ft = cases["c_many"], cases["ft_small"]
    budget = (cases["big"]["memory_mb"] or 0) * 2**20 or 2**20
    values = {
        "per_image_head_largest_vs_smallest": per_image(large, *head_stages) / per_image(small, *head_stages),
        "per_image_scan_largest_vs_smallest": per_image(large, "scan") / per_image(small, "scan"),
        "per_image_finetune_epoch_largest_vs_smallest": per_image(many, "epoch0") / per_image(ft, "epoch0"),
        "report_vs_finetune_epoch_many_classes": many["seconds"]["report"] / many["seconds"]["epoch0"],
        "cache_rss_over_memory_budget": (
            cases["big"]["peak_rss_bytes"]["run"] - cases["big_ref"]["peak_rss_bytes"]["run"]
        )
        / budget,
    }
    return {
        "ratios": C.ratios_with_targets(values, TARGETS),
        "cases": cases,
        "method": "per image: a stage's seconds over the tree's files (train + val + test); largest vs "
        "smallest: n_large over n_small (head-only), c_many over ft_small (fine-tuning epoch, C differs: the "
        "head is a small part of the epoch); cache RSS: peak RSS of `big` (many images, capped cache) less "
        "that of `big_ref` (same size, cache.max_memory_mb 0), over big's cache.max_memory_mb",
    }
