"""How much a deeper freeze saves per training epoch, and how much of an epoch is data loading.

    .venv/bin/python benchmarks/bench_freeze.py [--arch timm/efficientnet_lite0] [--images 64]

Trains on the first N hymenoptera train images (one epoch per setting, after a warm-up batch) and
prints seconds per epoch and the ratio to freeze_depth=0. Frozen stages run without autograd and
out of the optimizer, so the ratio should fall as depth grows; the data-only pass shows the floor
that decoding and augmentation put under any freeze depth. Ratios, not timings, are the result:
absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.config import PreprocessConfig
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.models import _model as M
from pipeline.models import _weights as W
from pipeline.training._train import make_optimizer, train_one_epoch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "hymenoptera_data"
WEIGHTS = ROOT / "weights" / "efficientnet_lite0_imagenet.pth"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="timm/efficientnet_lite0")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--depths", default="0,2,4,6,8")
    args = parser.parse_args()

    splits = D.build_splits(DATA)
    samples = splits.train[:: max(1, len(splits.train) // args.images)][: args.images]
    spec = W.resolve_weights(args.arch, args.weights)
    state = W.pretrained_state(spec)
    model, _ = M.build_model(spec, 2, state)
    pp = W.resolve_preprocess(W.weights_preprocess(spec, model), args.image_size, PreprocessConfig())
    loader = D.make_loader(splits.root, samples, TX.train_transform(pp, 1.0), 32, 2, shuffle=True)

    start = time.perf_counter()
    for _ in loader:
        pass
    data_only = time.perf_counter() - start

    rows = []
    for depth in map(int, args.depths.split(",")):
        torch.manual_seed(0)
        model, _ = M.build_model(spec, 2, state)
        frozen = M.freeze(model, args.arch, depth)
        opt = make_optimizer(M.trainable_parameters(model), "sgd", 0.01)
        start = time.perf_counter()
        train_one_epoch(model, loader, torch.nn.CrossEntropyLoss(), opt, torch.device("cpu"), frozen)
        rows.append((depth, time.perf_counter() - start))
    base = rows[0][1]
    print(f"{args.arch}, {len(samples)} images at {args.image_size}px, torch threads {torch.get_num_threads()}")
    print(f"data loading only: {data_only:.2f} s/epoch ({data_only / base:.2f} of freeze_depth=0)")
    print("freeze_depth  s/epoch  ratio_to_depth0")
    for depth, seconds in rows:
        print(f"{depth:>12}  {seconds:7.2f}  {seconds / base:15.2f}")


if __name__ == "__main__":
    main()
