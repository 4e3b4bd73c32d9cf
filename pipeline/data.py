"""Splits, class map, image decoding, transforms and loaders.

Folder layout (torchvision ImageFolder): `root/{train,val[,test]}/<class>/<image>`.
`class_to_idx` comes from train alone (sorted class folder names) and is reused for val and test;
train needs at least two classes. Hidden entries (names starting with '.') and plain files at
class level are not classes.
Without a test folder, a stratified, seeded share (`test_fraction`) of val becomes the sealed
test split; every split's file list is kept in `Splits` so it can be recorded and reproduced.

Which files are images: every extension Pillow registers for a format it can open
(`PIL.Image.registered_extensions()`, e.g. .jpg, .jfif, .jpe, .png, .webp, .tif, .bmp, .gif),
except stub formats that need an external handler (BUFR, GRIB, HDF5, WMF) and MPEG video.
Every other regular file under a class folder, and every hidden one, is counted by extension in
one `DataWarning`. A file whose content is another format than its extension says (a WEBP named
.jpg) is used as decoded, with one warning; "unreadable" is kept for files that do not decode.
Warnings Pillow raises while decoding ("Corrupt EXIF data", ...) become one warning per message
naming the files.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torchvision.transforms import v2 as T

from pipeline.errors import DataError, first_line


class DataWarning(UserWarning):
    """A problem in the image folders that does not stop the run (one line, names the files)."""


def _openable_extensions() -> dict[str, str]:
    """Lower-case extension -> Pillow format, for every format Pillow can decode itself."""
    Image.init()
    openable = {"MPO"}  # multi-picture JPEGs: opened by the JPEG opener, so not in Image.OPEN
    for fmt, (factory, _) in Image.OPEN.items():
        stub = inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile)
        if not stub and fmt != "MPEG":  # MPEG: video; Pillow reads only its frame size
            openable.add(fmt)
    return {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in openable}


_EXTENSION_FORMAT = _openable_extensions()
IMAGE_EXTENSIONS = tuple(sorted(_EXTENSION_FORMAT))
# Formats that are one family: a camera's multi-picture JPEG named .jpg is not a mismatch.
_SAME_FORMAT = {"MPO": "JPEG", "DIB": "BMP"}

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


@dataclass(frozen=True)
class Listing:
    """Every regular file under a folder: the images used, and the files that are not."""

    images: list[Path]
    ignored: list[Path]  # hidden (a part of the path starts with '.') or not an image extension


def list_images(folder: Path) -> Listing:
    """Recursively sort the regular files under `folder` into images and ignored files (sorted)."""
    images: list[Path] = []
    ignored: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            hidden = not all(_visible(part) for part in p.relative_to(folder).parts)
            (ignored if hidden or p.suffix.lower() not in _EXTENSION_FORMAT else images).append(p)
    return Listing(images, ignored)


def ignored_kinds(files: list[Path], base: Path) -> str:
    """'.txt: 2, no extension: 1, hidden: 3' for the files not used as images."""
    def kind(p: Path) -> str:
        if not all(_visible(part) for part in p.relative_to(base).parts):
            return "hidden"
        return p.suffix.lower() or "no extension"

    return ", ".join(f"{k}: {n}" for k, n in Counter(map(kind, files)).most_common())


def ignored_files_message(base: Path, files: list[Path], examples: int = 3) -> str:
    """One line naming how many files under `base` are not used as images, by extension."""
    shown = ", ".join(str(p.relative_to(base)) for p in files[:examples])
    more = f" and {len(files) - examples} more" if len(files) > examples else ""
    return (f"{base}: {len(files)} file(s) not used as images ({ignored_kinds(files, base)}): {shown}{more}; "
            "only files whose extension Pillow opens as an image are used (.jpg, .jfif, .png, .webp, "
            "... see pipeline.data.IMAGE_EXTENSIONS): rename image files, move other files out")


def _scan_split(root: Path, split: str, class_to_idx: dict[str, int] | None
                ) -> tuple[dict[str, int], list[Sample], list[Path]]:
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
    ignored: list[Path] = []
    empty = []
    for d in dirs:
        listing = list_images(d)
        if not listing.images:
            held = f" ({ignored_kinds(listing.ignored, d)})" if listing.ignored else ""
            empty.append(f"{d.name}{held}")
        samples += [(str(f.relative_to(root)), class_to_idx[d.name]) for f in listing.images]
        ignored += listing.ignored
    if empty:
        raise DataError(
            f"{split_dir}: no image files in class folder(s) {', '.join(empty)}; add images "
            "(extensions Pillow opens, e.g. .jpg, .png, .webp) or remove the folders"
        )
    return class_to_idx, samples, ignored


def build_splits(root: Path, train: str = "train", val: str = "val", test: str | None = None,
                 test_fraction: float = 0.5, seed: int = 0) -> Splits:
    """Scan the image folders and build the train/val/test file lists.

    The carved test split uses scikit-learn's stratified `train_test_split` with `seed`, so the
    same folder and seed always give the same split. Files under class folders that are not used
    (hidden, or not an image extension) are named in one `DataWarning`.

    Raises:
        DataError: missing root or split folder, no classes, fewer than two train classes, class
            folders without images, a val/test class unknown to train, or too few val images per
            class to carve a test split.
    """
    root = Path(root)
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DataError(f"{root}: data root not found{where}; set data.root, or run `make data`")
    class_to_idx, train_s, ignored = _scan_split(root, train, None)
    if len(class_to_idx) < 2:
        raise DataError(
            f"{root / train}: only one class folder, '{next(iter(class_to_idx))}': a classifier needs "
            f"at least two classes; add a folder of images per class ({root / train}/<class>/<image>)"
        )
    _, val_s, more = _scan_split(root, val, class_to_idx)
    ignored += more
    if test is not None:
        _, test_s, more = _scan_split(root, test, class_to_idx)
        ignored += more
        source = f"folder '{test}'"
    else:
        val_s, test_s = _carve(val_s, test_fraction, seed, root / val)
        source = f"carved from '{val}' (test_fraction={test_fraction}, seed={seed}, stratified)"
    if ignored:  # a split named twice (test: val) lists its files twice
        warnings.warn(ignored_files_message(root, list(dict.fromkeys(ignored))), DataWarning, stacklevel=2)
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


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found."""

    reason: str | None  # None: usable; else why not ("empty file", "cannot be decoded (...)")
    format: str | None = None  # Pillow's format of the content (JPEG, PNG, WEBP, ...)
    mismatch: bool = False  # the content is another format than the extension says
    notes: tuple[str, ...] = ()  # one line per warning a library raised while decoding


def _one_line(message: object) -> str:
    return re.sub(r"\s+", " ", str(message)).strip()


@contextlib.contextmanager
def _recorded() -> Iterator[list[str]]:
    """Collect the warnings raised inside (Pillow's "Corrupt EXIF data", ...) as one line each,
    so the caller can name the file they came from instead of letting them reach stderr raw."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    notes += list(dict.fromkeys(_one_line(w.message) for w in caught))


def decode_image(path: Path) -> tuple[Image.Image | None, ImageCheck]:
    """Fully decode one file with `load_rgb`, the check every image gets in training and predict.

    Returns:
        (RGB image or None when unusable, what the check found).
    """
    path = Path(path)
    image, fmt = None, None
    with _recorded() as notes:
        try:
            if path.stat().st_size == 0:
                return None, ImageCheck("empty file")
            with Image.open(path) as img:
                fmt = img.format
            image = load_rgb(path)
        except UnidentifiedImageError:
            return None, ImageCheck("not an image file")
        except Exception as err:  # noqa: BLE001  Pillow's plugins raise many types on corrupt data
            return None, ImageCheck(f"cannot be decoded ({first_line(err)})", fmt)
    expected = _EXTENSION_FORMAT.get(path.suffix.lower())
    mismatch = bool(expected and fmt and _SAME_FORMAT.get(fmt, fmt) != _SAME_FORMAT.get(expected, expected))
    return image, ImageCheck(None, fmt, mismatch, tuple(notes))


def check_image(path: Path) -> str | None:
    """Fully decode one file; return None when it is usable, else the reason (one phrase)."""
    return decode_image(path)[1].reason


class Findings:
    """Collects per-file checks and words them as one-line warnings (`messages`) and one error
    (`unreadable`), the same for the pre-flight scan and `sweep predict`."""

    def __init__(self) -> None:
        self.bad: list[tuple[str, str]] = []  # (name, reason)
        self.mismatched: list[tuple[str, str, str]] = []  # (name, content format, extension)
        self.notes: dict[str, list[str]] = defaultdict(list)  # library message -> names

    def add(self, name: str, check: ImageCheck, extension: str) -> None:
        if check.reason:
            self.bad.append((name, check.reason))
            return
        if check.mismatch:
            self.mismatched.append((name, str(check.format), extension))
        for note in check.notes:
            self.notes[note].append(name)

    def messages(self, where: str, examples: int = 5) -> list[str]:
        """Warnings about usable files: mismatched extensions, then one per library message."""
        def names(items: list[str]) -> str:
            more = f" and {len(items) - examples} more" if len(items) > examples else ""
            return ", ".join(items[:examples]) + more

        out = []
        if self.mismatched:
            listed = [f"{n} is {fmt}" for n, fmt, _ in self.mismatched]
            out.append(f"{where}: {len(listed)} image(s) hold another format than their extension says "
                       f"and are used as decoded: {names(listed)}; rename them to their format's "
                       "extension to silence this")
        for note, files in self.notes.items():
            out.append(f"{where}: while decoding {len(files)} image(s) Pillow warned \"{note}\": "
                       f"{names(files)}; the decoded images are used")
        return out

    def unreadable(self, where: str) -> str:
        """The pre-flight error: every undecodable file and its reason, one per line."""
        listing = "\n  ".join(f"{name}: {why}" for name, why in self.bad)
        return f"{len(self.bad)} unreadable image(s) under {where}:\n  {listing}"


def scan_images(splits: Splits, policy: str = "stop", progress=None) -> Splits:
    """Pre-flight: decode every image of every split once, report all problems in one message.

    Files that decode are used, also when their content is another format than their extension
    says; that, and any warning Pillow raised while decoding, is one `DataWarning` each, naming
    the files.

    Args:
        policy: "stop" raises on any file that does not decode; "skip" drops them and records
            them in `skipped`.
        progress: optional callable(done, total) for a progress display.

    Raises:
        DataError: with policy "stop", listing every undecodable file and its reason.
    """
    samples = splits.train + splits.val + splits.test
    found = Findings()
    for i, (rel, _) in enumerate(samples):
        found.add(str(splits.root / rel), decode_image(splits.root / rel)[1], Path(rel).suffix)
        if progress:
            progress(i + 1, len(samples))
    for message in found.messages(str(splits.root)):
        warnings.warn(message, DataWarning, stacklevel=2)
    if not found.bad:
        return splits
    if policy == "stop":
        raise DataError(f"{found.unreadable(str(splits.root))}\n"
                        "Fix or remove them, or set data.bad_images: skip to train without them")
    result = without(splits, [str(Path(name).relative_to(splits.root)) for name, _ in found.bad])
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the pre-flight scan named them once already
                image = load_rgb(self.root / rel)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{self.root / rel}: cannot be decoded mid-training ({err})") from None
        return self.transform(image), label


class TrainBatches(Sampler[list[int]]):
    """Batches of `batch_size` indices from `sampler`, except that a last batch of one index is
    merged into the one before it.

    A train batch of one image fails every BatchNorm layer whose output is 1x1 ("Expected more
    than 1 value per channel when training") and otherwise trains on one image's statistics, so
    how the data divides into batches must not decide whether a trial runs. Merging (a batch of
    `batch_size + 1`) keeps every image in every epoch, unlike `drop_last`.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int):
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.size = len(sampler)  # type: ignore[arg-type]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        previous: list[int] | None = None
        for batch in self.batches:
            if previous is not None and len(batch) == 1:
                batch = previous + batch
            elif previous is not None:
                yield previous
            previous = batch
        if previous is not None:
            yield previous

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (rest > 1 or (rest == 1 and full == 0))


def make_loader(root: Path, samples: list[Sample], transform, batch_size: int, num_workers: int,
                shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over `samples`; shuffling is seeded so a trial's batch order is reproducible.

    `shuffle=True` is the train loader: its batches come from `TrainBatches`, so no train batch
    holds a single image (when there are two or more). Eval loaders keep plain batches.
    """
    return loader(ImageList(root, samples, transform), batch_size, num_workers, shuffle, seed)


def loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over any (image, label) dataset, seeded like `make_loader`: the same
    `batch_size`, `shuffle` and `seed` give the same batch order whatever the dataset holds.
    Shuffled (train) loaders never end on a batch of one image (`TrainBatches`)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset, batch_sampler=TrainBatches(sampler, batch_size) if shuffle else
        BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=num_workers, generator=generator, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
