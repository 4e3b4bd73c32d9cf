"""Splits and class map, image decoding, the pre-flight scan, transforms and loaders, on tiny
32 px images written by each test (plus the one palette GIF of the real data)."""

from __future__ import annotations

import io
import json
import math
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pipeline.core import DataError
from pipeline.data import _imagefiles as IMG
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX

from conftest import COLOURS, HYMENOPTERA, make_folder, write_image

PP = TX.Preprocess(resize=37, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


# ---- class map and folder rules -----------------------------------------------------------------


def test_class_to_idx_from_train_only_and_reused(tmp_path):
    # train has three classes, val two: indices come from train's sorted names, val reuses them.
    root = make_folder(tmp_path, {"train": 2}, classes=("ants", "bees", "wasps"))
    make_folder(tmp_path, {"val": 2}, classes=("bees", "wasps"))
    with pytest.warns(UserWarning):
        splits = D.build_splits(root, test="val")
    assert splits.class_to_idx == {"ants": 0, "bees": 1, "wasps": 2}
    assert splits.classes == ["ants", "bees", "wasps"]
    assert splits.val == [
        ("val/bees/img_0.png", 1),
        ("val/bees/img_1.png", 1),
        ("val/wasps/img_0.png", 2),
        ("val/wasps/img_1.png", 2),
    ]
    assert splits.test_source == "folder 'val'"


def test_hidden_entries_and_plain_files_are_not_classes(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2})
    write_image(root / "train" / ".ipynb_checkpoints" / "x.png", COLOURS["ants"])  # hidden dir
    (root / "train" / ".DS_Store").write_bytes(b"\0\1")  # hidden file
    (root / "train" / "README.txt").write_text("not a class")  # plain file
    write_image(root / "train" / "ants" / ".hidden.png", COLOURS["ants"])  # hidden image
    write_image(root / "train" / "ants" / ".cache" / "y.png", COLOURS["ants"])  # hidden subdir
    (root / "train" / "ants" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "ants" / "more" / "deep.PNG", COLOURS["ants"])  # nested, upper-case
    with pytest.warns(IMG.DataWarning) as record:
        splits = D.build_splits(root, test="val")
    assert splits.class_to_idx == {"ants": 0, "bees": 1}
    assert splits.train == [
        ("train/ants/img_0.png", 0),
        ("train/ants/img_1.png", 0),
        ("train/ants/more/deep.PNG", 0),
        ("train/bees/img_0.png", 1),
        ("train/bees/img_1.png", 1),
    ]
    # Every file under a class folder is used or counted: one warning, by extension.
    assert [str(w.message) for w in record] == [
        (
            f"{root}: 3 file(s) not used as images (hidden: 2, .txt: 1): train/ants/.cache/y.png, "
            "train/ants/.hidden.png, train/ants/notes.txt; only files whose extension Pillow opens as an "
            "image are used (.jpg, .jfif, .png, .webp, ... see pipeline.data.IMAGE_EXTENSIONS): rename "
            "image files, move other files out"
        )
    ]


def test_every_extension_pillow_opens_is_used_and_the_rest_named_in_one_warning(tmp_path):
    # The users' input: 20 train images of which 8 are JPEG data named .jfif or .jpe.
    root = make_folder(tmp_path, {"train": 6, "val": 2})
    for i in range(4):
        write_image(root / "train" / "ants" / f"extra_{i}.jfif", COLOURS["ants"], seed=50 + i, fmt="JPEG")
        write_image(root / "train" / "bees" / f"extra_{i}.JPE", COLOURS["bees"], seed=60 + i, fmt="JPEG")
    for name in ("notes.txt", "labels.txt", "meta.json", "README"):
        (root / "train" / "bees" / name).write_text("x")
    (root / "val" / "ants" / "clip.mp4").write_bytes(b"\0" * 8)
    with pytest.warns(IMG.DataWarning) as record:
        splits = D.build_splits(root, test="val")
    assert len(splits.train) == 20
    assert [s for s in splits.train if s[0].endswith((".jfif", ".JPE"))] == (
        [(f"train/ants/extra_{i}.jfif", 0) for i in range(4)] + [(f"train/bees/extra_{i}.JPE", 1) for i in range(4)]
    )
    assert [str(w.message) for w in record] == [
        (
            f"{root}: 5 file(s) not used as images (.txt: 2, no extension: 1, .json: 1, .mp4: 1): "
            "train/bees/README, train/bees/labels.txt, train/bees/meta.json and 2 more; only files whose "
            "extension Pillow opens as an image are used (.jpg, .jfif, .png, .webp, ... see "
            "pipeline.data.IMAGE_EXTENSIONS): rename image files, move other files out"
        )
    ]
    assert D.scan_images(splits) is splits  # and they decode


def test_image_extensions_are_the_formats_pillow_opens():
    for ext in (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".tif", ".bmp", ".gif", ".mpo"):
        assert ext in IMG.IMAGE_EXTENSIONS, ext
    for ext in (".pdf", ".mpg", ".h5", ".wmf", ".txt"):  # save-only, video, stubs, text
        assert ext not in IMG.IMAGE_EXTENSIONS, ext


def test_one_class_only_is_refused_naming_it(tmp_path):
    root = make_folder(tmp_path, {"train": 4, "val": 4}, classes=("ants",))
    with pytest.raises(DataError) as info:
        D.build_splits(root)
    assert str(info.value) == (
        f"{root / 'train'}: only one class folder, 'ants': a classifier needs at least two classes; "
        f"add a folder of images per class ({root / 'train'}/<class>/<image>)"
    )


def test_val_class_missing_from_train_is_named(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2})
    write_image(root / "val" / "wasps" / "a.png", COLOURS["wasps"])
    with pytest.raises(DataError) as info:
        D.build_splits(root)
    assert str(info.value) == (
        f"{root / 'val'}: class folder(s) wasps not in train (train classes: ants, bees); "
        "add them to train or remove them"
    )


def test_class_missing_from_val_warns(tmp_path):
    root = make_folder(tmp_path, {"train": 2}, classes=("ants", "bees", "wasps"))
    make_folder(tmp_path, {"val": 4}, classes=("ants", "bees"))
    with pytest.warns(UserWarning) as record:
        splits = D.build_splits(root)
    assert [str(w.message) for w in record] == [f"{root / 'val'}: no folder for class(es) wasps"]
    assert len(splits.val) + len(splits.test) == 8


def test_empty_class_folders_are_named(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2}, classes=("ants",))
    (root / "train" / "bees").mkdir()
    (root / "train" / "wasps").mkdir()
    (root / "train" / "wasps" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        D.build_splits(root)
    assert str(info.value) == (
        f"{root / 'train'}: no image files in class folder(s) bees, wasps (.txt: 1); add images "
        "(extensions Pillow opens, e.g. .jpg, .png, .webp) or remove the folders"
    )


def test_missing_split_folder(tmp_path):
    root = make_folder(tmp_path, {"train": 2})
    with pytest.raises(DataError) as info:
        D.build_splits(root)
    assert str(info.value) == (f"{root / 'val'}: split folder not found (expected {root}/val/<class>/<image>)")


def test_missing_test_folder_when_named(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2})
    with pytest.raises(DataError, match=r"/test: split folder not found"):
        D.build_splits(root, test="test")


def test_missing_root(tmp_path):
    with pytest.raises(DataError) as info:
        D.build_splits(tmp_path / "nowhere")
    assert str(info.value) == f"{tmp_path / 'nowhere'}: data root not found; set data.root to your image folder"
    with pytest.raises(DataError) as info:
        D.build_splits(tmp_path / "data" / "hymenoptera_data")
    assert str(info.value).endswith("set data.root to your image folder, or run `make data` (it links the shipped images)")


def test_split_without_class_folders(tmp_path):
    root = make_folder(tmp_path, {"train": 2})
    (root / "val").mkdir()
    write_image(root / "val" / "loose.png", COLOURS["ants"])  # an image, but not in a class folder
    with pytest.raises(DataError) as info:
        D.build_splits(root)
    assert str(info.value) == f"{root / 'val'}: no class folders (expected {root / 'val'}/<class>/<image>)"


# ---- the carved test split ----------------------------------------------------------------------


@pytest.fixture
def uneven(tmp_path) -> Path:
    """val: 8 ants, 4 bees, so stratification is visible in the counts."""
    root = make_folder(tmp_path, {"train": 2})
    make_folder(tmp_path, {"val": 8}, classes=("ants",))
    make_folder(tmp_path, {"val": 4}, classes=("bees",))
    return root


def test_carved_test_split_is_stratified_with_the_right_fraction(uneven):
    splits = D.build_splits(uneven, test_fraction=0.25, seed=0)
    assert Counter(y for _, y in splits.test) == {0: 2, 1: 1}  # 12 * 0.25 = 3, in the 2:1 ratio
    assert Counter(y for _, y in splits.val) == {0: 6, 1: 3}
    assert splits.test_source == "carved from 'val' (test_fraction=0.25, seed=0, stratified)"


def test_carved_split_is_disjoint_from_val_and_covers_it(uneven):
    whole = D.build_splits(uneven, test="val").val  # val listed as a folder: every file
    splits = D.build_splits(uneven, test_fraction=0.5, seed=0)
    assert not set(splits.val) & set(splits.test)
    assert sorted(splits.val + splits.test) == whole
    assert len(splits.test) == 6


def test_carved_split_is_seeded(uneven):
    first = D.build_splits(uneven, test_fraction=0.5, seed=0)
    again = D.build_splits(uneven, test_fraction=0.5, seed=0)
    other = D.build_splits(uneven, test_fraction=0.5, seed=1)
    assert (first.val, first.test) == (again.val, again.test)
    assert first.test != other.test
    assert Counter(y for _, y in other.test) == Counter(y for _, y in first.test)


def test_too_few_val_images_to_carve(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2})
    with pytest.raises(DataError) as info:
        D.build_splits(root, test_fraction=0.1)
    assert str(info.value) == (
        f"{root / 'val'}: cannot carve a stratified test split with test_fraction=0.1: The test_size "
        "= 1 should be greater or equal to the number of classes = 2. Add images, add a test "
        "folder (data.test), or change data.test_fraction"
    )


def test_one_folder_of_labelled_images_gets_stratified_seeded_val_and_test(tmp_path):
    # The most common layout: one folder per class, no split yet (train: ., val: null, test: null).
    root = make_folder(tmp_path / "mine", {"all": 10}, classes=("ants", "bees", "wasps"))
    for cls in ("ants", "bees", "wasps"):
        (root / "all" / cls).rename(root / cls)
    (root / "all").rmdir()
    splits = D.build_splits(root, train=".", val=None, test=None, test_fraction=0.5, seed=0, val_fraction=0.2)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [24, 3, 3]
    assert all(Counter(y for _, y in part) == Counter({0: 1, 1: 1, 2: 1}) for part in (splits.val, splits.test))
    everything = splits.train + splits.val + splits.test
    assert len({rel for rel, _ in everything}) == 30  # disjoint, and every image used once
    assert splits.test_source == (
        "carved from val (test_fraction=0.5, seed=0, stratified); "
        "val carved from '.' (val_fraction=0.2, seed=0, stratified)"
    )
    again = D.build_splits(root, train=".", val=None, seed=0)
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)
    other = D.build_splits(root, train=".", val=None, seed=1)
    assert other.val != splits.val


def test_a_class_with_one_val_image_is_named_by_its_folder(tmp_path):
    # A user's report: sklearn's "Classes with too few members are: [2]" named a class index.
    root = make_folder(tmp_path, {"train": 2, "val": 3}, classes=("ants", "bees", "wasps"))
    for extra in ("img_1.png", "img_2.png"):
        (root / "val" / "wasps" / extra).unlink()
    with pytest.raises(DataError) as info:
        D.build_splits(root, test_fraction=0.5)
    assert str(info.value) == (
        f"{root / 'val'}: cannot carve a stratified test split (data.test_fraction 0.5): class folder(s) "
        "wasps hold 1 image, a stratified split needs at least 2 per class. Add images there, add a test "
        "folder (data.test), or remove the class"
    )


def test_to_json_round_trips_the_lists(uneven):
    splits = D.build_splits(uneven, test_fraction=0.25, seed=3)
    record = json.loads(splits.to_json())
    assert record["root"] == str(uneven)
    assert record["class_to_idx"] == {"ants": 0, "bees": 1}
    assert record["counts"] == {"train": 4, "val": 9, "test": 3}
    for split in ("train", "val", "test"):
        assert [tuple(s) for s in record[split]] == getattr(splits, split)
    assert record["test_source"] == splits.test_source and record["skipped"] == []


# ---- decoding -----------------------------------------------------------------------------------


def _rgb(path: Path) -> np.ndarray:
    image = IMG.load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_load_rgb_grayscale(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "g.png")
    pixels = _rgb(tmp_path / "g.png")
    assert pixels.shape == (3, 4, 3) and (pixels == 77).all()


def test_load_rgb_palette_without_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert (_rgb(tmp_path / "p.png") == (0, 255, 0)).all()


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_load_rgb_palette_with_transparency_on_white(tmp_path, ext):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0  # index 0 (red) is transparent
    image.save(tmp_path / f"p{ext}")
    pixels = _rgb(tmp_path / f"p{ext}")
    assert tuple(pixels[0, 0]) == (0, 255, 0)
    assert tuple(pixels[1, 1]) == (255, 255, 255)


def test_load_rgb_rgba_composited_on_white(tmp_path):
    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(tmp_path / "a.png")
    # 0 * 128/255 + 255 * 127/255 = 127 for green and blue
    assert tuple(_rgb(tmp_path / "a.png")[0, 0]) == (255, 127, 127)


def test_load_rgb_cmyk(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert tuple(_rgb(tmp_path / "c.jpg")[4, 4]) == (255, 0, 0)


def test_load_rgb_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = _rgb(tmp_path / "deep.png")
    assert (pixels[..., 0] == values >> 8).all() and (pixels[..., 2] == values >> 8).all()


def test_load_rgb_16_bit_big_endian_tiff(tmp_path):
    # 16-bit TIFFs open as 'I;16B', which PIL's point() cannot map directly.
    values = (np.arange(64).reshape(8, 8) * 1000).astype(">u2")
    Image.frombytes("I;16B", (8, 8), values.tobytes()).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I;16B"
    assert (_rgb(tmp_path / "deep.tif")[..., 1] == values.astype(int) >> 8).all()
    assert IMG.check_image(tmp_path / "deep.tif") is None


def test_load_rgb_applies_exif_rotation(tmp_path):
    # 40x20 stored: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    rotated = IMG.load_rgb(tmp_path / "r.jpg")
    assert rotated.size == (20, 40)
    pixels = np.asarray(rotated).astype(int)
    assert np.abs(pixels[5, 10] - (255, 0, 0)).max() < 30  # red now on top
    assert np.abs(pixels[35, 10] - (0, 0, 255)).max() < 30  # blue below


def test_real_palette_gif_passes_check_image():
    gif = HYMENOPTERA / "train" / "ants" / "imageNotFound.gif"
    assert Image.open(gif).mode == "P"
    assert IMG.check_image(gif) is None
    assert IMG.load_rgb(gif).size == (300, 300)


# ---- the pre-flight scan ------------------------------------------------------------------------


@pytest.fixture
def with_bad_files(tmp_path) -> tuple[Path, dict[str, str]]:
    """A folder with one bad file of each kind, in train and test; returns (root, path -> reason)
    in scan order (train, val, test)."""
    root = make_folder(tmp_path, {"train": 3, "val": 2, "test": 2})
    good = (root / "train" / "ants" / "img_0.png").read_bytes()
    (root / "train" / "ants" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "bees" / "empty.png").write_bytes(b"")
    (root / "test" / "ants" / "text.jpg").write_text("this is not an image")
    return root, {
        "train/ants/truncated.png": "cannot be decoded (image file is truncated)",
        "train/bees/empty.png": "empty file",
        "test/ants/text.jpg": "not an image file",
    }


def test_check_image_reasons(with_bad_files):
    root, bad = with_bad_files
    for rel, reason in bad.items():
        assert IMG.check_image(root / rel) == reason, rel
    assert IMG.check_image(root / "train" / "ants" / "img_0.png") is None


def test_check_image_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert IMG.check_image(tmp_path / "t.jpg").startswith("cannot be decoded (image file is truncated")


def test_check_image_decompression_bomb_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    write_image(tmp_path / "big.png", COLOURS["ants"])  # 1024 px > 2 * 100: PIL refuses it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert IMG.check_image(tmp_path / "big.png").startswith("cannot be decoded (Image size (1024 pixels)")


def test_scan_images_stop_lists_every_bad_file_in_one_message(with_bad_files):
    root, bad = with_bad_files
    splits = D.build_splits(root, test="test")
    seen = []
    with pytest.raises(DataError) as info:
        D.scan_images(splits, "stop", progress=lambda done, total: seen.append((done, total)))
    listing = "\n  ".join(f"{root / rel}: {why}" for rel, why in bad.items())
    assert str(info.value) == (
        f"3 unreadable image(s) under {root}:\n  {listing}\n"
        "Fix or remove them, or set data.bad_images: skip to train without them"
    )
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_scan_images_skip_drops_and_records(with_bad_files):
    root, bad = with_bad_files
    splits = D.build_splits(root, test="test")
    kept = D.scan_images(splits, "skip")
    assert kept.skipped == sorted(bad)
    for split in ("train", "val", "test"):
        expected = [s for s in getattr(splits, split) if s[0] not in bad]
        assert getattr(kept, split) == expected
    assert (len(kept.train), len(kept.val), len(kept.test)) == (6, 4, 4)
    assert json.loads(kept.to_json())["skipped"] == sorted(bad)


def test_scan_images_clean_data_is_unchanged(image_root):
    splits = D.build_splits(image_root)
    assert D.scan_images(splits, "stop") is splits


def test_scan_images_skip_refuses_a_class_left_without_train_images(tmp_path):
    root = make_folder(tmp_path, {"train": 1, "val": 2})
    (root / "train" / "bees" / "img_0.png").write_bytes(b"")
    splits = D.build_splits(root, test="val")
    with pytest.raises(DataError) as info:
        D.scan_images(splits, "skip")
    assert str(info.value) == (
        f"{root}: every train image of class(es) bees is unreadable; fix the files or remove the class"
    )


def test_content_in_another_format_than_the_extension_is_used_with_one_warning(tmp_path):
    # Scraped data: a WEBP and a PNG named .jpg decode fine, so they train (not "unreadable").
    root = make_folder(tmp_path, {"train": 3, "val": 2})
    write_image(root / "train" / "ants" / "scraped.jpg", COLOURS["ants"], fmt="WEBP")
    write_image(root / "train" / "bees" / "scraped.jpg", COLOURS["bees"], fmt="PNG")
    writeable = D.build_splits(root, test="val")
    with pytest.warns(IMG.DataWarning) as record:
        kept = D.scan_images(writeable, "stop")
    assert kept is writeable and ("train/ants/scraped.jpg", 0) in kept.train
    assert IMG.check_image(root / "train" / "ants" / "scraped.jpg") is None
    assert [str(w.message) for w in record] == [
        (
            f"{root}: 2 image(s) hold another format than their extension says and are used as decoded: "
            f"{root}/train/ants/scraped.jpg is WEBP, {root}/train/bees/scraped.jpg is PNG; rename them to "
            "their format's extension to silence this"
        )
    ]


def _corrupt_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block announces two IFD entries but holds one."""
    tiff = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 2) + struct.pack("<HHI4s", 0x0112, 3, 1, b"\1\0\0\0")
    Image.new("RGB", (32, 32), COLOURS["ants"]).save(path, exif=b"Exif\0\0" + tiff)
    return path


def test_pillow_warnings_become_one_line_naming_the_files(tmp_path):
    root = make_folder(tmp_path, {"train": 2, "val": 2})
    _corrupt_exif_jpeg(root / "train" / "ants" / "exif.jpg")
    _corrupt_exif_jpeg(root / "val" / "bees" / "exif.jpg")
    splits = D.build_splits(root, test="val")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert D.scan_images(splits, "stop") is splits
    # Only the product's warning: Pillow's own never reaches the terminal (val is scanned twice as
    # val and test here, so the val file is named twice).
    assert [(w.category, str(w.message)) for w in record] == [
        (
            IMG.DataWarning,
            (
                f'{root}: while decoding 3 image(s) Pillow warned "Corrupt EXIF data. Expecting to read 12 '
                f'bytes but only got 0.": {root}/train/ants/exif.jpg, {root}/val/bees/exif.jpg, '
                f"{root}/val/bees/exif.jpg; the decoded images are used"
            ),
        )
    ]


def test_a_threaded_scan_finds_what_one_thread_finds_in_the_same_order(tmp_path, monkeypatch):
    # Enough files for the thread pool (PARALLEL_FROM); warnings and bad files spread across it.
    root = make_folder(tmp_path, {"train": 40, "val": 30}, size=16)
    for i in (3, 17, 38):
        _corrupt_exif_jpeg(root / "train" / "ants" / f"exif_{i}.jpg")
    good = (root / "train" / "bees" / "img_0.png").read_bytes()
    (root / "train" / "bees" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "val" / "ants" / "empty.png").write_bytes(b"")
    splits = D.build_splits(root, test="val")
    assert len(splits.train + splits.val + splits.test) >= 2 * D.PARALLEL_FROM

    def scan(threads: int) -> tuple[list[str], str, list[tuple[int, int]]]:
        monkeypatch.setattr(D, "cpu_cores", lambda: threads)
        seen: list[tuple[int, int]] = []
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with pytest.raises(DataError) as info:
                D.scan_images(splits, "stop", lambda done, total: seen.append((done, total)))
        return [str(w.message) for w in record], str(info.value), seen

    one, many = scan(1), scan(4)
    assert many == one
    messages, error, seen = many
    assert [x for x, _ in seen] == list(range(1, len(seen) + 1))  # progress counts up in order
    assert messages == [
        (
            f'{root}: while decoding 3 image(s) Pillow warned "Corrupt EXIF data. Expecting to read 12 '
            f'bytes but only got 0.": {root}/train/ants/exif_17.jpg, {root}/train/ants/exif_3.jpg, '
            f"{root}/train/ants/exif_38.jpg; the decoded images are used"
        )
    ]
    assert error.splitlines()[:2] == [
        f"3 unreadable image(s) under {root}:",
        f"  {root}/train/bees/truncated.png: cannot be decoded (image file is truncated)",
    ]


# ---- transforms ---------------------------------------------------------------------------------


def _photo(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_eval_transform_output():
    out = TX.eval_transform(PP)(_photo())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # resize short side 40 -> 37 (48 -> 44), centre crop 32, normalise with mean 0.5 std 0.25
    resized = _photo().resize((44, 37), Image.Resampling.BILINEAR)  # PIL resizes PIL images
    expected = T.functional.to_dtype(
        T.functional.to_image(T.functional.center_crop(resized, 32)), torch.float32, scale=True
    )
    assert torch.allclose(out, (expected - 0.5) / 0.25)


def test_train_transform_at_zero_is_exactly_eval():
    image = _photo(seed=1)
    torch.manual_seed(0)
    assert torch.equal(TX.train_transform(PP, 0)(image), TX.eval_transform(PP)(image))


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_train_transform_output_shape(strength):
    torch.manual_seed(0)
    out = TX.train_transform(PP, strength)(_photo(size=(64, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def _parts(strength):
    parts = {type(t).__name__: t for t in TX.train_transform(PP, strength).transforms}
    return parts["RandomResizedCrop"], parts["RandomHorizontalFlip"], parts["ColorJitter"]


def test_train_transform_at_one_is_the_seed_recipe():
    crop, flip, jitter = _parts(1.0)
    assert crop.scale == (0.08, 1.0)
    assert crop.ratio == (3 / 4, 4 / 3)
    assert crop.size == (32, 32)
    assert flip.p == 0.5
    assert jitter.brightness == (0.6, 1.4)


def test_augmentation_map_is_monotone():
    strengths = [0.1, 0.25, 0.5, 0.75, 1.0]
    crops, flips, jitters = zip(*(_parts(s) for s in strengths), strict=True)
    lows = [c.scale[0] for c in crops]
    assert lows == sorted(lows, reverse=True) and len(set(lows)) == len(lows)
    assert [c.ratio[0] for c in crops] == sorted((c.ratio[0] for c in crops), reverse=True)
    assert [c.ratio[1] for c in crops] == sorted(c.ratio[1] for c in crops)
    assert [f.p for f in flips] == sorted(f.p for f in flips)
    assert [j.brightness[1] for j in jitters] == sorted(j.brightness[1] for j in jitters)
    assert lows[0] == pytest.approx(1 - 0.92 * 0.1)


def test_train_transform_rejects_strength_out_of_range():
    with pytest.raises(ValueError, match=r"^aug_strength must be in \[0, 1\], got 1.5$"):
        TX.train_transform(PP, 1.5)


def test_preprocess_to_dict():
    assert PP.to_dict() == {
        "resize": 37,
        "crop": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
    }


# ---- loaders ------------------------------------------------------------------------------------


def test_make_loader_batches(image_root):
    splits = D.build_splits(image_root, test="val")
    loader = D.make_loader(image_root, splits.train, TX.eval_transform(PP), batch_size=5, num_workers=0, shuffle=False)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 5, 1]
    images, labels = batches[0]
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 0, 0]
    assert torch.cat([y for _, y in batches]).tolist() == [0] * 8 + [1] * 8


def test_make_loader_shuffle_is_seeded(image_root):
    splits = D.build_splits(image_root, test="val")

    def order(seed):
        loader = D.make_loader(image_root, splits.train, TX.eval_transform(PP), 16, 0, True, seed)
        images, labels = next(iter(loader))
        return labels.tolist(), images

    (a, xa), (b, xb), (c, _) = order(0), order(0), order(1)
    assert a == b and torch.equal(xa, xb)
    assert a != c and sorted(a) == sorted(c) == [0] * 8 + [1] * 8


def _sizes(loader) -> list[int]:
    return [len(y) for _, y in loader]


@pytest.mark.parametrize("n, expected", [(9, [9]), (17, [8, 9]), (16, [8, 8]), (10, [8, 2]), (1, [1])])
def test_train_loader_never_ends_with_a_batch_of_one(tmp_path, n, expected):
    root = make_folder(tmp_path, {"train": 1})
    samples = [("train/ants/img_0.png", 0)] * n
    train = D.make_loader(root, samples, TX.eval_transform(PP), 8, 0, shuffle=True)
    assert _sizes(train) == expected and len(train) == len(expected)
    # eval loaders keep plain batches (no gradient, BatchNorm uses its running statistics)
    plain = [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert _sizes(D.make_loader(root, samples, TX.eval_transform(PP), 8, 0, shuffle=False)) == plain


def test_merged_last_batch_still_sees_every_image_once_per_epoch(image_root):
    splits = D.build_splits(image_root, test="val")
    samples = splits.train[:9]
    loader = D.make_loader(image_root, samples, TX.eval_transform(PP), 4, 0, shuffle=True, seed=3)
    labels = [y.tolist() for _, y in loader]
    assert [len(b) for b in labels] == [4, 5]
    assert sorted(y for batch in labels for y in batch) == sorted(y for _, y in samples)


def test_nine_train_images_in_batches_of_eight_train_a_batchnorm_net(tmp_path):
    # The users' input: 9 train images, batch_size 8, 32 px, ResNet-18 (BatchNorm; its last stage
    # is 1x1 at 32 px, so a batch of one image has one value per channel).
    from torchvision.models import resnet18

    from pipeline.training._train import train_one_epoch

    root = make_folder(tmp_path, {"train": 5, "val": 1})
    splits = D.build_splits(root, test="val")
    samples = splits.train[:9]
    torch.manual_seed(0)
    model = resnet18(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()
    plain = torch.utils.data.DataLoader(D.ImageList(root, samples, TX.eval_transform(PP)), batch_size=8)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        train_one_epoch(model, plain, loss, optimizer, torch.device("cpu"))
    train = D.make_loader(root, samples, TX.train_transform(PP, 1.0), 8, 0, shuffle=True, seed=0)
    mean_loss, accuracy = train_one_epoch(model, train, loss, optimizer, torch.device("cpu"))
    assert math.isfinite(mean_loss) and 0 <= accuracy <= 1


def test_image_list_reports_a_file_broken_after_the_scan(image_root):
    (image_root / "train" / "ants" / "img_0.png").write_bytes(b"gone bad")
    data = D.ImageList(image_root, [("train/ants/img_0.png", 0)], TX.eval_transform(PP))
    with pytest.raises(DataError, match=r"img_0.png: cannot be decoded mid-training \("):
        data[0]


def test_one_class_is_refused_before_the_study_is_stored(sweep_home, tmp_path):
    import optuna

    from pipeline.config import load_study, storage_url
    from pipeline.stages import run_study

    from conftest import study_dict, write_study

    root = make_folder(tmp_path / "images", {"train": 4, "val": 4}, classes=("ants",))
    path = write_study(tmp_path / "study.yaml", study_dict(root, study={"n_trials": 1}))
    with pytest.raises(DataError, match=r"/train: only one class folder, 'ants': a classifier needs"):
        run_study(load_study(path))
    assert optuna.get_all_study_names(storage_url(load_study(path))) == []


def test_preflight_passes_the_scan_warnings_to_the_user(tmp_path):
    from pipeline.config import load_study
    from pipeline.training import prepare

    from conftest import study_dict, write_study

    root = make_folder(tmp_path / "images", {"train": 3, "val": 2})
    write_image(root / "train" / "ants" / "scraped.jpg", COLOURS["ants"], fmt="WEBP")
    (root / "train" / "ants" / "notes.txt").write_text("x")
    cfg = load_study(write_study(tmp_path / "study.yaml", study_dict(root, data={"test": "val"})))
    said: list[str] = []
    prepared = prepare(cfg, warn=said.append)
    assert ("train/ants/scraped.jpg", 0) in prepared.splits.train
    assert [line.split(": ", 2)[:2] for line in said] == [["warning", str(root)], ["warning", str(root)]]
    assert said[0].startswith(f"warning: {root}: 1 file(s) not used as images (.txt: 1): train/ants/notes.txt;")
    assert said[1] == (
        f"warning: {root}: 1 image(s) hold another format than their extension says and are "
        f"used as decoded: {root}/train/ants/scraped.jpg is WEBP; rename them to their "
        "format's extension to silence this"
    )
