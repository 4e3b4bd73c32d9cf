"""The loop a user would write without sweep: the PyTorch transfer-learning tutorial.

`train_model` is the tutorial's loop (ImageFolder, transforms applied per epoch, train then val
phase per epoch, best weights saved to a temporary file), with two additions for measuring and
for Optuna: per-epoch wall time, and an optional `on_epoch(epoch, val_acc)` hook where the usual
Optuna objective reports and prunes. "Fixed feature extractor" is the tutorial's recipe:
`requires_grad = False` on the backbone and nothing else (BatchNorm stays in train mode, the
frozen stages still run every epoch on every image).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets, transforms


def tutorial_transforms(crop: int, resize: int, mean, std) -> dict[str, transforms.Compose]:
    """The tutorial's `data_transforms` at the benchmark's size and the weights' mean/std."""
    return {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(crop),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(resize),
                transforms.CenterCrop(crop),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
    }


def loaders(data_dir: Path, data_transforms: dict, batch_size: int, num_workers: int):
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x]) for x in ["train", "val"]}
    dataloaders = {
        x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size, shuffle=True, num_workers=num_workers)
        for x in ["train", "val"]
    }
    sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    return dataloaders, sizes


def efficientnet(weights: Path, num_classes: int = 2) -> nn.Module:
    """timm's EfficientNet-Lite0 with the local ImageNet checkpoint and a new head, as timm
    users load offline weights."""
    import timm

    return timm.create_model(
        "efficientnet_lite0", pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(weights)}
    )


def fixed_feature_extractor(model: nn.Module) -> list[nn.Parameter]:
    """The tutorial's ConvNet-as-fixed-feature-extractor: freeze everything, train the new head."""
    for param in model.parameters():
        param.requires_grad = False
    model.reset_classifier(2)  # a new head: its parameters require grad
    return list(model.get_classifier().parameters())


def train_model(model, dataloaders, dataset_sizes, criterion, optimizer, scheduler, num_epochs, device, on_epoch=None):
    """The tutorial's loop. Returns (model with best weights, best val acc, per-epoch seconds)."""
    seconds = []
    with TemporaryDirectory() as tempdir:
        best_model_params_path = os.path.join(tempdir, "best_model_params.pt")
        torch.save(model.state_dict(), best_model_params_path)
        best_acc = 0.0
        for epoch in range(num_epochs):
            start = time.perf_counter()
            for phase in ["train", "val"]:
                if phase == "train":
                    model.train()
                else:
                    model.eval()
                running_loss = 0.0
                running_corrects = 0
                for inputs, labels in dataloaders[phase]:
                    inputs = inputs.to(device)
                    labels = labels.to(device)
                    optimizer.zero_grad()
                    with torch.set_grad_enabled(phase == "train"):
                        outputs = model(inputs)
                        _, preds = torch.max(outputs, 1)
                        loss = criterion(outputs, labels)
                        if phase == "train":
                            loss.backward()
                            optimizer.step()
                    running_loss += loss.item() * inputs.size(0)
                    running_corrects += torch.sum(preds == labels.data)
                if phase == "train":
                    scheduler.step()
                epoch_acc = running_corrects.double() / dataset_sizes[phase]
                if phase == "val" and epoch_acc > best_acc:
                    best_acc = epoch_acc
                    torch.save(model.state_dict(), best_model_params_path)
            seconds.append(time.perf_counter() - start)
            if on_epoch is not None:
                on_epoch(epoch, float(epoch_acc))
        model.load_state_dict(torch.load(best_model_params_path, weights_only=True))
    return model, float(best_acc), seconds


def run(
    data_dir: Path,
    weights: Path,
    *,
    fixed: bool,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    num_workers: int,
    crop: int,
    resize: int,
    mean,
    std,
    device,
) -> dict:
    """One tutorial run: fine-tune everything, or the fixed-feature-extractor recipe."""
    dataloaders, sizes = loaders(data_dir, tutorial_transforms(crop, resize, mean, std), batch_size, num_workers)
    model = efficientnet(weights).to(device)
    params = fixed_feature_extractor(model) if fixed else model.parameters()
    model.to(device)
    optimizer = optim.SGD(params, lr=lr, momentum=momentum)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    _, best, seconds = train_model(
        model, dataloaders, sizes, nn.CrossEntropyLoss(), optimizer, scheduler, epochs, device
    )
    return {"epoch_seconds": seconds, "best_val_accuracy": best, "images": sizes}


def main() -> None:
    """`python -m benchmarks.bare '<json>'`: one tutorial run in this process, its result as JSON.

    The JSON holds `run`'s keyword arguments (paths as strings, mean/std as lists)."""
    import json
    import sys

    from pipeline.training import configure_threads, pick_device

    configure_threads()  # the same intra-op threads as sweep's trials
    kwargs = json.loads(sys.argv[1])
    data, weights = Path(kwargs.pop("data_dir")), Path(kwargs.pop("weights"))
    print(json.dumps(run(data, weights, device=pick_device("auto"), **kwargs)))


if __name__ == "__main__":
    main()
