"""Model hand-off: log the selected model, register it, move the alias (loading it back to
predict is `pipeline.registry`).

What is registered (one MLflow model per selected checkpoint):
- An MLflow pyfunc model that carries its own preprocessing (`pyfunc_model.py`, the model's code,
  with `pipeline/data/portable.py` in its `code/` folder): image paths, encoded bytes or uint8
  pixels in, `label` / `probability` / `probabilities` by class name out, so it loads and serves
  (`mlflow models serve`) where only mlflow, torch and torchvision are installed. Its signature
  says so and its input example is one encoded val image.
- Inside it, the `classifier` artifact: `torch.nn.Sequential(net=<classifier>,
  probabilities=Softmax(dim=1))` in eval mode on the CPU, float32 `(N, 3, H, W)` normalised
  images (H = W = the eval crop) -> float32 `(N, num_classes)` probabilities in `class_to_idx`
  order (`unwrap_python_model().module`; `.net` is the bare classifier).
- Metadata (`MLmodel` -> `metadata`, also `pyfunc_model.metadata.metadata`) that makes the model
  usable alone: `classes` (index order), `class_to_idx`, `preprocess` (resize, crop, mean, std,
  interpolation of the eval transform), `arch`, `weights_origin`, `study`, `trial_number`,
  `best_epoch`, `params`, the validation value and `test_accuracy`.
- Model-version tags for lineage: `sweep.study`, `sweep.trial_number`, `sweep.parent_run_id`,
  `sweep.trial_run_id`, `sweep.checkpoint_sha256`.
- The logged model sits at the checkpoint's epoch (`step`), so MLflow copies that epoch's metrics
  of the trial's run onto it (not epoch 0's), and the sealed-test figures are logged on the model
  itself with the test split as their dataset, so the Models page shows what the champion scored.

Serialization (`registry.serialization_format`) of the classifier artifact: "pickle" (default)
stores the `nn.Module`, which can be inspected or fine-tuned further; it needs compatible
torch/torchvision(/timm) at load time and, like any pickle, runs code on load: load only models
from a registry you trust. "pt2" stores a `torch.export` program (no pickle of classes; it loads
back as a `GraphModule` for inference), at the cost of an export at logging time.

A selected checkpoint is registered once: a later report finds the version by its
`sweep.checkpoint_sha256` + `sweep.study` tags and only (re)points the alias at it.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.core import RegistryError, first_line
from pipeline.data import portable

SHA_TAG = "sweep.checkpoint_sha256"
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial_number"
PARENT_TAG = "sweep.parent_run_id"
RUN_TAG = "sweep.trial_run_id"
ARTIFACT_NAME = "model"

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from torch import nn


@dataclass(frozen=True)
class Registered:
    """A model version holding the selected model."""

    name: str
    version: str
    alias: str
    created: bool  # False: the version existed already (same study + checkpoint sha256)
    previous_alias_version: str | None  # where the alias pointed before, None if nowhere

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


# ---- export -----------------------------------------------------------------------------------


def export_module(classifier: nn.Module) -> nn.Module:
    """Wrap a classifier (logits) so the registered model returns class probabilities.

    Only torch classes are added, so unpickling needs no `pipeline` import.
    """
    from torch import nn

    wrapped = nn.Sequential(OrderedDict(net=classifier, probabilities=nn.Softmax(dim=1)))
    return wrapped.cpu().eval()


def signature() -> ModelSignature:
    """One image per row in (a path, encoded bytes, base64 text or uint8 pixels: MLflow's `binary`
    column, base64-decoded in JSON requests); `label`, `probability` (0-1), `probabilities`
    ({class name: 0-1}) and `error` (set only for an item that cannot be read) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Map

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def pip_requirements(arch: str) -> list[str]:
    """Pinned requirements of the logged model, given explicitly: MLflow's inference would load the
    model in a subprocess (seconds) and may miss torchvision/timm, which loading the module needs."""
    import importlib.metadata as md

    names = ["mlflow", "torch", "torchvision", "pillow", "numpy", "pandas"]
    names += ["timm"] if arch.startswith("timm/") else []
    return [f"{n}=={md.version(n).split('+')[0]}" for n in names]


def not_found(err: Exception) -> bool:
    """True when `err` is MLflow's "resource does not exist" (no such run, registered model or
    version); every other MLflow error is the store failing, not an answer."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return isinstance(err, MlflowException) and err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def find_version(client: MlflowClient, name: str, study: str, sha256: str) -> ModelVersion | None:
    """The model version of `name` registered for this study's checkpoint (the lowest one if
    several), or None when there is none or no registered model `name` yet.

    Raises:
        RegistryError: the registry fails to answer: reading that as "not registered yet" would
            register the same checkpoint a second time.
    """
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if not_found(err):
            return None
        raise RegistryError(
            f"looking up the versions of model '{name}' failed: {first_line(err)}; "
            "nothing was registered: run `sweep report` again once the store answers"
        ) from None
    found = [v for v in versions if v.tags.get(SHA_TAG) == sha256 and v.tags.get(STUDY_TAG) == study]
    return min(found, key=lambda v: int(v.version)) if found else None


@dataclass(frozen=True)
class Export:
    """What gets logged: built only when the registry does not hold the checkpoint yet."""

    module: Any  # from `export_module`
    example: np.ndarray  # float32 (B, 3, H, W); B >= 2 for "pt2", so it exports a dynamic batch axis
    image_example: bytes  # one encoded val image: the model's MLflow input example
    metadata: dict[str, Any]  # must hold `classes` and `arch`
    tags: dict[str, str]  # model-version tags
    description: str
    step: int = 0  # the checkpoint's epoch (0-based): the run metrics at this step go onto the model
    model_metrics: dict[str, float] = field(default_factory=dict)  # test figures, logged on the model
    metrics_input: DatasetInput | None = None  # the dataset `model_metrics` were measured on


def register(
    build: Callable[[], Export],
    *,
    study: str,
    sha256: str,
    tracking: str,
    experiment_id: str,
    run_id: str | None,
    name: str,
    alias: str,
    serialization_format: str,
) -> Registered:
    """Register the selected checkpoint once, then point `alias` at its version.

    A version of `name` tagged with this `study` and `sha256` is reused; otherwise `build()` is
    called and its module logged with the MLflow PyTorch flavour and registered.

    Args:
        tracking: MLflow tracking URI, also used as the registry URI.
        experiment_id: experiment that holds the logged model (the study's).
        run_id: run the logged model is attached to (the selected trial's nested run); its status
            is not changed.

    Raises:
        RegistryError: the model cannot be logged or registered (message has the store and cause).
        DataError, ModelError: from `build`.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    existing = find_version(client, name, study, sha256)
    try:
        if existing is None:
            version = _log_and_register(build(), tracking, experiment_id, run_id, name, serialization_format)
        else:
            version = str(existing.version)
        previous = alias_version(client, name, alias)
        if previous != version:
            client.set_registered_model_alias(name, alias, version)
    except (MlflowException, OSError, RuntimeError) as err:
        # MlflowException: the tracking/registry store (its SQL and HTTP errors arrive wrapped in it);
        # OSError: writing the model's artifacts; RuntimeError: torch.export ("pt2") rejecting the model.
        raise RegistryError(f"registering model '{name}' in {tracking} failed: {first_line(err)}") from None
    return Registered(name, version, alias, existing is None, previous)


def _log_and_register(
    export: Export, tracking: str, experiment_id: str, run_id: str | None, name: str, serialization_format: str
) -> str:
    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    # A logged model goes to the active experiment, not its run's: without this it would land in
    # experiment 0 and its relative artifact folder.
    mlflow.set_experiment(experiment_id=experiment_id)
    with tempfile.TemporaryDirectory(prefix="sweep-model-") as folder, registry_banners_dropped():
        # Model.log, not pyfunc.log_model: only it attaches the model to an existing run (the
        # trial's) without starting it, which would end it as FINISHED.
        info = Model.log(
            artifact_path=None,
            name=ARTIFACT_NAME,
            flavor=mlflow.pyfunc,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            code_paths=[portable.__file__],
            artifacts={"classifier": save_module(export, Path(folder), serialization_format)},
            model_config={"classes": export.metadata["classes"], "preprocess": export.metadata["preprocess"]},
            signature=signature(),
            input_example=pd.DataFrame({"image": [export.image_example]}),
            metadata=export.metadata,
            tags=export.tags,
            pip_requirements=pip_requirements(export.metadata["arch"]),
            registered_model_name=name,
            run_id=run_id,
            step=export.step,
        )
    client = mlflow.MlflowClient(tracking, registry_uri=tracking)
    if run_id is not None and export.model_metrics:
        log_model_metrics(client, run_id, info.model_id, export)
    version = str(info.registered_model_version)
    client.update_model_version(name, version, description=export.description)
    return version


BANNERS = ("Successfully registered model '", "Created version '", "Registered model '")


@contextlib.contextmanager
def registry_banners_dropped() -> Iterator[None]:
    """MLflow prints "Successfully registered model 'x'." and "Created version '1' of model 'x'."
    straight to stderr while registering; the report says the same in its own line, so those two
    are dropped and anything else it writes there is passed on."""
    caught = io.StringIO()
    try:
        with contextlib.redirect_stderr(caught):
            yield
    finally:
        kept = [line for line in caught.getvalue().splitlines(keepends=True) if not line.startswith(BANNERS)]
        sys.stderr.write("".join(kept))


def save_module(export: Export, folder: Path, serialization_format: str) -> str:
    """Write the torch module for the model's `classifier` artifact; returns its path.

    "pickle": `torch.save` of the `nn.Module` (inspectable and fine-tunable after loading).
    "pt2": a `torch.export` program with a dynamic batch axis (no pickled classes).
    """
    import torch

    if serialization_format == "pt2":
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(export.module, (torch.from_numpy(export.example),), dynamic_shapes=({0: batch},))
        path = folder / "classifier.pt2"
        torch.export.save(program, path)
    else:
        path = folder / "classifier.pt"
        torch.save(export.module, path)
    return str(path)


def log_model_metrics(client: MlflowClient, run_id: str, model_id: str, export: Export) -> None:
    """Log `export.model_metrics` on the logged model `model_id` (through its source run, at the
    model's step), each tied to `export.metrics_input`'s dataset, which the run records as an input."""
    import time

    from mlflow.entities import Metric

    dataset = export.metrics_input.dataset if export.metrics_input is not None else None
    if export.metrics_input is not None:
        client.log_inputs(run_id, datasets=[export.metrics_input])
    now = int(time.time() * 1000)
    batch = [
        Metric(
            k,
            float(v),
            now,
            export.step,
            model_id=model_id,
            dataset_name=dataset.name if dataset else None,
            dataset_digest=dataset.digest if dataset else None,
        )
        for k, v in export.model_metrics.items()
    ]
    client.log_batch(run_id, metrics=batch)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version `alias` of registered model `name` points at; None when the alias is not set
    or the registered model does not exist.

    Raises:
        MlflowException: the registry fails to answer (any error but "does not exist").
    """
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as err:
        if not_found(err):
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else str(version)
