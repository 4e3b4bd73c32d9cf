"""Training and evaluation loops: pure, return frozen results, never log.

The shape follows torchvision's classification reference (`train_one_epoch`, `evaluate`), so any
driver (the Optuna objective, the report stage, a notebook) can reuse them. `fit` calls an optional
`on_epoch(result)` hook after every epoch; the hook may raise (e.g. `optuna.TrialPruned`) to stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.config import METRICS, score_sign
from pipeline.core import ConfigError, image_pass
from pipeline.models import set_train_mode, trainable_parameters

if TYPE_CHECKING:
    from pipeline.config import TrainingSection

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images or features, int64 labels)
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar
Scheduler = torch.optim.lr_scheduler.LRScheduler


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot recover."""


@dataclass(frozen=True)
class EpochResult:
    """One epoch: accuracies are fractions in [0, 1]; `train_loss` is the training criterion
    (with any label smoothing) and `val_loss` plain cross-entropy, both mean per image."""

    epoch: int  # 0-based step reported to the pruner
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float  # the rate this epoch trained with, after the schedule (not the sampled `lr` param)
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The epoch's MLflow metrics. The rate is `epoch_lr`: the param `lr` is the sampled
        initial rate, this one follows the schedule."""
        return {
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "epoch_lr": self.lr,
            "epoch_seconds": self.seconds,
        }


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    labels: torch.Tensor  # (N,) int64
    predictions: torch.Tensor  # (N,) int64
    probabilities: torch.Tensor  # (N, C) float32


@dataclass(frozen=True)
class FitResult:
    history: tuple[EpochResult, ...]
    best_epoch: int
    best_value: float
    best_state: dict[str, torch.Tensor]  # CPU copy of the weights at best_epoch


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD with momentum (the seed recipe), AdamW or Adam, by name."""
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (allowed: sgd, adamw, adam)")


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, epochs: int, step_size: int = 7, gamma: float = 0.1
) -> Scheduler | None:
    """Per-epoch LR schedule: StepLR (the seed's step_size=7, gamma=0.1), cosine, or none."""
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if kind == "none":
        return None
    raise ValueError(f"unknown scheduler {kind!r} (allowed: step, cosine, none)")


def pick_device(name: str = "auto") -> torch.device:
    """The `training.device` to train on: "auto" is CUDA when torch sees a GPU, else the CPU.

    Raises:
        ConfigError: "cuda" where torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            f"training.device: cuda, but torch {torch.__version__} ({built}) sees no CUDA device; "
            "use auto or cpu, or run where a GPU and its driver are present"
        )
    return torch.device(name)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """`torch.autocast` for `device`: bfloat16 on the CPU, float16 on CUDA; a no-op unless `amp`."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


def _to(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    # Cached features may be pooled vectors: channels_last exists for 4-D tensors only.
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def train_one_epoch(
    model: nn.Module,
    loader: Batches,
    criterion: Loss,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    frozen: Sequence[nn.Module] = (),
    amp: bool = False,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    what: str = "train",
) -> tuple[float, float]:
    """One pass over `loader` (batches of `(B, 3, H, W)` float32, `(B,)` int64).

    `forward` maps a batch to logits when the loader does not yield images for `model` itself
    (cached frozen-stage features -> the trainable suffix; see pipeline/features.py); `model`
    still sets train/eval modes. Default: `model`. `what` names the pass for progress listeners
    (`pipeline.core.listening`).

    Returns:
        (mean loss per image, accuracy as a fraction 0-1).

    Raises:
        NonFiniteLossError: at the first batch whose loss is NaN or infinite.
    """
    set_train_mode(model, list(frozen))
    forward = forward if forward is not None else model
    total_loss, correct, seen = 0.0, 0, 0
    with image_pass(what, images_in(loader)) as progress:
        for images, labels in loader:
            loss, logits = _train_step(
                forward, criterion, optimizer, images, labels, device, amp, channels_last, scaler
            )
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"training loss became {loss.item()} after {seen} images")
            total_loss += loss.item() * labels.size(0)
            correct += int((logits.argmax(1) == labels.to(logits.device)).sum().item())
            seen += labels.size(0)
            progress.advance(labels.size(0))
    return total_loss / max(seen, 1), correct / max(seen, 1)


def images_in(loader: Batches) -> int | None:
    """How many images one pass over `loader` yields (None when it cannot tell)."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    criterion: Loss,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    amp: bool,
    channels_last: bool,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss and (for a finite loss) the optimizer step of one batch; (loss, logits)."""
    images, labels = _to(images, device, channels_last), labels.to(device, non_blocking=True)
    with autocast(device, amp):
        logits = forward(images)
        loss = criterion(logits, labels)
    if not torch.isfinite(loss):
        return loss, logits
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Batches,
    criterion: Loss,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    what: str = "val",
) -> EvalResult:
    """Evaluate in eval mode without autograd; returns loss, accuracy and per-image outputs.

    `forward`: as in `train_one_epoch` (default `model`); `what` names the pass ("val", "test")."""
    model.eval()
    forward = forward if forward is not None else model
    total_loss, labels_all, probs_all = 0.0, [], []
    with image_pass(what, images_in(loader)) as progress:
        for images, labels in loader:
            images, labels = _to(images, device, channels_last), labels.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = forward(images)
            logits = logits.float()
            total_loss += criterion(logits, labels).item() * labels.size(0)
            labels_all.append(labels.cpu())
            probs_all.append(logits.softmax(1).cpu())
            progress.advance(labels.size(0))
    labels = torch.cat(labels_all) if labels_all else torch.empty(0, dtype=torch.long)
    probs = torch.cat(probs_all) if probs_all else torch.empty(0, 0)
    preds = probs.argmax(1) if len(labels) else labels
    n = max(len(labels), 1)
    return EvalResult(total_loss / n, (preds == labels).sum().item() / n, labels, preds, probs)


def fit(
    model: nn.Module,
    train_loader: Batches,
    val_loader: Batches | None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler | None = None,
    criterion: Loss | None = None,
    device: torch.device = torch.device("cpu"),
    frozen: Sequence[nn.Module] = (),
    metric: str = "val_accuracy",
    amp: bool = False,
    channels_last: bool = False,
    on_epoch: Callable[[EpochResult], None] | None = None,
    train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    val_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FitResult:
    """Train for `epochs`, evaluating on val after each; keep the best epoch's weights.

    "Best" is the highest val accuracy (or lowest val loss when `metric='val_loss'`); ties keep
    the earlier epoch. `on_epoch` runs after each epoch and may raise to stop early. With no
    `val_loader` (a refit on train + val: nothing is left to choose an epoch with) val is not
    scored (NaN in each `EpochResult`) and the weights after the last epoch are kept.

    `criterion` is the training loss. Validation always uses plain cross-entropy, so `val_loss`
    compares across trials whatever their label smoothing (a smoothed loss cannot go below the
    smoothing's entropy, which would rank trials by their smoothing, not by their predictions).

    `train_forward` / `val_forward` map the train / val loader's batches to logits (default
    `model`): pipeline/fitting.py passes the frozen prefix + trainable suffix, or the suffix alone
    over cached features. `model` owns the weights, modes, device and `best_state` either way.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    val_criterion = nn.CrossEntropyLoss()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
    sign = score_sign(METRICS[metric])
    history: list[EpochResult] = []
    best_epoch, best_score, best_state = -1, -math.inf, {}
    for epoch in range(epochs):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(
            model, train_loader, criterion, optimizer, device, frozen, amp, channels_last, scaler, train_forward
        )
        val_loss, val_acc = math.nan, math.nan
        if val_loader is not None:
            val = evaluate(model, val_loader, val_criterion, device, amp, channels_last, val_forward)
            val_loss, val_acc = val.loss, val.accuracy
        if scheduler is not None:
            scheduler.step()
        result = EpochResult(epoch, train_loss, train_acc, val_loss, val_acc, lr, time.perf_counter() - start)
        history.append(result)
        score = sign * getattr(result, metric)
        if score > best_score or (val_loader is None and epoch == epochs - 1):
            best_epoch, best_score = epoch, score
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(result)
    return FitResult(tuple(history), best_epoch, sign * best_score, best_state)


def build_training(
    model: nn.Module, training: TrainingSection, epochs: int | None = None, head: Collection[str] = ()
) -> tuple[torch.optim.Optimizer, Scheduler | None]:
    """Optimizer over the trainable parameters only (frozen stages excluded) and its scheduler.

    `head`: state-dict names of the new head's parameters (`model.head_names`); they form a
    second param group with lr `training.lr * training.head_lr_mult` (a freshly initialised head
    usually wants a larger step than the pretrained body). The scheduler scales both groups.
    """
    params = trainable_parameters(model)
    mult = training.head_lr_mult
    groups: list = params
    if head and mult != 1.0:
        ids = {id(p) for n, p in model.named_parameters() if n in head and p.requires_grad}
        groups = [
            g
            for g in (
                {"params": [p for p in params if id(p) not in ids]},
                {"params": [p for p in params if id(p) in ids], "lr": training.lr * mult},
            )
            if g["params"]
        ]
    opt = make_optimizer(
        groups, training.optimizer, training.lr, training.momentum, training.weight_decay, training.nesterov
    )
    sched = make_scheduler(
        opt, training.scheduler.type, epochs or training.epochs, training.scheduler.step_size, training.scheduler.gamma
    )
    return opt, sched
