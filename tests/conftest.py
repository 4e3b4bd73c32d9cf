"""Shared fixtures: tiny generated image folders and study files that train in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (a git worktree may sit one level deeper); SWEEP_SHARED overrides.
SHARED = Path(
    os.environ.get("SWEEP_SHARED")
    or next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared")
)
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"

# Class colours are far apart so a small model separates them within an epoch or two.
COLOURS = {"ants": (200, 40, 40), "bees": (40, 40, 200), "wasps": (40, 200, 40)}


def write_image(path: Path, colour, size: int = 32, seed: int = 0, fmt: str | None = None) -> Path:
    """A `size`x`size` RGB image: the class colour plus seeded noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_folder(root: Path, splits: dict[str, int] | None = None, classes=("ants", "bees"), size: int = 32) -> Path:
    """root/<split>/<class>/img_<i>.png with `splits[split]` images per class."""
    splits = splits or {"train": 8, "val": 6}
    for s_index, (split, n) in enumerate(splits.items()):
        for c_index, cls in enumerate(classes):
            for i in range(n):
                write_image(
                    root / split / cls / f"img_{i}.png", COLOURS[cls], size, seed=1000 * s_index + 100 * c_index + i
                )
    return root


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


@pytest.fixture
def sweep_home(tmp_path: Path, monkeypatch) -> Path:
    """Per-test embedded stores: SWEEP_HOME points Optuna + MLflow at tmp_path/mlruns."""
    home = tmp_path / "mlruns"
    monkeypatch.setenv("SWEEP_HOME", str(home))
    return home


def study_dict(root: Path, **sections) -> dict:
    """A tiny study: ResNet-18 from scratch at 32 px, 2 trials x 2 epochs, no workers."""
    tree = {
        "study": {"name": "tiny", "n_trials": 2, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
        "data": {"root": str(root), "image_size": 32, "batch_size": 8, "num_workers": 0, "seed": 0},
        "model": {"arch": "resnet18", "weights": "none"},
        "training": {"epochs": 2, "lr": 0.01},
        "search_space": {
            "lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True},
            "freeze_depth": {"type": "int", "low": 0, "high": 2},
        },
        "registry": {"model_name": "tiny-classifier", "alias": "champion"},
        # Today's selection (no baselines, no re-runs): tests of the selection set their own.
        "selection": {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0, "refit": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


def write_study(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def study_file(tmp_path: Path, image_root: Path) -> Path:
    return write_study(tmp_path / "study.yaml", study_dict(image_root))


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found under /usr/lib/postgresql: apt-get install postgresql (.ci/run does)"
        )
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on loopback; yields `make_db(name) -> SQLAlchemy URL`.

    Runs as the `postgres` system user when the tests run as root (the server refuses root).
    """
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"

    def pg(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(base / "server.log"),
        "-w",
        "-o",
        f"-p {port} -h 127.0.0.1 -k {base}",
        "start",
    )

    def make_db(name: str) -> str:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    try:
        yield make_db
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)


# Optuna's gRPC storage proxy in a process of its own (tests/distributed/test_proxy.py, the split record).
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(database: str, port: int) -> subprocess.Popen:
    code = (
        f"from pipeline.distributed import serve_storage_proxy; serve_storage_proxy({database!r}, '127.0.0.1', {port})"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out
