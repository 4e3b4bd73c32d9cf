"""The decoded-image cache's disk budget: entries of earlier runs evicted least recently used
first, entries this run uses never evicted for it, nothing written past the budget (said once),
reads that refresh an entry's place, `sweep cache` listing and clearing, and DataLoader workers
that use the file tier only."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import _diskcache as DC
from pipeline.data import _imagecache as IC
from pipeline.data import _transforms as TX

PP = TX.Preprocess(resize=36, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
ENTRY = np.zeros((3, 100, 100), np.uint8)  # 30,000 bytes + the .npy header
ON_DISK = ENTRY.nbytes + 128
DAY = 86400.0


@pytest.fixture(autouse=True)
def fresh_caches():
    IC.clear()
    yield
    IC.clear()


def earlier_run(folder, names: list[str], days_ago: list[float]):
    """Entries as an earlier run left them: written, last used `days_ago` days ago."""
    tier = DC.DiskTier(folder)
    for name, age in zip(names, days_ago):
        tier.write(name, ENTRY)
        when = time.time() - age * DAY
        os.utime(tier.path(name), (when, when))


def names(n: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:02d}{'0' * 37}.npy" for i in range(n)]


def on_disk(folder) -> set[str]:
    return {p.name for p in folder.rglob("*.npy")}


def test_entries_of_earlier_runs_go_least_recently_used_first(tmp_path):
    folder = tmp_path / "decoded"
    old = names(6, "o")
    earlier_run(folder, old, [6, 5, 4, 3, 2, 1])  # o00 used 6 days ago: the first to go
    assert DC.usage(folder).entries == 6

    tier = DC.DiskTier(folder, max_disk_mb=1)
    tier.limit = 8 * ON_DISK  # room for 8 entries: MiB are too coarse for 30 kB files
    new = names(4, "n")
    for name in new:
        tier.write(name, ENTRY)
    # the third new entry passes 8: the two least recently used made room down to 90 % (7.2)
    assert on_disk(folder) == set(old[2:]) | set(new)
    assert tier.evicted == 2 and DC.usage(folder).bytes == 8 * ON_DISK == tier.used


def test_a_read_moves_an_entry_to_the_back_of_the_queue(tmp_path):
    folder = tmp_path / "decoded"
    old = names(3, "o")
    earlier_run(folder, old, [3, 2, 1])
    tier = DC.DiskTier(folder)
    assert np.array_equal(tier.read(old[0]), ENTRY)  # the oldest, used now
    tier.limit = 3 * ON_DISK
    tier.write(names(1, "n")[0], ENTRY)  # frees down to 90 % of 3: both others go, o00 stays
    assert on_disk(folder) == {old[0], names(1, "n")[0]}


def test_entries_this_run_uses_are_never_evicted_and_the_rest_is_not_written(tmp_path, caplog):
    folder = tmp_path / "decoded"
    tier = DC.DiskTier(folder)
    tier.limit = 3 * ON_DISK
    with caplog.at_level(logging.WARNING, logger="sweep.cache"):
        for name in names(5):
            tier.write(name, ENTRY)
    assert on_disk(folder) == set(names(3))
    assert tier.full and tier.evicted == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"cache: {folder} is at cache.max_disk_mb (0 MiB) with entries this run uses; images not yet "
        "written there are decoded again every epoch beyond cache.max_memory_mb "
        "(raise cache.max_disk_mb, or `sweep cache --clear`)"
    ]


def test_the_default_budget_is_a_quarter_of_the_free_space_at_most_10_gib(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    assert DC.default_limit(tmp_path / "not-yet") == min(10 * 2**30, free // 4)
    assert DC.limit_bytes(300, tmp_path) == 300 * 2**20


def test_max_disk_mb_0_keeps_decoded_images_in_memory_only(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((40, 50, 3), 7, np.uint8)).save(root / "a.png")
    cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), tmp_path / "decoded", max_disk_mb=0)
    cache.get("a.png")
    assert cache.folder is None and not (tmp_path / "decoded").exists()
    assert cache.stats()["memory_entries"] == 1


def test_clear_all_or_only_entries_unused_for_some_days(tmp_path):
    folder = tmp_path / "decoded"
    earlier_run(folder, names(4), [10, 8, 1, 0])
    stale = next(folder.iterdir()) / ".ab.npy.123.tmp"  # a writer killed mid-write two hours ago
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)
    gone = DC.clear(folder, unused_for=7 * DAY)
    assert (gone.entries, gone.bytes) == (2, 2 * ON_DISK)
    assert on_disk(folder) == set(names(4)[2:]) and not stale.exists()
    assert DC.clear(folder).entries == 2 and DC.usage(folder).entries == 0


def test_sweep_cache_lists_and_clears(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path))
    folder = tmp_path / "cache" / "decoded"
    earlier_run(folder, names(3), [9, 2, 1])
    runner = CliRunner()
    shown = runner.invoke(app, ["cache"])
    assert shown.exit_code == 0, shown.output
    first = shown.output.splitlines()[0]
    assert first.startswith(f"cache {folder.resolve()}: 3 decoded image(s), 0.1 MiB, used ")
    assert first.endswith(", the default; `sweep cache --clear` frees it)")
    some = runner.invoke(app, ["cache", "--unused-days", "5"])
    assert some.exit_code == 0 and some.output.splitlines()[0] == "deleted 1 decoded image(s), 0.0 MiB"
    assert " 2 decoded image(s)" in some.output.splitlines()[1]
    every = runner.invoke(app, ["cache", "--clear"])
    assert every.output.splitlines() == [
        "deleted 2 decoded image(s), 0.1 MiB",
        f"cache {folder.resolve()}: 0 decoded image(s), 0.0 MiB "
        f"(budget {DC.default_limit(folder) / 2**20:.0f} MiB, the default; `sweep cache --clear` frees it)",
    ]
    bad = runner.invoke(app, ["cache", "--unused-days", "-1"])
    assert bad.exit_code == 2 and "Invalid value for '--unused-days'" in bad.output


def test_dataloader_workers_use_the_file_tier_only(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 50, 3), 10 * i, np.uint8)).save(root / f"{i}.png")
    cache = IC.DecodedImages(root, PP, IC.MemoryBudget(2**30), tmp_path / "decoded")
    data = IC.CachedImageList(cache, [(f"{i}.png", i) for i in range(4)], TX.cached_eval_transform(PP))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1)
    labels = [int(y) for _, ys in loader for y in ys]
    assert labels == [0, 1, 2, 3]
    assert len(on_disk(tmp_path / "decoded")) == 4  # the worker wrote every entry
    assert cache.stats()["memory_entries"] == 0  # and the main process holds no copy
    assert cache.get("0.png").shape == (3, 36, 45) and cache.file_hits == 1  # read back, not decoded


def test_the_run_says_so_when_decoded_images_stay_in_memory(tmp_path, monkeypatch, capsys, image_root):
    from pipeline.cli import _commands as cli
    from pipeline.config import load_study
    from tests.conftest import study_dict, write_study

    monkeypatch.setenv("SWEEP_HOME", str(tmp_path))
    cfg = load_study(write_study(tmp_path / "s.yaml", study_dict(image_root, cache={"max_disk_mb": 0})))
    cli._print_cache(cfg)
    assert capsys.readouterr().out.splitlines() == [
        "cache: cache.max_disk_mb 0: decoded images were kept in memory only"
    ]
