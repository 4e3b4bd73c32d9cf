"""Put the real data (and, where available, the offline weights) in place for the studies.

    python scripts/get_assets.py [--source DIR] [--weights-source DIR]

Data: `data/hymenoptera_data` is linked from `--source`, `$SWEEP_DATA_SOURCE` or
`../shared/data/hymenoptera_data` when one exists; otherwise the PyTorch transfer-learning
tutorial's public archive is downloaded. Either way the tree is verified against a sha256 digest
of every file, so a partial or altered copy is refused instead of silently used.
Weights: `weights/efficientnet_lite0_imagenet.pth` is linked from `--weights-source`,
`$SWEEP_WEIGHTS_SOURCE` or `../shared/weights` (a folder holding the file; sha256 checked); without
it only the hub-weights study (studies/hymenoptera.yaml) can run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DATA_TREE_SHA256 = "15d89271f257b89832a79a665d92fea577411e875ab6be14222a571af4b2b359"
WEIGHTS = {"efficientnet_lite0_imagenet.pth": "46cef2797f0b28d31f544df5ff4f9c74e78b3a4fafbe1d961e72968545fd1688"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over sorted 'relative/path sha256' lines of every visible file under `root`."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if not any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            lines.append(f"{rel.as_posix()} {sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def place_data(source: Path | None) -> None:
    target = ROOT / "data" / "hymenoptera_data"
    if target.exists() and tree_digest(target) == DATA_TREE_SHA256:
        print(f"data: {target} in place (verified)")
        return
    candidates = [source, os.environ.get("SWEEP_DATA_SOURCE"), SHARED / "data" / "hymenoptera_data"]
    local = next((Path(c) for c in candidates if c and Path(c).is_dir()), None)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    if local is not None:
        if tree_digest(local) != DATA_TREE_SHA256:
            sys.exit(
                f"data: {local} does not match the expected hymenoptera tree (sha256); "
                "point SWEEP_DATA_SOURCE (make data) or --source at an untouched copy"
            )
        target.symlink_to(local.resolve(), target_is_directory=True)
        print(f"data: linked {target} -> {local.resolve()}")
        return
    print(f"data: no local copy; downloading {DATA_URL}")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=60) as response:
            archive = zipfile.ZipFile(io.BytesIO(response.read()))
    except OSError as err:
        sys.exit(
            f"data: download of {DATA_URL} failed ({err}); "
            "point SWEEP_DATA_SOURCE=DIR (make data) or --source DIR at a local copy"
        )
    staging = target.parent / ".hymenoptera_download"
    shutil.rmtree(staging, ignore_errors=True)
    archive.extractall(staging)
    if tree_digest(staging / "hymenoptera_data") != DATA_TREE_SHA256:
        shutil.rmtree(staging)
        sys.exit(f"data: the archive from {DATA_URL} does not match the expected sha256 tree digest")
    (staging / "hymenoptera_data").rename(target)
    shutil.rmtree(staging)
    print(f"data: {target} downloaded and verified")


def place_weights(folder: Path | None) -> None:
    folders = [folder, os.environ.get("SWEEP_WEIGHTS_SOURCE"), SHARED / "weights"]
    for name, digest in WEIGHTS.items():
        target = ROOT / "weights" / name
        source = next((Path(f) / name for f in folders if f and (Path(f) / name).is_file()), SHARED / "weights" / name)
        if target.exists() and sha256_file(target) == digest:
            print(f"weights: {target} in place (verified)")
            continue
        if not source.is_file():
            print(
                f"weights: {name} not found in --weights-source, $SWEEP_WEIGHTS_SOURCE or {SHARED / 'weights'}; "
                f"studies/hymenoptera_offline.yaml needs {target} (put it there, or pass SWEEP_WEIGHTS_SOURCE=DIR); "
                "studies/hymenoptera.yaml uses torchvision's hub weights instead"
            )
            continue
        if sha256_file(source) != digest:
            sys.exit(f"weights: {source} does not match its sha256 {digest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source.resolve())
        print(f"weights: linked {target} -> {source.resolve()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="local hymenoptera_data folder to link")
    parser.add_argument("--weights-source", type=Path, help="local folder holding the offline checkpoint(s)")
    parser.add_argument(
        "--weights-only", action="store_true", help="only the offline checkpoint(s): a study of your own images"
    )
    args = parser.parse_args()
    if not args.weights_only:
        place_data(args.source)
    place_weights(args.weights_source)


if __name__ == "__main__":
    main()
