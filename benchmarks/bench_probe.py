"""Linear-probe baseline on a study's data: val and sealed-test accuracy, wall time.

Loads the study file (with `--set` style overrides) and runs its pre-flight, so the split
(data.test_fraction, data.seed), weights and preprocessing are exactly the study's. Fits
`pipeline.training.fit_linear_probe` on train, then evaluates the resulting model (backbone + fitted
head) once on val and once on test through `train.evaluate`, as a registered model would be.
Prints one JSON object. A measurement, not a test.

    PYTHONPATH=. python benchmarks/bench_probe.py studies/hymenoptera_offline.yaml \
        --set data.root=../shared/data/hymenoptera_data \
        --set model.weights=../shared/weights/efficientnet_lite0_imagenet.pth
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.config import load_study
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.models import _model as M
from pipeline.training import _probe as P
from pipeline.training import evaluate, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probe's CV folds")
    args = parser.parse_args()
    cfg = load_study(args.study, args.set)
    prep = prepare(cfg, warn=lambda line: None)
    k = len(prep.splits.class_to_idx)
    model, _ = M.build_model(prep.spec, k, prep.state)
    d, device = cfg.data, torch.device("cpu")
    train, val = P.probe_loaders(prep.splits, prep.preprocess, d.batch_size, 0)
    result = P.fit_linear_probe(model, train, val, device, args.seed, num_classes=k)
    start = time.perf_counter()
    test = D.make_loader(
        prep.splits.root, prep.splits.test, TX.eval_transform(prep.preprocess), d.batch_size, 0, shuffle=False
    )
    criterion = torch.nn.CrossEntropyLoss()
    on_val, on_test = evaluate(model, val, criterion, device), evaluate(model, test, criterion, device)
    print(
        json.dumps(
            {
                "study": args.study,
                "overrides": args.set,
                "arch": prep.spec.arch,
                "weights": prep.spec.origin(),
                "preprocess": prep.preprocess.to_dict(),
                "split": prep.splits.test_source,
                "counts": {s: len(getattr(prep.splits, s)) for s in ("train", "val", "test")},
                "C": result.C,
                "cv_folds": result.cv_folds,
                "feature_dim": result.feature_dim,
                "train_accuracy": result.train_accuracy,
                "val_accuracy": result.val_accuracy,
                "val_loss": result.val_loss,
                "val_accuracy_model": on_val.accuracy,
                "test_accuracy": on_test.accuracy,
                "test_correct": int((on_test.predictions == on_test.labels).sum()),
                "test_total": len(on_test.labels),
                "probe_seconds": result.seconds,
                "eval_seconds": time.perf_counter() - start,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
