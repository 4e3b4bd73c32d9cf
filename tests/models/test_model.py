"""Architectures, weights (none, local checkpoints, hub weights offline), the new head, freeze depth
and the weights' preprocessing. Uses the real offline checkpoints in ../shared/weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from pipeline.config import PreprocessConfig, TrainingSection
from pipeline.config._rules import check_arch
from pipeline.core import ModelError
from pipeline.data import Preprocess
from pipeline.models import _model as M
from pipeline.models import _weights as W
from pipeline.training._train import build_training, train_one_epoch

from conftest import SHARED

RESNET_CKPT = SHARED / "weights" / "resnet18_imagenette_128.pth"
LITE0_CKPT = SHARED / "weights" / "efficientnet_lite0_imagenet.pth"
RESNET_STAGES = {
    "stem": ("conv1.", "bn1."),
    "layer1": ("layer1.",),
    "layer2": ("layer2.",),
    "layer3": ("layer3.",),
    "layer4": ("layer4.",),
}


def fresh(arch="resnet18", num_classes=2, seed=0):
    torch.manual_seed(seed)
    return M.build_model(W.resolve_weights(arch, "none"), num_classes)[0]


# ---- building -----------------------------------------------------------------------------------


def test_torchvision_weights_none_has_a_new_head():
    model, report = M.build_model(W.resolve_weights("resnet18", "none"), 3)
    assert model.fc.weight.shape == (3, 512) and model.fc.bias.shape == (3,)
    assert report == W.LoadReport() and report.describe() == "all tensors loaded"
    assert model.training


def test_local_torchvision_checkpoint_drops_the_other_head():
    spec = W.resolve_weights("resnet18", str(RESNET_CKPT))
    assert (spec.kind, spec.path) == ("local", RESNET_CKPT.resolve())
    assert spec.origin() == f"local checkpoint {RESNET_CKPT.resolve()}"
    model, report = M.build_model(spec, 2)
    assert report.dropped == {"fc.weight": (10, 512), "fc.bias": (10,)}
    assert report.missing == ("fc.weight", "fc.bias")
    assert report.describe() == (
        "dropped fc.weight (10, 512); dropped fc.bias (10,); new (untrained): fc.weight, fc.bias"
    )
    ckpt = torch.load(RESNET_CKPT, map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert set(own) == set(ckpt)
    for name, tensor in ckpt.items():
        if not name.startswith("fc."):
            assert torch.equal(own[name], tensor), name
    assert own["fc.weight"].shape == (2, 512)


def test_preloaded_state_is_used_instead_of_the_file(tmp_path):
    spec = W.resolve_weights("resnet18", str(RESNET_CKPT))
    state = W.pretrained_state(spec)
    state["conv1.weight"] = torch.zeros_like(state["conv1.weight"])
    model, _ = M.build_model(spec, 2, state)
    assert torch.count_nonzero(model.conv1.weight) == 0


def test_wrapped_checkpoint_with_module_prefix_loads(tmp_path):
    ckpt = torch.load(RESNET_CKPT, map_location="cpu", weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt.items()}, "epoch": 3}, path)
    model, report = M.build_model(W.resolve_weights("resnet18", str(path)), 2)
    assert report.dropped == {"fc.weight": (10, 512), "fc.bias": (10,)}
    assert torch.equal(model.layer4[1].bn2.running_var, ckpt["layer4.1.bn2.running_var"])


def test_timm_local_checkpoint_keeps_backbone_and_replaces_head():
    spec = W.resolve_weights("timm/efficientnet_lite0", str(LITE0_CKPT))
    assert (spec.kind, spec.is_timm, spec.timm_name) == ("local", True, "efficientnet_lite0")
    model, report = M.build_model(spec, 2)
    assert report.dropped == {"classifier.weight": (1000, 1280), "classifier.bias": (1000,)}
    assert report.missing == ("classifier.weight", "classifier.bias")
    ckpt = torch.load(LITE0_CKPT, map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert len(ckpt) == 296
    for name, tensor in ckpt.items():
        if not name.startswith("classifier."):
            assert torch.equal(own[name], tensor), name
    assert own["classifier.weight"].shape == (2, 1280)


def test_checkpoint_of_another_arch_is_refused():
    spec = W.resolve_weights("timm/efficientnet_lite0", str(RESNET_CKPT))
    with pytest.raises(ModelError) as info:
        M.build_model(spec, 2)
    assert str(info.value) == (
        f"model.weights: local checkpoint {RESNET_CKPT.resolve()} does not fit timm/efficientnet_lite0: "
        "4 tensor(s) of another shape outside the head (e.g. bn1.weight: checkpoint (64,), model (32,))"
    )


def test_checkpoint_missing_tensors_is_refused():
    spec = W.resolve_weights("resnet34", str(RESNET_CKPT))
    with pytest.raises(ModelError) as info:
        M.build_model(spec, 2)
    assert str(info.value) == (
        f"model.weights: local checkpoint {RESNET_CKPT.resolve()} does not fit resnet34: 80 missing "
        "tensor(s) (e.g. layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias), "
        "0 unexpected (e.g. -)"
    )


def test_reshaped_backbone_tensor_is_not_dropped_as_head(tmp_path):
    # Only the head may change shape; a 4-channel stem means another model, not a new head.
    ckpt = torch.load(RESNET_CKPT, map_location="cpu", weights_only=True)
    ckpt["conv1.weight"] = torch.zeros(64, 4, 7, 7)
    torch.save(ckpt, tmp_path / "rgbd.pth")
    with pytest.raises(
        ModelError,
        match=r"1 tensor\(s\) of another shape outside the head "
        r"\(e.g. conv1.weight: checkpoint \(64, 4, 7, 7\), "
        r"model \(64, 3, 7, 7\)\)$",
    ):
        M.build_model(W.resolve_weights("resnet18", str(tmp_path / "rgbd.pth")), 2)


def test_headless_checkpoint_loads_with_a_new_head(tmp_path):
    ckpt = torch.load(RESNET_CKPT, map_location="cpu", weights_only=True)
    del ckpt["fc.weight"], ckpt["fc.bias"]  # a feature-extractor checkpoint
    torch.save(ckpt, tmp_path / "features.pth")
    model, report = M.build_model(W.resolve_weights("resnet18", str(tmp_path / "features.pth")), 2)
    assert report == W.LoadReport(dropped={}, missing=("fc.weight", "fc.bias"))
    assert torch.equal(model.conv1.weight, ckpt["conv1.weight"])


def test_head_names():
    assert M.head_names(fresh("resnet18", 3), 3) == {"fc.weight", "fc.bias"}
    assert M.head_names(fresh("mobilenet_v3_small", 3), 3) == {"classifier.3.weight", "classifier.3.bias"}


# ---- weights values -----------------------------------------------------------------------------


def test_bad_weights_name_lists_allowed_names():
    with pytest.raises(ModelError) as info:
        W.resolve_weights("resnet18", "IMAGENET1K_V2")
    assert str(info.value) == (
        "model.weights: 'IMAGENET1K_V2' is not a weights name of resnet18; did you mean IMAGENET1K_V1? "
        "(allowed: DEFAULT, IMAGENET1K_V1, none, or a local checkpoint path)"
    )


def test_bad_timm_tag_lists_allowed_tags():
    with pytest.raises(ModelError) as info:
        W.resolve_weights("timm/efficientnet_lite0", "in22k")
    assert str(info.value) == (
        "model.weights: 'in22k' is not a weights name of timm/efficientnet_lite0 "
        "(allowed: DEFAULT, ra_in1k, none, or a local checkpoint path)"
    )


def test_timm_arch_with_tag_takes_default_weights_only():
    with pytest.raises(ModelError) as info:
        W.resolve_weights("timm/efficientnet_lite0.ra_in1k", "ra_in1k")
    assert str(info.value) == (
        "model.weights: timm/efficientnet_lite0.ra_in1k already names a pretrained tag; use weights: "
        "DEFAULT (or drop the tag from model.arch)"
    )
    assert W.resolve_weights("timm/efficientnet_lite0.ra_in1k", "DEFAULT").kind == "timm"


def test_weights_none_and_names_are_classified():
    assert W.resolve_weights("resnet18", "None").kind == "none"
    assert W.resolve_weights("resnet18", "none").origin() == "random initialisation"
    spec = W.resolve_weights("timm/efficientnet_lite0", "ra_in1k")
    assert (spec.kind, spec.origin()) == ("timm", "timm weights ra_in1k")


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(ModelError) as info:
        W.resolve_weights("resnet18", str(tmp_path / "nope.pth"))
    assert str(info.value) == (
        f"model.weights: checkpoint file {tmp_path / 'nope.pth'} not found; set model.weights to a checkpoint "
        "file (--set model.weights=PATH), or run `make data`: it links the offline study's checkpoints into "
        "weights/ from ../shared/weights or $SWEEP_WEIGHTS_SOURCE"
    )


def test_a_folder_as_weights_is_named_a_folder(tmp_path):
    # A user's report: model.weights=/tmp said "checkpoint file /tmp not found" although it exists.
    with pytest.raises(ModelError) as info:
        W.resolve_weights("resnet18", str(tmp_path))
    assert str(info.value) == (
        f"model.weights: {tmp_path} is a folder; set model.weights to the checkpoint file in it "
        "(a .pth/.pt file saved with torch.save)"
    )


def test_garbage_checkpoint_is_a_model_error(tmp_path):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(bytes(range(256)) * 4)
    for arch in ("resnet18", "timm/efficientnet_lite0"):
        with pytest.raises(ModelError) as info:
            M.build_model(W.resolve_weights(arch, str(bad)), 2)
        assert str(info.value).startswith(f"model.weights: {bad} is not a readable PyTorch checkpoint (")


def test_checkpoint_without_tensors_is_a_model_error(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(ModelError) as info:
        W.pretrained_state(W.resolve_weights("resnet18", str(path)))
    assert str(info.value) == f"model.weights: {path} does not hold a state_dict of tensors"


def test_uncached_torchvision_weights_name_cache_and_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):  # deterministic even where a network exists
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    spec = W.resolve_weights("resnet18", "IMAGENET1K_V1")
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert spec.path == cache
    with pytest.raises(ModelError) as info:
        W.pretrained_state(spec)
    assert str(info.value) == (
        f"model.weights: cannot get torchvision weights IMAGENET1K_V1 for resnet18: not in the local "
        f"cache ({cache}) and the download failed (URLError: <urlopen error no network in this test>). "
        "Offline? Copy the file to that cache path, or set model.weights to a local checkpoint path "
        "(e.g. weights/efficientnet_lite0_imagenet.pth with studies/hymenoptera_offline.yaml), "
        "or model.weights: none"
    )


def test_uncached_timm_weights_name_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as info:
        M.build_model(W.resolve_weights("timm/efficientnet_lite0", "DEFAULT"), 2)
    assert str(info.value).startswith(
        f"model.weights: cannot get timm weights DEFAULT for timm/efficientnet_lite0: not in the "
        f"local cache ({tmp_path / 'hub'}) and the download failed ("
    )


# ---- freeze depth -------------------------------------------------------------------------------


def _frozen_name(name: str, k: int) -> bool:
    prefixes = [p for stage in list(RESNET_STAGES)[:k] for p in RESNET_STAGES[stage]]
    return name.startswith(tuple(prefixes))


@pytest.mark.parametrize("k", range(6))
def test_freeze_depth_resnet18_one_training_step(k):
    model = fresh("resnet18", 2, seed=k)
    assert [n for n, _ in M.stages(model, "resnet18")] == list(RESNET_STAGES)
    frozen = M.freeze(model, "resnet18", k)
    assert len(frozen) == (0 if k == 0 else k + 1)  # the stem is two modules
    for name, p in model.named_parameters():
        assert p.requires_grad is not _frozen_name(name, k), name

    optimizer, _ = build_training(model, TrainingSection(lr=0.1, weight_decay=1e-3, freeze_depth=k))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if not _frozen_name(n, k)}
    if k == 5:
        assert {n for n, p in model.named_parameters() if id(p) in in_optimizer} == {"fc.weight", "fc.bias"}

    # Frozen stages run without autograd: the last frozen stage's output carries no graph.
    outputs = {}
    stage_modules = {"stem": model.bn1, **{f"layer{i}": getattr(model, f"layer{i}") for i in range(1, 5)}}
    for stage, module in stage_modules.items():
        module.register_forward_hook(lambda m, i, out, stage=stage: outputs.__setitem__(stage, out))

    before = {n: t.clone() for n, t in model.state_dict().items()}
    torch.manual_seed(0)
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
    train_one_epoch(model, batch, nn.CrossEntropyLoss(), optimizer, torch.device("cpu"), frozen)
    after = model.state_dict()

    for name in before:
        if _frozen_name(name, k):  # weights AND BatchNorm running_mean/var/num_batches_tracked
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    for stage in list(RESNET_STAGES)[:k]:
        assert not outputs[stage].requires_grad, stage
    if k < 5:  # the first trainable stage moved, statistics included
        first = RESNET_STAGES[list(RESNET_STAGES)[k]][-1]
        bn = "bn1." if first == "bn1." else f"{first}0.bn1."
        assert not torch.equal(before[f"{bn}running_mean"], after[f"{bn}running_mean"])
        assert not torch.equal(before[f"{bn}weight"], after[f"{bn}weight"])
        assert outputs[list(RESNET_STAGES)[k]].requires_grad
    assert all(not m.training for m in frozen)
    assert model.fc.training


def test_freeze_depth_too_large_names_stage_count_and_names():
    with pytest.raises(ModelError) as info:
        M.freeze(fresh(), "resnet18", 6)
    assert str(info.value) == (
        "training.freeze_depth: 6 exceeds the 5 stages of resnet18 (stem, layer1, layer2, layer3, "
        "layer4); lower freeze_depth (or its search_space high)"
    )


def test_stages_timm_efficientnet_lite0():
    model = fresh("timm/efficientnet_lite0")
    stages = M.stages(model, "timm/efficientnet_lite0")
    assert [n for n, _ in stages] == [
        "conv_stem+bn1",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "blocks.4",
        "blocks.5",
        "blocks.6+conv_head+bn2",
    ]
    assert stages[0][1] == [model.conv_stem, model.bn1]
    frozen = M.freeze(model, "timm/efficientnet_lite0", 8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert len(frozen) == sum(len(mods) for _, mods in stages)


def test_stages_torchvision_mobilenet_v3_small():
    model = fresh("mobilenet_v3_small")
    stages = M.stages(model, "mobilenet_v3_small")
    assert [n for n, _ in stages] == [f"features.{i}" for i in range(13)]
    M.freeze(model, "mobilenet_v3_small", 13)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier"}  # the whole MLP head trains


def test_arch_without_stage_list():
    model = fresh("shufflenet_v2_x0_5")
    assert M.freeze(model, "shufflenet_v2_x0_5", 0) == []  # depth 0 needs no stage list
    with pytest.raises(ModelError) as info:
        M.freeze(model, "shufflenet_v2_x0_5", 1)
    assert str(info.value) == (
        "training.freeze_depth: no stage list for arch 'shufflenet_v2_x0_5' (supported: ResNet/ResNeXt/"
        "Wide-ResNet, EfficientNet, MobileNet, MNASNet, VGG, ConvNeXt, DenseNet, RegNet, timm/*); "
        "use freeze_depth 0"
    )


def test_set_train_mode_keeps_frozen_stages_in_eval():
    model = fresh()
    frozen = M.freeze(model, "resnet18", 2)
    model.eval()
    M.set_train_mode(model, frozen)
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert model.layer2[0].bn1.training and model.fc.training


# ---- preprocessing ------------------------------------------------------------------------------

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_weights_preprocess_torchvision_metadata_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached: metadata only
    spec = W.resolve_weights("resnet18", "IMAGENET1K_V1")
    assert W.weights_preprocess(spec) == Preprocess(256, 224, *IMAGENET, "bilinear")


def test_weights_preprocess_timm_cfg():
    spec = W.resolve_weights("timm/efficientnet_lite0", str(LITE0_CKPT))
    model, _ = M.build_model(spec, 2)
    expected = Preprocess(256, 224, *IMAGENET, "bicubic")  # 224 / crop_pct 0.875 = 256
    assert W.weights_preprocess(spec, model) == expected
    assert W.weights_preprocess(spec) == expected


def test_weights_preprocess_local_torchvision_falls_back_to_imagenet():
    spec = W.resolve_weights("resnet18", str(RESNET_CKPT))
    assert W.weights_preprocess(spec) == Preprocess(256, 224, *IMAGENET, "bilinear")


def test_resolve_preprocess_image_size_keeps_ratio():
    base = Preprocess(256, 224, *IMAGENET, "bilinear")
    assert W.resolve_preprocess(base, 32, PreprocessConfig()) == Preprocess(37, 32, *IMAGENET, "bilinear")
    assert W.resolve_preprocess(base, 160, PreprocessConfig()).resize == 183  # round(160 * 8 / 7)
    assert W.resolve_preprocess(base, None, PreprocessConfig()) == base


def test_resolve_preprocess_overrides_win():
    base = Preprocess(256, 224, *IMAGENET, "bilinear")
    override = PreprocessConfig(resize=40, crop=30, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert W.resolve_preprocess(base, 32, override) == Preprocess(40, 30, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    only_mean = PreprocessConfig(mean=(0.5, 0.5, 0.5))
    assert W.resolve_preprocess(base, 32, only_mean) == Preprocess(37, 32, (0.5, 0.5, 0.5), IMAGENET[1], "bilinear")


# ---- check_arch ---------------------------------------------------------------------------------


def test_check_arch_accepts_known_names():
    for arch in ("resnet18", "mobilenet_v3_small", "timm/efficientnet_lite0"):
        check_arch(arch)


def test_check_arch_rejects_detection_models():
    with pytest.raises(ValueError, match=r"^unknown arch 'fasterrcnn_resnet50_fpn'"):
        check_arch("fasterrcnn_resnet50_fpn")
