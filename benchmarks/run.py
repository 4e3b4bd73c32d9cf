"""`make bench` / `make bench-smoke`: run benchmark suites and write one JSON per suite.

    python -m benchmarks.run [--suite NAME ...] [--size smoke|default|full] [--out-dir reports/bench]

Every suite (benchmarks/suites/<name>.py, listed in benchmarks/README.md) drives the product itself
and declares its sizes (`SIZES`), the ratios it targets (`TARGETS`) and the keys its JSON holds
(`KEYS`). The runner gives each suite a cold scratch folder, adds the machine and timestamps, checks
that every declared key and ratio is there (a suite that stops writing one fails here, in CI's smoke
run, instead of rotting), writes `<out-dir>/<suite>.json` (`<out-dir>/smoke/` at the smoke size) and
prints the ratios. A size a suite does not declare falls back to its `default`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import common as C

SUITES = ("trial", "study", "augmentation", "selection", "workers", "offline", "scale")


def load(name: str) -> ModuleType:
    return importlib.import_module(f"benchmarks.suites.{name}")


def missing_keys(suite: ModuleType, result: dict[str, Any]) -> list[str]:
    """Declared keys (and ratios) the suite's result lacks."""
    gone = [k for k in suite.KEYS if k not in result]
    gone += [f"ratios.{k}" for k in suite.TARGETS if k not in result.get("ratios", {})]
    return gone


def run_suite(name: str, size: str, out_dir: Path) -> Path:
    """Run one suite at `size` in a cold scratch folder; write and return its JSON path.

    Raises:
        BenchError: the suite failed, or its result lacks a declared key."""
    suite = load(name)
    settings = suite.SIZES.get(size, suite.SIZES["default"])
    work = out_dir / "work" / name
    shutil.rmtree(work, ignore_errors=True)  # cold: no cache, store or checkpoint from a previous run
    work.mkdir(parents=True)
    began, start, info = dt.datetime.now(dt.UTC), time.perf_counter(), C.machine()
    print(f"{name} ({size}) ...", flush=True)
    result = suite.run(settings, work)
    gone = missing_keys(suite, result)
    if gone:
        raise C.BenchError(f"suite {name} wrote no {', '.join(gone)}")
    record = {
        "suite": name,
        "size": size,
        "settings": settings,
        **result,
        "machine": info,
        "started": began.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    path = C.dump(out_dir / f"{name}.json", record)
    for key, ratio in result.get("ratios", {}).items():
        print(f"  {key:40} {ratio['value']:9.4f}  {ratio['target']}")
    print(f"  wrote {path} ({record['seconds']:.0f} s)", flush=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=SUITES, help="repeatable; default: all")
    parser.add_argument("--size", choices=("smoke", "default", "full"), default="default")
    parser.add_argument("--out-dir", type=Path, default=C.OUT_DIR)
    args = parser.parse_args()
    C.require_assets()
    out_dir = args.out_dir.resolve() / ("smoke" if args.size == "smoke" else "")
    for name in args.suite or SUITES:
        run_suite(name, args.size, out_dir)


if __name__ == "__main__":
    main()
