"""Decoded-image cache: eval pixels bit-identical to decoding on the fly, each file decoded once
per study (also across processes through the store folder), a changed file decoded again, and a
cache over its memory cap that still gives the same pixels and says so once."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core import DataError
from pipeline.data import _imagecache as IC
from pipeline.data import _imagefiles as IMG
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX

PP = TX.Preprocess(resize=36, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture(autouse=True)
def fresh_caches():
    IC.clear()
    yield
    IC.clear()


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """Non-square RGB JPEG and PNG, RGBA PNG, grayscale PNG, palette GIF: each takes another
    branch of load_rgb and another centre-crop offset."""
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(noise(41, 57, 0)).save(root / "wide.jpg", quality=90)
    Image.fromarray(noise(63, 38, 1)).save(root / "tall.png")
    Image.fromarray(noise(40, 45, 2, 4), "RGBA").save(root / "alpha.png")
    Image.fromarray(noise(50, 37, 3, 1), "L").save(root / "gray.png")
    Image.fromarray(noise(44, 52, 4)).convert("P").save(root / "palette.gif")
    return root, sorted(p.name for p in root.iterdir())


def test_cached_eval_pixels_equal_on_the_fly_decoding(mixed_folder, tmp_path):
    root, names = mixed_folder
    cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), tmp_path / "entries")
    cached, fresh = TX.cached_eval_transform(PP), TX.eval_transform(PP)
    for name in names:
        image = cache.get(name)
        assert image.dtype == torch.uint8 and min(image.shape[1:]) == PP.resize, name
        expected = fresh(IMG.load_rgb(root / name))
        got = cached(image)
        assert got.shape == expected.shape == (3, 32, 32), name
        assert torch.equal(got, expected), name
    # aug_strength 0 on the train path is the same eval transform
    assert torch.equal(
        TX.cached_train_transform(PP, 0.0)(cache.get("wide.jpg")), fresh(IMG.load_rgb(root / "wide.jpg"))
    )


def test_each_file_is_decoded_once_per_study_and_reused_by_another_process(mixed_folder, tmp_path):
    root, names = mixed_folder
    folder = tmp_path / "entries"
    samples = [(n, 0) for n in names]
    cache = IC.shared(root, PP, IC.budget(2**30), folder)
    assert IC.shared(root, PP, IC.budget(2**30), folder) is cache  # every trial gets the same one
    for epoch in range(3):
        loader = D.loader(
            IC.CachedImageList(cache, samples, TX.cached_train_transform(PP, 1.0)),
            batch_size=2,
            num_workers=0,
            shuffle=True,
            seed=epoch,
        )
        assert sum(len(y) for _, y in loader) == len(names)
    stats = cache.stats()
    assert (stats["decoded"], stats["memory_hits"], stats["file_hits"]) == (5, 10, 0)
    assert stats["memory_entries"] == 5
    assert stats["memory_bytes"] == sum(cache.get(n).numel() for n in names)
    assert len(list(folder.rglob("*.npy"))) == 5
    # A resumed run or a second worker (new process: a new cache object) reads the entries.
    other = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), folder)
    for name in names:
        assert torch.equal(other.get(name), cache.get(name))
    assert (other.decoded, other.file_hits) == (0, 5)
    assert not list(folder.rglob("*.tmp"))


def test_another_working_size_is_another_entry(mixed_folder, tmp_path):
    root, _ = mixed_folder
    folder = tmp_path / "entries"
    IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), folder).get("wide.jpg")
    bigger = TX.Preprocess(48, 40, PP.mean, PP.std)
    other = IC.DecodedImages(root, bigger, IC.MemoryBudget(2**30), folder)
    assert min(other.get("wide.jpg").shape[1:]) == 48
    assert other.decoded == 1


def test_a_changed_file_is_decoded_again(mixed_folder, tmp_path):
    root, _ = mixed_folder
    folder = tmp_path / "entries"
    cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), folder)
    before = cache.get("tall.png").clone()
    assert cache.decoded == 1
    st = os.stat(root / "tall.png")
    Image.fromarray(noise(70, 30, 9)).save(root / "tall.png")  # new content, new size
    os.utime(root / "tall.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = cache.get("tall.png")
    assert cache.decoded == 2
    assert not torch.equal(after[:, :30, :30], before[:, :30, :30])
    assert torch.equal(TX.cached_eval_transform(PP)(after), TX.eval_transform(PP)(IMG.load_rgb(root / "tall.png")))
    assert cache.stats()["memory_entries"] == 1  # the stale pixels were dropped, not kept
    # Same size, only a new mtime (e.g. rewritten in place): decoded again too.
    os.utime(root / "tall.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    cache.get("tall.png")
    assert cache.decoded == 3
    # A new process with the same folder does not take the stale entry either.
    other = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), folder)
    assert torch.equal(other.get("tall.png"), after)
    assert (other.decoded, other.file_hits) == (0, 1)


def test_over_the_memory_cap_images_come_from_files_or_decoding_with_one_line(mixed_folder, tmp_path, caplog):
    root, names = mixed_folder
    eval_t = TX.cached_eval_transform(PP)
    with caplog.at_level(logging.WARNING, logger="sweep.cache"):
        spill = IC.DecodedImages(root, PP, IC.MemoryBudget(0), tmp_path / "entries")
        for _ in range(2):
            for name in names:
                assert torch.equal(eval_t(spill.get(name)), TX.eval_transform(PP)(IMG.load_rgb(root / name)))
        nothing = IC.DecodedImages(root, PP, IC.MemoryBudget(0), None)
        for _ in range(2):
            for name in names:
                nothing.get(name)
    assert spill.stats()["memory_entries"] == 0
    assert (spill.decoded, spill.file_hits) == (5, 5)
    assert nothing.decoded == 10
    assert [r.getMessage() for r in caplog.records] == [
        (
            f"cache: decoded images pass cache.max_memory_mb (0 MiB); the rest are read from "
            f"{tmp_path / 'entries'} every epoch"
        ),
        "cache: decoded images pass cache.max_memory_mb (0 MiB); the rest are decoded again every epoch",
    ]


def test_an_unwritable_folder_falls_back_to_decoding(mixed_folder, tmp_path, caplog):
    root, _ = mixed_folder
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="sweep.cache"):
        cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), blocker / "entries")
        image = cache.get("wide.jpg")
    assert cache.folder is None and cache.decoded == 1 and image.shape[0] == 3
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith(f"cache: cannot write decoded images under {blocker / 'entries'}")


def test_a_file_gone_mid_training_names_the_file(mixed_folder, tmp_path):
    root, _ = mixed_folder
    cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), None)
    (root / "wide.jpg").unlink()
    with pytest.raises(DataError, match=r"wide\.jpg: cannot be read mid-training \(No such file or directory\)$"):
        cache.get("wide.jpg")


def test_memory_budget_counts_bytes():
    budget = IC.MemoryBudget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    assert budget.used == 100
    budget.give(60)
    assert budget.used == 40 and budget.take(60)
    assert IC.budget(123) is IC.budget(123) and IC.budget(123) is not IC.budget(124)


def test_augmentation_sources_keep_the_files_resolution_up_to_the_cap(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(noise(60, 90, 5)).save(root / "small.png")  # short side 60 <= 4 x 32
    Image.fromarray(noise(200, 150, 6)).save(root / "big.png")  # short side 150 > 128
    folder = tmp_path / "entries"
    sources = IC.shared(root, PP, IC.budget(2**30), folder, for_training=True)
    assert sources is not IC.shared(root, PP, IC.budget(2**30), folder)  # eval inputs: another cache
    small = sources.get("small.png")
    assert torch.equal(small, torch.from_numpy(np.array(IMG.load_rgb(root / "small.png"))).permute(2, 0, 1))
    assert tuple(sources.get("big.png").shape) == (3, 4 * 32 * 200 // 150, 4 * 32)
    crops = TX.cached_train_transform(PP, 1.0)(small)
    assert crops.shape == (3, 32, 32) and crops.dtype == torch.float32
    assert sources.decoded == 2
    # eval inputs of the same files are separate entries at the working size
    working = IC.shared(root, PP, IC.budget(2**30), folder)
    assert min(working.get("small.png").shape[1:]) == PP.resize and working.decoded == 1
    assert len(list(folder.rglob("*.npy"))) == 3
