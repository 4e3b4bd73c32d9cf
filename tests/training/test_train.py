"""Training loops: `fit` learns a separable problem, keeps the best epoch's weights, stops on a
raising hook or a non-finite loss; StepLR; `evaluate` and `train_one_epoch` return exact values.
Small tensor datasets and tiny models keep each test well under a second."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import TrainingSection
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.training import EpochResult, NonFiniteLossError, evaluate, pick_device
from pipeline.training._train import build_training, fit, make_optimizer, make_scheduler, train_one_epoch

CPU = torch.device("cpu")


def blobs(n: int, seed: int) -> TensorDataset:
    """(n, 3, 4, 4) images: class 0 around -1, class 1 around +1, alternating labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def loaders(n_train=64, n_val=32, batch_size=8):
    return (DataLoader(blobs(n_train, 0), batch_size=batch_size), DataLoader(blobs(n_val, 1), batch_size=batch_size))


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- fit ----------------------------------------------------------------------------------------


def test_fit_learns_a_separable_problem():
    model = mlp()
    train, val = loaders()
    before = evaluate(model, val, nn.CrossEntropyLoss(), CPU).accuracy
    result = fit(model, train, val, epochs=4, optimizer=make_optimizer(model.parameters(), "sgd", 0.1))
    assert before < 0.9
    assert result.history[-1].val_accuracy == 1.0
    assert result.best_value == 1.0
    assert [h.epoch for h in result.history] == [0, 1, 2, 3]
    assert all(isinstance(h, EpochResult) for h in result.history)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(h.seconds > 0 and h.lr == 0.1 for h in result.history)
    assert set(result.history[0].metrics()) == {
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "epoch_lr",
        "epoch_seconds",
    }


def test_fit_on_image_folder_through_the_loaders(image_root):
    # The data -> train path end to end: red vs blue 32 px images, a tiny conv net with BatchNorm.
    splits = D.build_splits(image_root, test="val")
    pp = TX.Preprocess(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    train = D.make_loader(image_root, splits.train, TX.train_transform(pp, 0.5), 8, 0, True, seed=0)
    val = D.make_loader(image_root, splits.val, TX.eval_transform(pp), 8, 0, False)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    result = fit(model, train, val, epochs=4, optimizer=make_optimizer(model.parameters(), "adam", 0.05))
    assert result.best_value == 1.0
    assert len(result.history) == 4


def test_best_epoch_state_is_returned_not_the_last():
    # lr 0: training leaves the weights alone, so the hook decides what each epoch evaluates.
    # Epoch 0 sees the trained (perfect) weights, epoch 1 a broken copy, epoch 2 the head negated.
    model = mlp()
    train, val = loaders()
    fit(model, train, val, epochs=3, optimizer=make_optimizer(model.parameters(), "sgd", 0.1))
    perfect = snapshot(model)
    saved = []

    def hook(result):
        saved.append(snapshot(model))
        with torch.no_grad():
            if result.epoch == 0:
                model[3].bias.copy_(torch.tensor([100.0, -100.0]))  # always class 0: accuracy 0.5
            else:
                model[3].bias.zero_()
                model[3].weight.neg_()  # every prediction flipped: accuracy 0

    result = fit(model, train, val, epochs=3, optimizer=make_optimizer(model.parameters(), "sgd", 0.0), on_epoch=hook)
    assert [h.val_accuracy for h in result.history] == [1.0, 0.5, 0.0]
    assert (result.best_epoch, result.best_value) == (0, 1.0)
    assert result.best_value == max(h.val_accuracy for h in result.history)
    assert result.best_state.keys() == perfect.keys()
    for name, tensor in result.best_state.items():
        assert torch.equal(tensor, saved[0][name]) and torch.equal(tensor, perfect[name]), name
    assert not torch.equal(result.best_state["3.bias"], model[3].bias)  # a copy, not a view


def test_best_state_matches_the_hook_snapshot_of_a_normal_run():
    model = mlp(seed=3)
    train, val = loaders()
    saved = []
    result = fit(
        model,
        train,
        val,
        epochs=3,
        optimizer=make_optimizer(model.parameters(), "sgd", 0.05),
        on_epoch=lambda r: saved.append(snapshot(model)),
    )
    values = [h.val_accuracy for h in result.history]
    assert result.best_value == max(values)
    assert result.best_epoch == values.index(max(values))  # ties keep the earlier epoch
    for name, tensor in result.best_state.items():
        assert torch.equal(tensor, saved[result.best_epoch][name]), name


def test_without_val_the_last_epoch_is_kept_and_val_is_nan():
    # A refit on train + val has nothing left to choose an epoch with.
    model = mlp()
    train, _ = loaders()
    states = []
    result = fit(
        model,
        train,
        None,
        epochs=3,
        optimizer=make_optimizer(model.parameters(), "sgd", 0.1),
        on_epoch=lambda r: states.append(snapshot(model)),
    )
    assert result.best_epoch == 2 and math.isnan(result.best_value)
    assert all(math.isnan(h.val_accuracy) and math.isnan(h.val_loss) for h in result.history)
    assert [h.epoch for h in result.history] == [0, 1, 2]
    for name, tensor in result.best_state.items():
        assert torch.equal(tensor, states[2][name]), name
    assert not torch.equal(states[0]["3.weight"], states[2]["3.weight"])  # it trained


def test_ties_keep_the_earliest_epoch():
    model = mlp()
    train, val = loaders()
    result = fit(model, train, val, epochs=3, optimizer=make_optimizer(model.parameters(), "sgd", 0.0))
    assert len({h.val_accuracy for h in result.history}) == 1
    assert result.best_epoch == 0


def test_val_loss_metric_keeps_the_lowest_loss():
    model = mlp()
    train, val = loaders()
    result = fit(
        model, train, val, epochs=3, metric="val_loss", optimizer=make_optimizer(model.parameters(), "sgd", 0.1)
    )
    losses = [h.val_loss for h in result.history]
    assert result.best_value == min(losses)
    assert result.best_epoch == losses.index(min(losses))


def test_on_epoch_raising_stops_after_that_epoch():
    class Stop(Exception):
        pass

    calls = []

    def hook(result):
        calls.append(result.epoch)
        if result.epoch == 1:
            raise Stop("pruned")

    model = mlp()
    train, val = loaders()
    with pytest.raises(Stop, match="pruned"):
        fit(model, train, val, epochs=5, optimizer=make_optimizer(model.parameters(), "sgd", 0.1), on_epoch=hook)
    assert calls == [0, 1]


def test_nan_criterion_raises_at_the_first_batch():
    model = mlp()
    before = snapshot(model)
    train, val = loaders()
    calls = []

    def nan_loss(logits, labels):
        return F.cross_entropy(logits, labels) * math.nan

    with pytest.raises(NonFiniteLossError, match=r"^training loss became nan after 0 images$"):
        fit(
            model,
            train,
            val,
            epochs=2,
            criterion=nan_loss,
            on_epoch=calls.append,
            optimizer=make_optimizer(model.parameters(), "sgd", 0.1),
        )
    assert calls == []
    for name, tensor in model.state_dict().items():  # raised before any optimizer step
        assert torch.equal(tensor, before[name]), name


def test_huge_learning_rate_raises_non_finite_loss_within_the_epoch():
    model = mlp()
    train, val = loaders()
    calls = []
    with pytest.raises(NonFiniteLossError, match=r"^training loss became (nan|inf) after \d+ images$"):
        fit(
            model,
            train,
            val,
            epochs=3,
            on_epoch=calls.append,
            optimizer=make_optimizer(model.parameters(), "sgd", 1e10),
        )
    assert calls == []  # not one epoch finished


def test_steplr_lowers_lr_after_step_size_epochs():
    model = mlp()
    train, val = loaders(n_train=16, n_val=8)
    training = TrainingSection(lr=0.1, epochs=5, scheduler={"type": "step", "step_size": 2, "gamma": 0.1})
    optimizer, scheduler = build_training(model, training)
    result = fit(model, train, val, epochs=5, optimizer=optimizer, scheduler=scheduler)
    assert [h.lr for h in result.history] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_cosine_and_no_schedule():
    opt = make_optimizer(mlp().parameters(), "sgd", 0.1)
    cosine = make_scheduler(opt, "cosine", epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert lrs == pytest.approx(
        [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]
    )
    assert make_scheduler(opt, "none", epochs=4) is None
    with pytest.raises(ValueError, match=r"^unknown scheduler 'linear' \(allowed: step, cosine, none\)$"):
        make_scheduler(opt, "linear", epochs=4)


def test_val_loss_is_plain_cross_entropy_whatever_the_label_smoothing():
    # Trials with different label_smoothing must compare on the same val loss.
    model = mlp()
    train, val = loaders()
    result = fit(
        model,
        train,
        val,
        epochs=1,
        criterion=nn.CrossEntropyLoss(label_smoothing=0.5),
        optimizer=make_optimizer(model.parameters(), "sgd", 0.1),
    )
    plain = evaluate(model, val, nn.CrossEntropyLoss(), CPU).loss
    smoothed = evaluate(model, val, nn.CrossEntropyLoss(label_smoothing=0.5), CPU).loss
    assert result.history[0].val_loss == pytest.approx(plain, abs=1e-6)
    assert abs(plain - smoothed) > 0.05


# ---- evaluate / train_one_epoch -----------------------------------------------------------------


def test_evaluate_returns_exact_outputs():
    model = mlp()
    data = blobs(10, 2)
    result = evaluate(model, DataLoader(data, batch_size=4), nn.CrossEntropyLoss(), CPU)
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    assert result.probabilities.shape == (10, 2) and result.probabilities.dtype == torch.float32
    assert torch.allclose(result.probabilities.sum(1), torch.ones(10))
    assert torch.allclose(result.probabilities, logits.softmax(1), atol=1e-6)
    assert torch.equal(result.labels, y)
    assert torch.equal(result.predictions, logits.argmax(1))
    assert result.accuracy == (logits.argmax(1) == y).float().mean().item()
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert not model.training


def test_evaluate_with_amp_on_cpu_gives_float32_probabilities():
    result = evaluate(mlp(), DataLoader(blobs(6, 2), batch_size=3), nn.CrossEntropyLoss(), CPU, amp=True)
    assert result.probabilities.dtype == torch.float32
    assert torch.allclose(result.probabilities.sum(1), torch.ones(6))


def test_evaluate_empty_loader():
    result = evaluate(mlp(), [], nn.CrossEntropyLoss(), CPU)
    assert (result.loss, result.accuracy, len(result.labels)) == (0.0, 0.0, 0)


def test_train_one_epoch_returns_mean_loss_per_image_and_accuracy():
    # lr 0 and no BatchNorm/dropout: the model is the same for every batch, so the epoch loss is
    # the per-image mean over the whole set (the last batch of 2 weighs 2, not a full batch).
    model = mlp()
    data = blobs(10, 4)
    optimizer = make_optimizer(model.parameters(), "sgd", 0.0)
    loss, accuracy = train_one_epoch(model, DataLoader(data, batch_size=4), nn.CrossEntropyLoss(), optimizer, CPU)
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert accuracy == (logits.argmax(1) == y).float().mean().item()
    assert model.training


def test_make_optimizer_by_name():
    params = list(mlp().parameters())
    sgd = make_optimizer(params, "sgd", 0.1, momentum=0.8, weight_decay=1e-4, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] is True
    assert make_optimizer(params, "sgd", 0.1, momentum=0.0, nesterov=True).defaults["nesterov"] is False
    assert isinstance(make_optimizer(params, "adamw", 0.1), torch.optim.AdamW)
    assert isinstance(make_optimizer(params, "adam", 0.1), torch.optim.Adam)
    with pytest.raises(ValueError, match=r"^unknown optimizer 'lion' \(allowed: sgd, adamw, adam\)$"):
        make_optimizer(params, "lion", 0.1)


def test_build_training_reads_the_training_section():
    model = mlp()
    training = TrainingSection(
        optimizer="adamw", lr=0.003, weight_decay=0.01, scheduler={"type": "step", "step_size": 3, "gamma": 0.5}
    )
    optimizer, scheduler = build_training(model, training)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.003 and optimizer.defaults["weight_decay"] == 0.01
    assert (scheduler.step_size, scheduler.gamma) == (3, 0.5)


def test_pick_device():
    assert pick_device("cpu") == CPU
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- forward: batches that are not images for `model` (cached frozen-stage features) -----------


def test_forward_maps_the_loaders_batches_while_model_keeps_modes_and_state():
    # The loaders yield the first layer's outputs; `forward` runs the rest of the model on them.
    model = mlp()
    head = nn.Sequential(model[2], model[3])
    train, val = loaders()

    def first(loader):
        with torch.no_grad():
            return DataLoader(
                TensorDataset(torch.cat([model[1](model[0](x)) for x, _ in loader]), torch.cat([y for _, y in loader])),
                batch_size=8,
            )

    twin = mlp()
    twin.load_state_dict(model.state_dict())
    for p in twin[1].parameters():
        p.requires_grad_(False)
    model[1].requires_grad_(False)
    feats_train, feats_val = first(train), first(val)
    a = fit(
        model,
        feats_train,
        feats_val,
        epochs=2,
        train_forward=head,
        val_forward=head,
        optimizer=make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", 0.1),
    )
    b = fit(
        twin,
        train,
        val,
        epochs=2,
        optimizer=make_optimizer([p for p in twin.parameters() if p.requires_grad], "sgd", 0.1),
    )
    for x, y in zip(a.history, b.history, strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, rel=1e-5)
        assert x.val_loss == pytest.approx(y.val_loss, rel=1e-5)
        assert (x.train_accuracy, x.val_accuracy) == (y.train_accuracy, y.val_accuracy)
    assert a.best_state.keys() == b.best_state.keys()  # the whole model's state, not the head's
    for name in a.best_state:
        assert torch.allclose(a.best_state[name], b.best_state[name], atol=1e-6), name


def test_evaluate_with_forward_sets_eval_mode_and_uses_it():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(48, 2))
    calls = []

    def forward(x):
        calls.append(x.shape)
        return model(x)

    evaluate(model, DataLoader(blobs(6, 2), batch_size=4), nn.CrossEntropyLoss(), CPU, forward=forward)
    assert calls == [(4, 3, 4, 4), (2, 3, 4, 4)]
    assert not model.training


def test_channels_last_passes_pooled_feature_vectors_through():
    model = nn.Linear(48, 2)
    data = DataLoader(TensorDataset(torch.randn(6, 48), torch.arange(6) % 2), batch_size=3)
    result = fit(
        model, data, data, epochs=1, channels_last=True, optimizer=make_optimizer(model.parameters(), "sgd", 0.1)
    )
    assert len(result.history) == 1
