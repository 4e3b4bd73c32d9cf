"""Frozen prefix / trainable suffix and the feature cache: the cut equals the whole model, cached
features equal recomputed ones, frozen stages stay untouched by a trial, and a trial with every
fast path on, off, or over its memory cap gives the same per-epoch metrics (CPU, fixed seed)."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn

from pipeline.config import load_study
from pipeline.data import _imagecache as imagecache
from pipeline.data import _imagefiles as IMG
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.models import _model as M
from pipeline.models import _prefix as P
from pipeline.models import _weights as W
from pipeline.training import _features as F
from pipeline.training import _fitting as fitting
from pipeline.training import _preflight as preflight
from tests.conftest import study_dict, write_study

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_caches(sweep_home):
    imagecache.clear()
    F.clear()
    yield
    imagecache.clear()
    F.clear()


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=2)


# ---- the cut ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, shape", [(1, (64, 8, 8)), (2, (64, 8, 8)), (3, (128, 4, 4)), (5, (512,))])
def test_resnet_cut_equals_the_whole_model(depth, shape):
    model = resnet()
    frozen = M.freeze(model, "resnet18", depth)
    cut = P.split(model, "resnet18", frozen, 32, channels_last=True)
    assert cut is not None and cut.feature_shape == shape
    # stem = conv1+bn1 (+ relu, maxpool, parameter-free); full depth also takes avgpool + flatten
    assert cut.cut == {1: 4, 2: 5, 3: 6, 5: 10}[depth]
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(cut.forward(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(not m.training for m in frozen)


def test_timm_efficientnet_lite0_cut_equals_the_whole_model():
    spec = W.resolve_weights("timm/efficientnet_lite0", "none")
    model, _ = M.build_model(spec, 2)
    names = [n for n, _ in M.stages(model, spec.arch)]
    for depth, shape in [(1, (32, 16, 16)), (4, (40, 4, 4)), (len(names), (1280, 1, 1))]:
        frozen = M.freeze(model, spec.arch, depth)
        cut = P.split(model, spec.arch, frozen, 32)
        assert cut is not None and cut.feature_shape == shape, depth
        model.eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(cut.forward(x), model(x), rtol=1e-4, atol=1e-5)


def test_no_cut_without_frozen_stages_or_a_step_list():
    model = resnet()
    assert P.split(model, "resnet18", [], 32) is None
    assert P.steps(nn.Sequential(nn.Linear(2, 2)), "my_net") is None


def test_the_check_leaves_modes_and_the_global_rng_alone():
    model = resnet()
    frozen = M.freeze(model, "resnet18", 2)
    model.train()
    for m in frozen:
        m.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert P.split(model, "resnet18", frozen, 32) is not None
    assert torch.equal(torch.rand(3), expected)
    assert {n: m.training for n, m in model.named_modules()} == modes


# ---- the store ----------------------------------------------------------------------------------


def test_store_evicts_least_recently_used_unpinned_entries():
    store = F.FeatureStore(imagecache.MemoryBudget(100))
    assert store.reserve("a", 40) and store.reserve("b", 40)
    store.get("a", lambda: torch.zeros(10))
    assert not store.reserve("c", 40)  # a and b are pinned by their trial
    store.release("a")
    assert store.reserve("c", 40)  # a evicted
    assert store.stats() == {"entries": 0, "computed": 1, "bytes": 0}
    store.release("b")
    store.release("c")
    assert store.reserve("b", 40)  # still there: no new room needed
    assert store.budget.used == 80
    assert not store.reserve("d", 101)  # can never fit: nothing evicted for it
    assert store.budget.used == 80
    assert store.reserve("d", 60)  # c (unpinned, older than b's last use) makes room
    assert store.budget.used == 100 and set(store._sizes) == {"b", "d"}


# ---- through fit_config -------------------------------------------------------------------------


def prepared(tmp_path, image_root, **training):
    tree = study_dict(
        image_root,
        training={"epochs": 2, "lr": 0.05, "freeze_depth": 2, "aug_strength": 0.0, "device": "cpu", **training},
    )
    cfg = load_study(write_study(tmp_path / "study.yaml", tree))
    return cfg, preflight.prepare(cfg, warn=lambda _: None)


def with_cache(cfg, **cache):
    return cfg.model_copy(update={"cache": cfg.cache.model_copy(update=cache)})


def test_cached_prefix_features_equal_recomputed(tmp_path, image_root):
    cfg, prep = prepared(tmp_path, image_root)
    torch.manual_seed(0)
    model, _ = M.build_model(prep.spec, 2, prep.state)
    frozen = M.freeze(model, "resnet18", 2)
    inputs = fitting.plan(cfg, prep, model, frozen, CPU, seed=0)
    assert inputs.paths == {"images": "cached", "train": "features", "val": "features"}
    features = torch.cat([f for f, _ in inputs.val_loader])
    labels = torch.cat([y for _, y in inputs.val_loader])
    assert features.shape == (len(prep.splits.val), 64, 8, 8)
    # recomputed: the frozen stages by hand, default layout, on images decoded on the fly
    images = torch.stack(
        [TX.eval_transform(prep.preprocess)(IMG.load_rgb(prep.splits.root / rel)) for rel, _ in prep.splits.val]
    )
    model.eval()
    with torch.no_grad():
        again = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(images)))))
        assert torch.allclose(features, again, rtol=1e-4, atol=1e-5)
        assert torch.allclose(inputs.val_forward(features), model(images), rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [y for _, y in prep.splits.val]
    inputs.release()


def test_feature_batches_come_in_the_image_loaders_order(tmp_path, image_root):
    cfg, prep = prepared(tmp_path, image_root)
    torch.manual_seed(0)
    model, _ = M.build_model(prep.spec, 2, prep.state)
    inputs = fitting.plan(cfg, prep, model, M.freeze(model, "resnet18", 1), CPU, seed=7)
    plain = D.make_loader(
        prep.splits.root, prep.splits.train, TX.eval_transform(prep.preprocess), 8, 0, shuffle=True, seed=7
    )
    for _ in range(2):  # two epochs: the generator advances the same way
        assert [y.tolist() for _, y in inputs.train_loader] == [y.tolist() for _, y in plain]
    inputs.release()


@pytest.mark.parametrize("aug", [0.0, 0.5])
def test_frozen_stage_parameters_and_bn_buffers_are_unchanged_after_a_trial(tmp_path, image_root, aug):
    cfg, prep = prepared(tmp_path, image_root, aug_strength=aug)
    result = fitting.fit_config(cfg, prep, seed=3)
    torch.manual_seed(3)
    start, _ = M.build_model(prep.spec, 2, prep.state)
    before = start.state_dict()
    frozen = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert "bn1.running_mean" in frozen and "layer1.0.bn1.num_batches_tracked" in frozen
    for key in frozen:
        assert torch.equal(result.best_state[key], before[key]), key
    assert not torch.equal(result.best_state["fc.weight"], before["fc.weight"])
    assert not torch.equal(result.best_state["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])


def history(result) -> list[dict]:
    return [{k: v for k, v in vars(h).items() if k != "seconds"} for h in result.history]


def assert_same_history(a, b, n_train: int, n_val: int):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["epoch"] == y["epoch"] and x["lr"] == y["lr"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4, abs=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4, abs=1e-5)
        # float rounding may flip one borderline image at most, never more
        assert abs(x["train_accuracy"] - y["train_accuracy"]) <= 1 / n_train + 1e-9
        assert abs(x["val_accuracy"] - y["val_accuracy"]) <= 1 / n_val + 1e-9


# Depth 5 is the feature extractor (a linear head on cached pooled features). At depth 2 the
# suffix trains BatchNorm over 8 near-identical 32 px images per batch, which amplifies the last
# bits of the prefix (channels_last on the CPU) past any tolerance once weights move, so that case
# is compared with lr 1e-6: the forward path, BatchNorm running statistics and metrics every epoch.
@pytest.mark.parametrize("depth, lr", [(5, 0.05), (2, 1e-6)])
def test_fast_paths_on_and_off_give_the_same_metrics(tmp_path, image_root, depth, lr):
    cfg, prep = prepared(tmp_path, image_root, freeze_depth=depth, lr=lr)
    on = fitting.fit_config(cfg, prep, seed=1)
    stores = list(F._STORES.values())
    assert [s.stats()["computed"] for s in stores] == [2]  # train and val features were used
    off = fitting.fit_config(with_cache(cfg, decoded_images=False, frozen_features=False), prep, seed=1)
    sizes = len(prep.splits.train), len(prep.splits.val)
    assert_same_history(history(on), history(off), *sizes)
    assert on.history[0].val_loss != on.history[1].val_loss  # BatchNorm statistics or the head moved
    # A second trial sharing weights, depth and preprocessing reuses the features.
    again = fitting.fit_config(cfg, prep, seed=1)
    assert stores[0].stats()["computed"] == 2
    assert_same_history(history(again), history(on), *sizes)


def test_over_the_memory_cap_falls_back_with_one_line_and_the_same_metrics(tmp_path, image_root, caplog):
    cfg, prep = prepared(tmp_path, image_root, freeze_depth=5)
    off = fitting.fit_config(with_cache(cfg, decoded_images=False, frozen_features=False), prep, seed=2)
    with caplog.at_level(logging.WARNING, logger="sweep.cache"):
        capped = fitting.fit_config(with_cache(cfg, max_memory_mb=0), prep, seed=2)
    assert_same_history(history(capped), history(off), len(prep.splits.train), len(prep.splits.val))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(
        "cache: frozen-stage features of the val split (0 MiB) do not fit "
        "cache.max_memory_mb (0 MiB); the frozen stages run every epoch"
    )
    assert messages[1].startswith("cache: frozen-stage features of the train split")
    assert messages[2].startswith("cache: decoded images pass cache.max_memory_mb (0 MiB); the rest are read from")
    assert len(messages) == 3  # once each, not once per batch or epoch


def test_cache_section_defaults_and_a_bad_cap_named(tmp_path, image_root):
    from pipeline.core import ConfigError
    from pipeline.training._machine import cache_limit_bytes

    cfg, _ = prepared(tmp_path, image_root)
    assert (cfg.cache.decoded_images, cfg.cache.frozen_features, cfg.cache.max_memory_mb) == (True, True, None)
    import psutil

    assert cache_limit_bytes(None) == psutil.virtual_memory().total // 4
    assert cache_limit_bytes(3) == 3 * 2**20
    tree = study_dict(image_root, cache={"max_memory_mb": -5})
    expected = r"cache\.max_memory_mb: Input should be greater than or equal to 0 \(got -5\)$"
    with pytest.raises(ConfigError, match=expected):
        load_study(write_study(tmp_path / "bad.yaml", tree))
    assert cfg.cache.max_disk_mb is None
    tree = study_dict(image_root, cache={"max_disk_mb": "lots"})
    expected = (
        r"cache\.max_disk_mb: Input should be a valid integer, unable to parse string as an integer \(got 'lots'\)$"
    )
    with pytest.raises(ConfigError, match=expected):
        load_study(write_study(tmp_path / "bad.yaml", tree))


def test_max_disk_mb_0_trains_the_same_and_writes_no_entry(tmp_path, image_root):
    from pipeline.data import cache_folder, cache_usage

    cfg, prep = prepared(tmp_path, image_root, freeze_depth=5)
    memory_only = fitting.fit_config(with_cache(cfg, max_disk_mb=0), prep, seed=3)
    assert cache_usage(cache_folder()).entries == 0
    imagecache.clear()
    written = fitting.fit_config(cfg, prep, seed=3)
    assert cache_usage(cache_folder()).entries == len(prep.splits.train) + len(prep.splits.val)
    assert_same_history(history(memory_only), history(written), len(prep.splits.train), len(prep.splits.val))


def test_loader_workers_only_when_they_pay(monkeypatch):
    from pipeline.training import _machine as machine

    monkeypatch.setattr(machine, "cpu_cores", lambda: 4)
    assert machine.loader_workers(2, CPU, cheap_items=True) == 0  # cached images on the CPU
    assert machine.loader_workers(2, CPU, cheap_items=False) == 2
    assert machine.loader_workers(8, CPU, cheap_items=False) == 3  # one core stays with the model
    assert machine.loader_workers(2, torch.device("cuda"), cheap_items=True) == 2  # augmentation feeds a GPU
    monkeypatch.setattr(machine, "cpu_cores", lambda: 1)
    assert machine.loader_workers(2, CPU, cheap_items=False) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    machine.configure_threads()
    assert calls == [1]
