"""What every benchmark suite shares: the offline assets, study files, `sweep run` / `sweep report`
in a child process with its own store, the trials it left, the machine it ran on.

Every suite drives the product the way a user does: it writes a study YAML and runs
`python -m pipeline run` (and `report`) in a child process with a `SWEEP_HOME` of its own, then
reads what the product stored (the Optuna study's trials, the report's files). Peak memory is the
child's `ru_maxrss` from `os.wait4` (the largest process of its tree), so each measurement is its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "hymenoptera_data"
WEIGHTS = ROOT / "weights" / "efficientnet_lite0_imagenet.pth"
OUT_DIR = ROOT / "reports" / "bench"
EFFICIENTNET = {
    "arch": "timm/efficientnet_lite0",
    "weights": str(WEIGHTS),
    "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},  # these weights' (their README)
}
NO_SELECTION = {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0}
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONPATH": str(ROOT)}


class BenchError(SystemExit):
    """A suite could not measure: one line naming the command or file, exit 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench: {message}")


def require_assets() -> None:
    """Raises BenchError naming `make data` when the offline images or weights are missing."""
    for path in (DATA, WEIGHTS):
        if not path.exists():
            raise BenchError(f"{path} not found: run `make data` (copies them from ../shared)")


def make_slice(target: Path, train: int, val: int, test: int, source: Path = DATA) -> Path:
    """Symlink a fixed slice of hymenoptera under `target`: per class the first `train` train JPEGs,
    the first `val` val JPEGs as val and the next `test` as test (by name, so every run sees the same)."""
    plan = {"train": (("train", 0, train),), "val": (("val", 0, val), ("test", val, val + test))}
    for src_split, outs in plan.items():
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


def make_tree(target: Path, images: int, classes: int, fractions: tuple[float, float] = (0.8, 0.1)) -> Path:
    """An ImageFolder tree of `images` real JPEG files in `classes` classes under `target`
    (`train/`, `val/`, `test/`, one folder per class `c0000`...): hymenoptera's JPEGs dealt round
    robin, each as a hard link of its own name (a copy where links cannot be made), so every file is
    decoded at its real cost and cached as its own entry. Class labels carry no signal: accuracy is
    not what a scale run measures.

    Args:
        fractions: (train, val) shares of each class's images; test gets the rest (at least one).

    Returns:
        `target`. An existing tree of the same shape is reused.
    """
    marker = target / ".shape"
    shape = f"{images} {classes} {fractions}"
    if marker.exists() and marker.read_text() == shape:
        return target
    sources = sorted(p for p in DATA.rglob("*.jpg"))
    per_class = max(3, images // classes)
    n_train = max(1, min(round(per_class * fractions[0]), per_class - 2))
    n_val = max(1, min(round(per_class * fractions[1]), per_class - n_train - 1))
    k = 0
    for c in range(classes):
        for i in range(per_class):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            folder = target / split / f"c{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / f"img{k:06d}.jpg"
            if not link.exists():
                try:
                    os.link(sources[k % len(sources)], link)
                except OSError:  # another filesystem, or links not allowed
                    shutil.copyfile(sources[k % len(sources)], link)
            k += 1
    marker.write_text(shape)
    return target


def slice_data(s: Mapping[str, Any], data: Path) -> dict[str, Any]:
    """The `data:` section of a study over a `make_slice` tree at a suite's size `s`."""
    return {
        "root": str(data),
        "test": "test",
        "image_size": s["image_size"],
        "batch_size": s["batch_size"],
        "num_workers": s["num_workers"],
        "seed": 0,
    }


def study_file(folder: Path, tree: Mapping[str, Any]) -> Path:
    """Write `tree` as `<folder>/<study name>.yaml` (what a user writes) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tree['study']['name']}.yaml"
    path.write_text(yaml.safe_dump(dict(tree), sort_keys=False))
    return path


@dataclasses.dataclass(frozen=True)
class Store:
    """One measurement's own stores: `SWEEP_HOME`, the Optuna storage URL, the report folder."""

    home: Path
    journal: bool = False  # an Optuna journal file (what many workers share) instead of SQLite

    @property
    def storage(self) -> str:
        if self.journal:
            return f"journal:///{self.home / 'optuna.journal'}"
        return f"sqlite:///{self.home / 'optuna.db'}"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    def disk_bytes(self) -> int:
        """Bytes of every file under `home` (caches, stores, checkpoints, artifacts)."""
        return sum(p.stat().st_size for p in self.home.rglob("*") if p.is_file() and not p.is_symlink())


@dataclasses.dataclass(frozen=True)
class Child:
    """A finished child process: wall time (seconds), peak RSS (bytes, largest process of its
    tree), its output."""

    wall_seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], env: Mapping[str, str], timeout: float = 3600) -> Child:
    """Run `cmd`, wait for it with `os.wait4` (its own `ru_maxrss`), raise BenchError on a non-zero exit.

    Output goes to files, not pipes, so a chatty child cannot block on a full pipe."""
    out_dir = Path(env.get("SWEEP_HOME", ".")) / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.time_ns()}"
    out_path, err_path = out_dir / f"{stamp}.out", out_dir / f"{stamp}.err"
    start = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(list(cmd), env={**os.environ, **env}, stdout=out, stderr=err, cwd=ROOT)
        deadline = start + timeout
        while (done := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
            if time.perf_counter() > deadline:
                proc.kill()
                raise BenchError(f"{' '.join(cmd)} ran past {timeout:.0f} s")
            time.sleep(0.05)
    wall = time.perf_counter() - start
    _, status, usage = done
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return Child(wall, usage.ru_maxrss * 1024, stdout, stderr)


def sweep(verb: str, study: Path, store: Store, *extra: str, timeout: float = 3600, quiet: bool = True) -> Child:
    """`python -m pipeline <verb> <study> --storage <store's> [extra]` with `SWEEP_HOME` = the store's
    home: what `sweep <verb>` does for a user, in a process of its own. `quiet=False`: `sweep run`
    prints its plain progress lines (scan, epochs) to the child's stderr."""
    cmd = [sys.executable, "-m", "pipeline", verb, str(study), "--storage", store.storage, *extra]
    if verb == "run" and quiet:
        cmd.append("--quiet")
    env = {**ENV, "SWEEP_HOME": str(store.home), "SWEEP_REPORTS": str(store.reports)}
    return run_child(cmd, env, timeout)


def trials(store: Store, study_name: str) -> list[Any]:
    """The Optuna trials `sweep run` left in the store (FrozenTrial, in number order)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: Any = store.storage
    if store.journal:
        backend = optuna.storages.journal.JournalFileBackend(str(store.home / "optuna.journal"))
        storage = optuna.storages.JournalStorage(backend)
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


def epoch_seconds(trial: Any) -> list[float]:
    """Wall seconds of each epoch the trial ran, from the history the product stored."""
    from pipeline.search import epoch_history

    return [float(e["seconds"]) for e in epoch_history(trial.user_attrs)]


def after_first(seconds: Sequence[float]) -> float:
    """Fastest epoch after epoch 0: on a machine shared with other jobs the fastest epoch is the one
    least disturbed by them (timeit's rule); epoch 0 fills caches and starts workers."""
    return min(seconds[1:] or seconds)


def machine() -> dict[str, Any]:
    """CPU model, usable cores, torch threads and versions, the 1-minute load at the start."""
    import psutil
    import torch

    from pipeline.training import cpu_cores

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    return {
        "cpu_model": model,
        "cores_usable": cpu_cores(),
        "ram_bytes": psutil.virtual_memory().total,
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def verdict(value: float, op: str, target: float | None) -> str:
    """'met (<= 0.35)', 'NOT met (>= 0.95)' or 'reported' (no target)."""
    if target is None:
        return "reported"
    ok = value >= target if op == ">=" else value <= target
    return f"{'met' if ok else 'NOT met'} ({op} {target})"


def ratios_with_targets(values: Mapping[str, float], targets: Mapping[str, tuple[str, float | None]]) -> dict:
    """{key: {"value": v rounded to 4 places, "target": verdict}} for every key of `targets`."""
    return {k: {"value": round(values[k], 4), "target": verdict(values[k], *targets[k])} for k in targets}


def dump(path: Path, result: Mapping[str, Any]) -> Path:
    """Write `result` as indented JSON at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path
