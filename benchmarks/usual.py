"""The study a user writes without sweep: Optuna (in-memory storage) + optuna-integration's
`MLflowCallback` around the PyTorch tutorial loop (`benchmarks/bare.py`).

Same trial parameters as the sweep study it is compared with (enqueued from it), same epochs,
sampler seed and median pruner; freeze depth as `requires_grad = False` on the first k stages and
the same augmentation map (`pipeline.data.train_transform`). Runs in its own process:

    python -m benchmarks.usual '<json: data_dir, weights, tracking_uri, params, epochs, ...>'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def run(s: dict[str, Any]) -> dict[str, Any]:
    """The usual study over `s["params"]` (a list of trial parameter dicts); wall seconds, best value,
    trial states."""
    import optuna
    import torch
    from optuna_integration import MLflowCallback
    from torch import nn, optim

    from benchmarks import bare
    from pipeline.data import Preprocess, eval_transform, train_transform
    from pipeline.models import stages
    from pipeline.training import configure_threads, pick_device

    configure_threads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    device = pick_device("auto")
    pp = Preprocess(round(s["image_size"] / 0.875), s["image_size"], (0.5,) * 3, (0.5,) * 3)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    for p in s["params"]:
        study.enqueue_trial(p)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        momentum = trial.suggest_float("momentum", 0.5, 0.99)
        depth = trial.suggest_int("freeze_depth", 0, 8)
        aug = trial.suggest_float("aug_strength", 0.0, 1.0)
        tf = {"train": train_transform(pp, aug), "val": eval_transform(pp)}
        dataloaders, sizes = bare.loaders(Path(s["data_dir"]), tf, s["batch_size"], s["num_workers"])
        torch.manual_seed(trial.number)
        model = bare.efficientnet(Path(s["weights"])).to(device)
        for _, modules in stages(model, "timm/efficientnet_lite0")[:depth]:
            for m in modules:
                m.requires_grad_(False)
        optimizer = optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
        scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

        def report(epoch: int, acc: float) -> None:
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        loss = nn.CrossEntropyLoss()
        _, best, _ = bare.train_model(
            model, dataloaders, sizes, loss, optimizer, scheduler, s["epochs"], device, on_epoch=report
        )
        return best

    callback = MLflowCallback(tracking_uri=s["tracking_uri"], metric_name="val_accuracy")
    study.optimize(objective, n_trials=len(s["params"]), callbacks=[callback])
    return {
        "wall_seconds": time.perf_counter() - start,
        "best_value": study.best_value,
        "states": [t.state.name for t in study.trials],
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
