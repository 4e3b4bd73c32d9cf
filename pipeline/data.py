"""Splits, class map, image decoding, transforms and loaders.

Folder layout (torchvision ImageFolder): `root/{train,val[,test]}/<class>/<image>`.
`class_to_idx` comes from train alone (sorted class folder names) and is reused for val and test.
Hidden entries (names starting with '.') and plain files at class level are not classes.
Without a test folder, a stratified, seeded share (`test_fraction`) of val becomes the sealed
test split; every split's file list is kept in `Splits` so it can be recorded and reproduced.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from pipeline.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# PIL format names accepted for each extension (a JPEG saved as .png is reported, not guessed).
_FORMATS = {
    ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".png": {"PNG"}, ".ppm": {"PPM"},
    ".pgm": {"PPM"}, ".bmp": {"BMP", "DIB"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"},
    ".webp": {"WEBP"}, ".gif": {"GIF"},
}

Sample = tuple[str, int]  # (path relative to data root, class index)


@dataclass(frozen=True)
class Splits:
    """File lists of the three splits; paths are relative to `root`."""

    root: Path
    class_to_idx: dict[str, int]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    test_source: str  # "folder '<name>'" or "carved from val (fraction, seed)"
    skipped: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)

    def to_json(self) -> str:
        """The record logged with each study: enough to rebuild every split exactly."""
        return json.dumps(
            {
                "root": str(self.root),
                "class_to_idx": self.class_to_idx,
                "test_source": self.test_source,
                "counts": {s: len(getattr(self, s)) for s in ("train", "val", "test")},
                "train": self.train,
                "val": self.val,
                "test": self.test,
                "skipped": self.skipped,
            },
            indent=1,
        )


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize short side to `resize` px, centre-crop `crop` px, normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p.name))


def _images_in(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and all(_visible(part) for part in p.relative_to(class_dir).parts)
    )


def _scan_split(root: Path, split: str, class_to_idx: dict[str, int] | None) -> tuple[dict[str, int], list[Sample]]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found (expected {root}/{split}/<class>/<image>)")
    dirs = _class_dirs(split_dir)
    if not dirs:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    if class_to_idx is None:
        class_to_idx = {d.name: i for i, d in enumerate(dirs)}
    else:
        extra = [d.name for d in dirs if d.name not in class_to_idx]
        if extra:
            raise DataError(
                f"{split_dir}: class folder(s) {', '.join(extra)} not in train "
                f"(train classes: {', '.join(class_to_idx)}); add them to train or remove them"
            )
        missing = sorted(set(class_to_idx) - {d.name for d in dirs})
        if missing:
            warnings.warn(f"{split_dir}: no folder for class(es) {', '.join(missing)}", stacklevel=2)
    samples: list[Sample] = []
    empty = []
    for d in dirs:
        files = _images_in(d)
        if not files:
            empty.append(d.name)
        samples += [(str(f.relative_to(root)), class_to_idx[d.name]) for f in files]
    if empty:
        raise DataError(
            f"{split_dir}: empty class folder(s) {', '.join(empty)} (no files with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders"
        )
    return class_to_idx, samples


def build_splits(root: Path, train: str = "train", val: str = "val", test: str | None = None,
                 test_fraction: float = 0.5, seed: int = 0) -> Splits:
    """Scan the image folders and build the train/val/test file lists.

    The carved test split uses scikit-learn's stratified `train_test_split` with `seed`, so the
    same folder and seed always give the same split.

    Raises:
        DataError: missing root or split folder, no classes, empty class folders, a val/test
            class unknown to train, or too few val images per class to carve a test split.
    """
    root = Path(root)
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"{root}: data root not found{where}; set data.root, or run `make data`")
    class_to_idx, train_s = _scan_split(root, train, None)
    _, val_s = _scan_split(root, val, class_to_idx)
    if test is not None:
        _, test_s = _scan_split(root, test, class_to_idx)
        source = f"folder '{test}'"
    else:
        val_s, test_s = _carve(val_s, test_fraction, seed, root / val)
        source = f"carved from '{val}' (test_fraction={test_fraction}, seed={seed}, stratified)"
    return Splits(root, class_to_idx, train_s, val_s, test_s, source)


def _carve(samples: list[Sample], fraction: float, seed: int, where: Path) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split

    labels = [y for _, y in samples]
    try:
        keep, sealed = train_test_split(samples, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as err:
        raise DataError(
            f"{where}: cannot carve a stratified test split with test_fraction={fraction}: {err}. "
            "Add val images, add a test folder (data.test), or change data.test_fraction"
        ) from None
    return sorted(map(tuple, keep)), sorted(map(tuple, sealed))


def without(splits: Splits, bad: list[str]) -> Splits:
    """`splits` minus the files in `bad` (paths relative to root), which are recorded as skipped."""
    drop = set(bad)

    def keep(samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if s[0] not in drop]

    return Splits(splits.root, splits.class_to_idx, keep(splits.train), keep(splits.val),
                  keep(splits.test), splits.test_source, sorted(drop | set(splits.skipped)))


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file fully into 8-bit RGB, the same way for training and prediction.

    EXIF orientation is applied; palette and RGBA images are composited on white; grayscale,
    16-bit ('I;16', 'I') and CMYK images are converted to RGB.

    Raises:
        OSError / PIL.UnidentifiedImageError: the file is not a decodable image.
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 32-bit 'I' first: point() has no 16-bit big-endian ('I;16B', 16-bit TIFF) path.
            img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        elif img.mode == "F":
            img = img.convert("L")
        if img.mode == "P":
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA"):
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
            return background
        return img.convert("RGB")


def check_image(path: Path) -> str | None:
    """Fully decode one file; return None when it is usable, else the reason (one phrase)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            fmt = img.format
        expected = _FORMATS.get(path.suffix.lower())
        if expected and fmt not in expected:
            return f"is a {fmt} image but has the extension {path.suffix}"
        load_rgb(path)
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"cannot be decoded ({err})"
    return None


def scan_images(splits: Splits, policy: str = "stop", progress=None) -> Splits:
    """Pre-flight: decode every image of every split once, report all problems in one message.

    Args:
        policy: "stop" raises on any bad file; "skip" drops them and records them in `skipped`.
        progress: optional callable(done, total) for a progress display.

    Raises:
        DataError: with policy "stop", listing every bad file and its reason.
    """
    samples = splits.train + splits.val + splits.test
    bad: list[tuple[str, str]] = []
    for i, (rel, _) in enumerate(samples):
        reason = check_image(splits.root / rel)
        if reason:
            bad.append((rel, reason))
        if progress:
            progress(i + 1, len(samples))
    if not bad:
        return splits
    if policy == "stop":
        listing = "\n  ".join(f"{splits.root / rel}: {why}" for rel, why in bad)
        raise DataError(
            f"{len(bad)} unreadable image(s) under {splits.root}:\n  {listing}\n"
            "Fix or remove them, or set data.bad_images: skip to train without them"
        )
    result = without(splits, [rel for rel, _ in bad])
    for split in ("train", "val", "test"):
        if not getattr(result, split):
            raise DataError(f"{splits.root}: every image of the {split} split is unreadable")
    # A class left with no train image would still get an output unit that never trains.
    left = {y for _, y in result.train}
    gone = [c for c, i in result.class_to_idx.items() if i not in left]
    if gone:
        raise DataError(f"{splits.root}: every train image of class(es) {', '.join(gone)} is "
                        "unreadable; fix the files or remove the class")
    return result


_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
           "nearest": T.InterpolationMode.NEAREST}


def _finish(pp: Preprocess) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)]


def eval_transform(pp: Preprocess) -> T.Compose:
    """PIL RGB -> `(3, crop, crop)` float32 normalised tensor; resize short side, centre crop."""
    return T.Compose([T.Resize(pp.resize, interpolation=_INTERP[pp.interpolation], antialias=True),
                      T.CenterCrop(pp.crop), *_finish(pp)])


def train_transform(pp: Preprocess, strength: float) -> T.Compose:
    """Train transforms for augmentation strength `s` in [0, 1] (one monotone map).

    - s = 0: exactly `eval_transform` (no augmentation).
    - s > 0: RandomResizedCrop(crop, scale=(0.08 + 0.92 (1 - s), 1), ratio=(1 - s/4, 1 + s/3)),
      RandomHorizontalFlip(p = 0.5 s), ColorJitter(brightness = contrast = saturation = 0.4 s).
    - s = 1: scale (0.08, 1), ratio (3/4, 4/3) and p = 0.5 are the torchvision transfer-learning
      tutorial's RandomResizedCrop + flip (the seed recipe), plus timm's default jitter of 0.4.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    if strength == 0:
        return eval_transform(pp)
    s = strength
    return T.Compose([
        # 0.08 + 0.92 (1 - s), not 1 - 0.92 s: the latter is 0.07999999999999996 at s = 1.
        T.RandomResizedCrop(pp.crop, scale=(0.08 + 0.92 * (1 - s), 1.0), ratio=(1 - s / 4, 1 + s / 3),
                            interpolation=_INTERP[pp.interpolation], antialias=True),
        T.RandomHorizontalFlip(p=0.5 * s),
        T.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s),
        *_finish(pp),
    ])


def working_size(pp: Preprocess) -> T.Resize:
    """The resize both image paths share: PIL RGB -> short side `pp.resize` px, aspect kept.
    The decoded-image cache (pipeline/imagecache.py) applies it once per file."""
    return T.Resize(pp.resize, interpolation=_INTERP[pp.interpolation], antialias=True)


def cached_eval_transform(pp: Preprocess) -> T.Compose:
    """uint8 `(3, H, W)` already at `working_size` -> `(3, crop, crop)` float32, bit-identical
    to `eval_transform` applied to the decoded file (the same centre-crop offsets and scaling)."""
    return T.Compose([T.CenterCrop(pp.crop), *_finish(pp)])


def cached_train_transform(pp: Preprocess, strength: float) -> T.Compose:
    """`train_transform` for images taken from the decoded-image cache.

    s = 0 is `cached_eval_transform` on the working-size image (bit-identical to the on-the-fly
    eval path). For s > 0 the same transforms run on the cached augmentation source (the decoded
    file at its own resolution, short side capped at 4 x crop; pipeline/imagecache.py) instead
    of the PIL image: RandomResizedCrop draws its box the same way over the same pixels but
    resamples with torchvision's tensor kernels (antialiased bilinear) instead of PIL's, and
    ColorJitter works on uint8 tensors; the random draws differ from the PIL path's, the
    distribution of views does not. benchmarks/bench.py compares best val accuracy both ways.
    """
    return cached_eval_transform(pp) if strength == 0 else train_transform(pp, strength)


class ImageList(Dataset):
    """(image, label) pairs from a sample list; images decoded by `load_rgb`."""

    def __init__(self, root: Path, samples: list[Sample], transform):
        self.root, self.samples, self.transform = Path(root), samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        try:
            image = load_rgb(self.root / rel)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{self.root / rel}: cannot be decoded mid-training ({err})") from None
        return self.transform(image), label


def make_loader(root: Path, samples: list[Sample], transform, batch_size: int, num_workers: int,
                shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over `samples`; shuffling is seeded so a trial's batch order is reproducible."""
    return loader(ImageList(root, samples, transform), batch_size, num_workers, shuffle, seed)


def loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over any (image, label) dataset, seeded like `make_loader`: the same
    `batch_size`, `shuffle` and `seed` give the same batch order whatever the dataset holds."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle,
        num_workers=num_workers, generator=generator, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
