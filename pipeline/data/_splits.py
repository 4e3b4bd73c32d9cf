"""Splits, class map, the pre-flight image scan and loaders.

Folder layout (torchvision ImageFolder): `root/{train,val[,test]}/<class>/<image>`.
`class_to_idx` comes from train alone (sorted class folder names) and is reused for val and test;
train needs at least two classes. Hidden entries (names starting with '.') and plain files at
class level are not classes.
Without a test folder, a stratified, seeded share (`test_fraction`) of val becomes the sealed
test split; every split's file list is kept in `Splits` so it can be recorded and reproduced.
Which files are images and how they decode: pipeline/imagefiles.py; transforms: pipeline/transforms.py.
"""

from __future__ import annotations

import json
from collections import Counter
import warnings
from collections.abc import Callable, Iterator, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from PIL import Image
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from pipeline.core import DataError, cpu_cores
from pipeline.data._imagefiles import DataWarning, ImageCheck, per_thread_warnings
from pipeline.data._imagefiles import Findings
from pipeline.data._imagefiles import decode_image
from pipeline.data._imagefiles import ignored_files_message
from pipeline.data._imagefiles import ignored_kinds
from pipeline.data._imagefiles import list_images
from pipeline.data._imagefiles import load_rgb
from pipeline.data._imagefiles import visible
from pipeline.data._transforms import Transform

Sample = tuple[str, int]  # (path relative to data root, class index)


@dataclass(frozen=True)
class Splits:
    """File lists of the three splits; paths are relative to `root`."""

    root: Path
    class_to_idx: dict[str, int]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    test_source: str  # "folder '<name>'" or "carved from val (fraction, seed)"; "; val carved from ..." when val was
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


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and visible(p.name))


def _scan_split(
    root: Path, split: str, class_to_idx: dict[str, int] | None
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


def build_splits(
    root: Path,
    train: str = "train",
    val: str | None = "val",
    test: str | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Splits:
    """Scan the image folders and build the train/val/test file lists.

    `val` None (one folder of labelled images, no split yet): a `val_fraction` share of train is
    held out as val. `test` None: a `test_fraction` share of val is sealed as test. Both carves use
    scikit-learn's stratified `train_test_split` with `seed`, so the same folder and seed always
    give the same split. Files under class folders that are not used (hidden, or not an image
    extension) are named in one `DataWarning`.

    Raises:
        DataError: missing root or split folder, no classes, fewer than two train classes, class
            folders without images, a val/test class unknown to train, or too few val images per
            class to carve a test split.
    """
    root = Path(root)
    if not root.is_dir():
        where = "" if root.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        shipped = ", or run `make data` (it links the shipped images)" if root.name == "hymenoptera_data" else ""
        raise DataError(f"{root}: data root not found{where}; set data.root to your image folder{shipped}")
    class_to_idx, train_s, ignored = _scan_split(root, train, None)
    if len(class_to_idx) < 2:
        raise DataError(
            f"{root / train}: only one class folder, '{next(iter(class_to_idx))}': a classifier needs "
            f"at least two classes; add a folder of images per class ({root / train}/<class>/<image>)"
        )
    if val is not None:
        _, val_s, more = _scan_split(root, val, class_to_idx)
        ignored += more
        val_from = f"'{val}'"
    else:
        train_s, val_s = _carve(train_s, val_fraction, seed, root / train, "val", "data.val_fraction")
        val_from = "val"
    if test is not None:
        _, test_s, more = _scan_split(root, test, class_to_idx)
        ignored += more
        source = f"folder '{test}'"
    else:
        val_s, test_s = _carve(
            val_s, test_fraction, seed, root / (val or train), "test", "data.test_fraction", "" if val else "val share"
        )
        source = f"carved from {val_from} (test_fraction={test_fraction}, seed={seed}, stratified)"
    if val is None:
        source += f"; val carved from '{train}' (val_fraction={val_fraction}, seed={seed}, stratified)"
    if ignored:  # a split named twice (test: val) lists its files twice
        warnings.warn(ignored_files_message(root, list(dict.fromkeys(ignored))), DataWarning, stacklevel=2)
    return Splits(root, class_to_idx, train_s, val_s, test_s, source)


def _carve(
    samples: list[Sample], fraction: float, seed: int, where: Path, split: str, key: str, share: str = ""
) -> tuple[list[Sample], list[Sample]]:
    """(kept, carved): a stratified, seeded `fraction` of `samples` carved out as `split`.
    `share`: what `samples` are when not a folder ("val share": test carved from carved val).

    Raises:
        DataError: naming `where`, the `key` of the fraction and what to do, when a class holds
            one image or the share is too small to hold every class.
    """
    from sklearn.model_selection import train_test_split

    labels = [y for _, y in samples]
    counts = Counter(Path(rel).parent.name for rel, _ in samples)
    rare = sorted(c for c, n in counts.items() if n < 2)
    folder = "a val folder (data.val)" if split == "val" else "a test folder (data.test)"
    if rare:
        raise DataError(
            f"{where}: cannot carve a stratified {split} split ({key} {fraction}): class folder(s) "
            f"{', '.join(rare)} hold 1 image{' in the ' + share if share else ''}, a stratified split needs at "
            f"least 2 per class. Add images there, add {folder}, or remove the class"
        )
    try:
        keep, sealed = train_test_split(samples, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as err:
        raise DataError(
            f"{where}: cannot carve a stratified {split} split with {key.split('.')[-1]}={fraction}: {err}. "
            f"Add images, add {folder}, or change {key}"
        ) from None
    return sorted(map(tuple, keep)), sorted(map(tuple, sealed))


def without(splits: Splits, bad: list[str]) -> Splits:
    """`splits` minus the files in `bad` (paths relative to root), which are recorded as skipped."""
    drop = set(bad)

    def keep(samples: list[Sample]) -> list[Sample]:
        return [s for s in samples if s[0] not in drop]

    return Splits(
        splits.root,
        splits.class_to_idx,
        keep(splits.train),
        keep(splits.val),
        keep(splits.test),
        splits.test_source,
        sorted(drop | set(splits.skipped)),
    )


PARALLEL_FROM = 64  # files; below this a thread pool costs more than it saves


def checked(root: Path, rels: list[str], threads: int | None = None) -> Iterator[ImageCheck]:
    """`decode_image(root / rel)`'s check of each file, in order, decoded by `threads` threads at
    once (default: one per core; Pillow decodes without holding the GIL).

    Measured on hymenoptera JPEGs (the `scale` benchmark suite): 2 threads on 2 cores scan
    about 1.8 times as many files per second as one.
    """
    threads = threads or cpu_cores()
    if threads == 1 or len(rels) < PARALLEL_FROM:
        yield from (decode_image(root / rel)[1] for rel in rels)
        return
    with per_thread_warnings(), ThreadPoolExecutor(threads, thread_name_prefix="scan") as pool:
        yield from pool.map(lambda rel: decode_image(root / rel)[1], rels, chunksize=1)


def scan_images(splits: Splits, policy: str = "stop", progress: Callable[[int, int], None] | None = None) -> Splits:
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
    for i, ((rel, _), check) in enumerate(zip(samples, checked(splits.root, [r for r, _ in samples]))):
        found.add(str(splits.root / rel), check, Path(rel).suffix)
        if progress:
            progress(i + 1, len(samples))
    for message in found.messages(str(splits.root)):
        warnings.warn(message, DataWarning, stacklevel=2)
    if not found.bad:
        return splits
    if policy == "stop":
        raise DataError(
            f"{found.unreadable(str(splits.root))}\n"
            "Fix or remove them, or set data.bad_images: skip to train without them"
        )
    result = without(splits, [str(Path(name).relative_to(splits.root)) for name, _ in found.bad])
    for split in ("train", "val", "test"):
        if not getattr(result, split):
            raise DataError(f"{splits.root}: every image of the {split} split is unreadable")
    # A class left with no train image would still get an output unit that never trains.
    left = {y for _, y in result.train}
    gone = [c for c, i in result.class_to_idx.items() if i not in left]
    if gone:
        raise DataError(
            f"{splits.root}: every train image of class(es) {', '.join(gone)} is "
            "unreadable; fix the files or remove the class"
        )
    return result


class ImageList(Dataset):
    """(image, label) pairs from a sample list; images decoded by `load_rgb`."""

    def __init__(self, root: Path, samples: list[Sample], transform: Transform) -> None:
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


def make_loader(
    root: Path,
    samples: list[Sample],
    transform: Transform,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
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
    # torch's Dataset declares no __len__; every dataset given here (ImageList, CachedImageList,
    # cached features) has one, and the samplers need it.
    sized = cast(Sized, dataset)
    sampler = RandomSampler(sized, generator=generator) if shuffle else SequentialSampler(sized)
    return DataLoader(
        dataset,
        batch_sampler=TrainBatches(sampler, batch_size)
        if shuffle
        else BatchSampler(sampler, batch_size, drop_last=False),
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
