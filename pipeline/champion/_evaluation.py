"""The sealed-test evaluation: the selected trial's checkpoint on the test split, exactly once.

The test split is read only here, for the selected checkpoint. The result is stored in the study
as a user attr keyed by trial number and the checkpoint file's sha256 (`evaluation_key`), so a
later report of the same checkpoint reuses it instead of looking at the test images again; a new
checkpoint (another trial, or the same trial re-run) gets its own evaluation. Test figures never
choose anything.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

import optuna
import pandas as pd
from torch import nn

from pipeline import data as D
from pipeline import models as M
from pipeline import training as TR
from pipeline.config import StudyConfig
from pipeline.core import RegistryError
from pipeline.data import adopt, load_record
from pipeline.models import TrialCheckpoint

TEST_ATTR = "sweep_test_eval"  # study user attr prefix: f"{TEST_ATTR}:{trial}:{sha256}"


@dataclass(frozen=True)
class TestEvaluation:
    """One checkpoint on the sealed test split.

    Attributes:
        trial_number: the trial whose checkpoint this is.
        checkpoint_sha256: hex sha256 of the checkpoint file evaluated.
        classes: class names in output-index order.
        n_images: test images evaluated.
        accuracy: fraction 0-1.
        loss: mean cross-entropy per image (nats).
        precision, recall, f1: per class, index order, 0-1 (0 for a class never predicted).
        support: test images per class, index order.
        confusion: rows true class, columns predicted class, counts.
        evaluated_at: ISO 8601 time in UTC, to the second.
    """

    trial_number: int
    checkpoint_sha256: str
    classes: tuple[str, ...]
    n_images: int
    accuracy: float
    loss: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]
    evaluated_at: str

    __test__ = False  # not a pytest class

    def to_record(self) -> dict[str, Any]:
        """Plain JSON values (lists for tuples): what the study user attr holds once stored.

        The confusion matrix is stored as its non-zero cells, `confusion_cells`: `[true, predicted,
        count]` triples, at most one per test image. Dense, it would be K x K numbers (a million at
        1000 classes, megabytes in one attr that every reader of the study fetches)."""
        record = json.loads(json.dumps(asdict(self)))
        del record["confusion"]
        record["confusion_cells"] = [
            [i, j, count] for i, row in enumerate(self.confusion) for j, count in enumerate(row) if count
        ]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TestEvaluation:
        """The evaluation back from `to_record` output read out of the study (also the dense
        `confusion` list of lists an earlier version stored)."""
        tuples = {k: tuple(record[k]) for k in ("classes", "precision", "recall", "f1", "support")}
        fields = {k: v for k, v in record.items() if k != "confusion_cells"}
        return cls(**{**fields, **tuples, "confusion": dense_confusion(record, len(tuples["classes"]))})

    def per_class(self) -> pd.DataFrame:
        """One row per class: class, precision, recall, f1, support. A class with no test image
        (support 0) has no recall or f1 (NaN, an empty cell), and no precision unless predicted."""
        frame = pd.DataFrame(
            {
                "class": self.classes,
                "precision": self.precision,
                "recall": self.recall,
                "f1": self.f1,
                "support": self.support,
            }
        )
        absent = frame["support"] == 0
        frame.loc[absent, ["recall", "f1"]] = float("nan")
        predicted = [sum(row[j] for row in self.confusion) for j in range(len(self.classes))]
        frame.loc[absent & (pd.Series(predicted) == 0), "precision"] = float("nan")
        return frame

    def untested_classes(self) -> list[str]:
        """Classes without a test image (too few images to carve one, or an empty test folder)."""
        return [c for c, n in zip(self.classes, self.support, strict=True) if n == 0]

    def confused_pairs(self, top: int) -> pd.DataFrame:
        """The `top` largest off-diagonal cells: true, predicted, count, share (count over the true
        class's support, 0-1); ties by true then predicted class index."""
        cells = [
            (-count, i, j) for i, row in enumerate(self.confusion) for j, count in enumerate(row) if count and i != j
        ]
        rows = sorted(cells)[:top]
        return pd.DataFrame(
            {
                "true": [self.classes[i] for _, i, _ in rows],
                "predicted": [self.classes[j] for _, _, j in rows],
                "count": [-n for n, _, _ in rows],
                "share of true class": [-n / max(1, self.support[i]) for n, i, _ in rows],
            }
        )

    def confusion_frame(self) -> pd.DataFrame:
        """The confusion matrix with `true <class>` rows and `pred <class>` columns."""
        return pd.DataFrame(
            self.confusion, index=[f"true {c}" for c in self.classes], columns=[f"pred {c}" for c in self.classes]
        )


def dense_confusion(record: dict[str, Any], num_classes: int) -> tuple[tuple[int, ...], ...]:
    """The `(K, K)` count matrix of a stored evaluation, from its `confusion_cells` or `confusion`."""
    if "confusion" in record:
        return tuple(tuple(int(c) for c in row) for row in record["confusion"])
    rows = [[0] * num_classes for _ in range(num_classes)]
    for i, j, count in record["confusion_cells"]:
        rows[i][j] = int(count)
    return tuple(map(tuple, rows))


def evaluation_key(trial_number: int, sha256: str) -> str:
    """Study user attr holding the test evaluation of one checkpoint of one trial."""
    return f"{TEST_ATTR}:{trial_number}:{sha256}"


def eval_preprocess(checkpoint: TrialCheckpoint) -> D.Preprocess:
    """The eval transform's settings recorded in the checkpoint (lists back to tuples)."""
    pp = checkpoint.preprocess
    return D.Preprocess(**{**pp, "mean": tuple(pp["mean"]), "std": tuple(pp["std"])})


def rebuild(checkpoint: TrialCheckpoint) -> nn.Module:
    """The checkpoint's classifier (arch + best-epoch weights, no pretrained download), in eval
    mode on the CPU; it maps float32 `(N, 3, crop, crop)` images to `(N, num_classes)` logits."""
    net, _ = M.build_model(M.WeightsSpec(checkpoint.arch, "none", "none"), len(checkpoint.class_to_idx))
    net.load_state_dict(checkpoint.state_dict)
    return net.eval()


def sealed_splits(cfg: StudyConfig, record: dict[str, Any] | None = None) -> D.Splits:
    """The study's splits: the split its first worker recorded (`pipeline.data`) when
    `record` is given, else rebuilt exactly as the study built them (same folders, seed and
    bad-image policy).

    With a record the folders are listed, not decoded again: the pre-flight decoded every file
    once, and the one pass that reads them here (the test split's) names any file that stopped
    decoding since. (Decoding them all again was most of the report stage at 16k images.)

    Raises:
        DataError: the image folders cannot be read, or hold other files than the record.
    """
    d = cfg.data
    listed = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed, d.val_fraction)
    if record is not None:
        return adopt(record, listed, cfg.study.name)
    return D.scan_images(listed, d.bad_images)


def evaluate_on_test(
    cfg: StudyConfig, checkpoint: TrialCheckpoint, sha256: str, record: dict[str, Any] | None = None
) -> TestEvaluation:
    """Evaluate the checkpoint on the sealed test split (the recorded one when `record` is given):
    one pass, batches of `data.batch_size`.

    Raises:
        DataError: the image folders cannot be read.
        RegistryError: the data's classes no longer match the checkpoint's `class_to_idx`.
    """
    import torch
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    splits = sealed_splits(cfg, record)
    if splits.class_to_idx != checkpoint.class_to_idx:
        raise RegistryError(
            f"{cfg.data.root}: classes {splits.class_to_idx} differ from the selected checkpoint's "
            f"{checkpoint.class_to_idx}; restore the data the study was run on"
        )
    loader = D.make_loader(
        splits.root,
        splits.test,
        D.eval_transform(eval_preprocess(checkpoint)),
        cfg.data.batch_size,
        cfg.data.num_workers,
        shuffle=False,
    )
    device = TR.pick_device(cfg.training.device)
    result = TR.evaluate(rebuild(checkpoint).to(device), loader, torch.nn.CrossEntropyLoss(), device, what="test")
    labels, preds = result.labels.numpy(), result.predictions.numpy()
    idx = list(range(len(splits.classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    return TestEvaluation(
        trial_number=checkpoint.trial_number,
        checkpoint_sha256=sha256,
        classes=tuple(splits.classes),
        n_images=len(labels),
        accuracy=float(result.accuracy),
        loss=float(result.loss),
        precision=tuple(map(float, precision)),
        recall=tuple(map(float, recall)),
        f1=tuple(map(float, f1)),
        support=tuple(map(int, support)),
        confusion=tuple(tuple(map(int, row)) for row in confusion_matrix(labels, preds, labels=idx)),
        evaluated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def evaluate_once(
    study: optuna.Study, cfg: StudyConfig, checkpoint: TrialCheckpoint, sha256: str
) -> tuple[TestEvaluation, bool]:
    """The test evaluation of this exact checkpoint: the one stored in the study, else evaluate
    it now and store it.

    Returns:
        (evaluation, True when this call evaluated it).

    Raises:
        DataError, RegistryError: from `evaluate_on_test` (only when nothing is stored yet).
    """
    key = evaluation_key(checkpoint.trial_number, sha256)
    stored = study.user_attrs.get(key)
    if stored is not None:
        return TestEvaluation.from_record(stored), False
    evaluation = evaluate_on_test(cfg, checkpoint, sha256, load_record(study.user_attrs))
    # Stored before anything else can fail (registration), so a retry never tests twice.
    study.set_user_attr(key, evaluation.to_record())
    return evaluation, True
