"""Hand the selected trial off to the registry: what is logged with its model (metadata, lineage
tags, description, an input example, the test figures with the test split as their dataset) and
which MLflow run the model is attached to."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.trial import FrozenTrial
from PIL import Image

from pipeline import data as D
from pipeline.champion import TestEvaluation, TestFigures, eval_preprocess, rebuild, sealed_test_figures
from pipeline.config import StudyConfig
from pipeline.core import RegistryError, first_line
from pipeline.models import TrialCheckpoint
from pipeline.registry import _versions as registry
from pipeline.search import TrialRecord
from pipeline.tracking import Tracker, input_context

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput


def figures_of(evaluation: TestEvaluation) -> TestFigures:
    """The evaluation's accuracy with its 95% Wilson interval (the val -> test gap is the
    report's, `pipeline.champion.honest_figures`, in the model's metadata)."""
    correct = sum(evaluation.confusion[i][i] for i in range(len(evaluation.confusion)))
    return sealed_test_figures(correct, evaluation.n_images)


def recorded_test_input(tracker: Tracker, parent: str | None) -> DatasetInput | None:
    """The test split's dataset input as the parent run recorded it when the study started
    (`track.log_study`); None for a study run before inputs were logged."""
    return next((i for i in tracker.dataset_inputs(parent) if input_context(i) == "test"), None)


def register_selected(
    cfg: StudyConfig,
    tracker: Tracker,
    parent: str | None,
    selected: FrozenTrial,
    checkpoint: TrialCheckpoint,
    sha256: str,
    evaluation: TestEvaluation,
    extra: Mapping[str, Any] | None = None,
) -> registry.Registered:
    """Register the selected checkpoint once under `registry.model_name` and point the alias at it.

    The model is attached to the selected trial's nested run when it is in `tracker`'s store, else
    to the parent run, else to none (the study's runs live in another tracking store).

    Raises:
        RegistryError: the store fails while looking the runs or versions up, the registration
            fails, or no val image can be read for the input example.
        DataError: the val folder is gone (only on first registration).
    """
    # The probe's run is made after its trial finished, so only MLflow knows its id.
    own = TrialRecord.from_frozen(selected).mlflow_run_id or (tracker.trial_runs() or {}).get(selected.number)
    trial_run = existing_run(tracker, own)
    run_id = trial_run or existing_run(tracker, parent)
    return registry.register(
        lambda: export(
            cfg,
            selected,
            checkpoint,
            sha256,
            evaluation,
            parent,
            extra,
            recorded_test_input(tracker, parent),
            trial_run,
        ),
        study=cfg.study.name,
        sha256=sha256,
        tracking=tracker.uri,
        experiment_id=tracker.experiment_id,
        run_id=run_id,
        name=cfg.registry.model_name,
        alias=cfg.registry.alias,
        serialization_format=cfg.registry.serialization_format,
    )


def existing_run(tracker: Tracker, run_id: str | None) -> str | None:
    """`run_id` when the tracking store holds that run; None when it does not (or no id is given).

    Raises:
        RegistryError: the store fails to answer (any error other than "run does not exist"):
            attaching the model elsewhere would lose its lineage for good.
    """
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        tracker.client.get_run(run_id)
    except MlflowException as err:
        if registry.not_found(err):
            return None  # the run lives in another store (a different --tracking-uri)
        raise RegistryError(
            f"looking up MLflow run {run_id} in {tracker.uri} failed: {first_line(err)}; "
            "nothing was registered: run `sweep report` again once the store answers"
        ) from None
    return run_id


def export(
    cfg: StudyConfig,
    selected: FrozenTrial,
    checkpoint: TrialCheckpoint,
    sha256: str,
    evaluation: TestEvaluation,
    parent: str | None,
    extra: Mapping[str, Any] | None = None,
    tested_on: DatasetInput | None = None,
    trial_run: str | None = None,
) -> registry.Export:
    """The registered model with the metadata that makes it usable alone, and its lineage tags.

    Metadata: classes (index order), class_to_idx, preprocess, arch, weights_origin, study,
    trial_number, best_epoch, params, `<metric>` (the trial's value), test_accuracy (0-1),
    checkpoint_sha256 and a note on the output. The model is logged at `best_epoch`; its own
    metrics are test_accuracy, its 95% interval (test_accuracy_ci_low/high) and test_loss, on
    `tested_on` (the test split's dataset input). `trial_run`: the selected trial's MLflow run
    (the `sweep.trial_run_id` tag), None when the store does not hold it.
    `extra` adds the selection: candidates, test accuracy with its interval, val -> test gap
    (`pipeline.champion.metadata`).

    Raises:
        DataError, RegistryError: from `input_example`.
    """
    metric = cfg.study.metric
    metadata = {
        "classes": list(evaluation.classes),
        "class_to_idx": dict(checkpoint.class_to_idx),
        "preprocess": dict(checkpoint.preprocess),
        "arch": checkpoint.arch,
        "weights_origin": checkpoint.weights_origin,
        "study": cfg.study.name,
        "trial_number": selected.number,
        "best_epoch": checkpoint.best_epoch,
        "params": dict(checkpoint.params),
        metric: checkpoint.value,
        "test_accuracy": evaluation.accuracy,
        "checkpoint_sha256": sha256,
        "output": "class probabilities (softmax), columns in `classes` order",
        **(extra or {}),  # the selection's figures (pipeline.champion.metadata)
    }
    tags = {
        registry.STUDY_TAG: cfg.study.name,
        registry.TRIAL_TAG: str(selected.number),
        registry.PARENT_TAG: parent or "",
        registry.RUN_TAG: trial_run or "",
        registry.SHA_TAG: sha256,
    }
    figures = figures_of(evaluation)
    description = (
        f"study {cfg.study.name}, trial {selected.number} (epoch {checkpoint.best_epoch}): "
        f"{metric} {checkpoint.value:.4f}; {figures.describe()}; "
        f"{checkpoint.arch} from {checkpoint.weights_origin}"
    )
    model_metrics = {
        "test_accuracy": evaluation.accuracy,
        "test_accuracy_ci_low": figures.low,
        "test_accuracy_ci_high": figures.high,
        "test_loss": evaluation.loss,
    }
    example, image_example = input_example(cfg, checkpoint)
    return registry.Export(
        registry.export_module(rebuild(checkpoint)),
        example,
        image_example,
        metadata,
        tags,
        description,
        step=checkpoint.best_epoch,
        model_metrics=model_metrics,
        metrics_input=tested_on,
    )


def input_example(cfg: StudyConfig, checkpoint: TrialCheckpoint) -> tuple[np.ndarray, bytes]:
    """The first readable val image (never a test one), as the model sees it and as users send it.

    Returns:
        (float32 `(B, 3, crop, crop)` preprocessed, B = 2 for "pt2" (its export keeps a batch axis
        of size 1 static) else 1; the image re-encoded as JPEG at the working size, the MLflow
        input example: a few tens of kB where the file itself may be megabytes).

    Raises:
        DataError: the data root or val folder is gone.
        RegistryError: no val image can be decoded.
    """
    d = cfg.data
    size = 2 if cfg.registry.serialization_format == "pt2" else 1
    splits = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed, d.val_fraction)
    pp = eval_preprocess(checkpoint)
    for rel, _ in splits.val:
        path = splits.root / rel
        if D.check_image(path) is None:  # an unreadable val image (bad_images: skip): take the next one
            image = D.load_rgb(path)
            example = D.eval_transform(pp)(image).numpy()[None].astype(np.float32)
            encoded = io.BytesIO()
            scale = min(1.0, pp.resize / min(image.size))  # short side at most the working size
            small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
            small.save(encoded, format="JPEG", quality=90)
            return example.repeat(size, axis=0), encoded.getvalue()
    raise RegistryError(f"{d.root / (d.val or d.train)}: no readable val image for the model's input example")
