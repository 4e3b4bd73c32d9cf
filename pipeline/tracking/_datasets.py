"""The data a run saw, as MLflow dataset inputs: the study's train / val / test file lists.

Each split is one MLflow dataset, shown in the runs table's Dataset column as `name (digest)`:
- name `<data root folder>/<split>` (e.g. `hymenoptera_data/train`);
- digest: the first 8 hex digits of the sha256 of the split's file list with labels and the
  study's `class_to_idx`, so two runs showing the same digest saw the same files under the same
  labels (file contents are not hashed: the pre-flight scan reads them, this never does);
- source: the data root folder; schema: `path` (relative to the root), `label`, `class_index`;
- profile: rows, images per class and `class_to_idx`.
The input's `mlflow.data.context` tag says how the run used it (training, validation, test).

Trials see train and val; the parent run records all three (the study seals its test split, the
report reads it once); the selected trial's run and its logged model get the test split with the
test figures (`pipeline.registry`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline.data import Splits

if TYPE_CHECKING:
    from mlflow.entities import Dataset, DatasetInput

SPLITS = ("train", "val", "test")
CONTEXT = {"train": "training", "val": "validation", "test": "test"}  # `mlflow.data.context` values
CONTEXT_TAG = "mlflow.data.context"


def split_digest(splits: Splits, split: str) -> str:
    """8 hex digits of sha256 over `class_to_idx` and the split's (path, class index) pairs."""
    record = {"class_to_idx": splits.class_to_idx, "files": sorted(map(list, getattr(splits, split)))}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]


def split_dataset(splits: Splits, split: str) -> Dataset:
    """The MLflow dataset of one split ("train", "val" or "test"); see the module docstring.

    Raises:
        ValueError: `split` is not one of the three.
    """
    from mlflow.entities import Dataset
    from mlflow.types import ColSpec, Schema

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    samples = getattr(splits, split)
    classes = splits.classes
    schema = Schema([ColSpec("string", "path"), ColSpec("string", "label"), ColSpec("long", "class_index")])
    per_class = Counter(classes[index] for _, index in samples)
    profile = {
        "num_rows": len(samples),
        "images_per_class": {c: per_class.get(c, 0) for c in classes},
        "class_to_idx": splits.class_to_idx,
    }
    return Dataset(
        name=f"{splits.root.name}/{split}",
        digest=split_digest(splits, split),
        source_type="local",  # what MLflow's own datasets on local files say
        source=json.dumps({"uri": str(splits.root)}),
        schema=json.dumps({"mlflow_colspec": schema.to_dict()}),
        profile=json.dumps(profile),
    )


def split_inputs(splits: Splits, names: Sequence[str] = SPLITS) -> list[DatasetInput]:
    """Dataset inputs for the given splits, each tagged with its `mlflow.data.context`."""
    from mlflow.entities import DatasetInput, InputTag

    return [DatasetInput(split_dataset(splits, s), [InputTag(CONTEXT_TAG, CONTEXT[s])]) for s in names]


def input_context(dataset_input: DatasetInput) -> str | None:
    """The `mlflow.data.context` tag of a logged input (None when it has none)."""
    return next((t.value for t in dataset_input.tags if t.key == CONTEXT_TAG), None)
