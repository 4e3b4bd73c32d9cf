"""`sweep predict`: load a registered model and predict the class of image files.

Every input gets the checks training gives it (`pipeline.data`):
- Folders are expanded with the training scan's rules (`data.list_images`): files with an
  extension Pillow opens as an image are read; the other files, and hidden ones, are counted by
  extension in one warning per folder. A file named on the command line is always tried.
- Every file is fully decoded once by `imagefiles.decode_image`, with the pre-flight scan's reasons
  ("empty file", "not an image file", "cannot be decoded (...)", Pillow's decompression-bomb
  limit included), so a file gets the same one-line message here as in training. A file whose
  content is another format than its extension says is used, with one warning; warnings Pillow
  raises while decoding ("Corrupt EXIF data") become one warning line naming the files.

The other images of a batch: a file that cannot be read, a path that does not exist and a folder
without images are skipped and named (one warning line on stderr, and a record with an `error` in
the output, in input order); every other image is
predicted and the exit status is 0. When no image at all can be read, `DataError` (exit 3).

Which store: the tracking URI is `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else the embedded
store (`$SWEEP_HOME/mlflow.db`), see `stores.resolve_tracking`. The registry, which resolves
`models:/` URIs, is `--tracking-uri`, else `$MLFLOW_REGISTRY_URI`, else the tracking URI (MLflow's
own order). A tracking URI naming a SQLite file that does not exist is replaced by the registry
URI, so predicting never creates an empty store.

Output (`render_predictions`): JSON lines or a table. A JSON line is
`{"file", "label", "probability", "probabilities"}` for a predicted image (probabilities 0-1 by
class name) and `{"file", "error"}` for a skipped one. The JSON is ASCII (other characters as
`\\u` escapes of valid code points), hence valid UTF-8 for any file name: a name that is not valid
UTF-8 appears in "file" with each undecodable byte replaced by U+FFFD, and its exact bytes in
"file_bytes_b64" (standard base64 of the path as the OS gives it), present only for such names.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import data as D
from pipeline.core import DataError, RegistryError, TrackingError, connection_refused, first_line, mask_url

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def display_name(path: str | Path) -> str:
    """`path` as valid text: bytes that are not UTF-8 become U+FFFD (the path itself is untouched)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _exact_bytes(path: str | Path) -> str | None:
    """Base64 of the path's bytes when they are not valid UTF-8, else None."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii")
    return None


@dataclass(frozen=True)
class Prediction:
    """One input file: the most probable class and every class probability (0-1), or, for a file
    that cannot be read, `error` (and no label)."""

    file: str  # the path as Python holds it (os.fsdecode: undecodable bytes as surrogate escapes)
    label: str | None
    probability: float | None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"file": display_name(self.file)}
        exact = _exact_bytes(self.file)
        if exact is not None:
            record["file_bytes_b64"] = exact
        if self.error is not None:
            return {**record, "error": self.error}
        return {**record, "label": self.label, "probability": self.probability, "probabilities": self.probabilities}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=True)


@dataclass(frozen=True)
class BadPath:
    """A command-line path that gives no image: skipped and named, as an unreadable image is."""

    path: Path
    reason: str  # "no such file or folder", "no image files in this folder (...)"


def image_files(paths: list[Path], warn: Warn = _stderr) -> list[Path | BadPath]:
    """Expand files and folders (recursively, the training scan's rules) into image files, in
    input order; a path that does not exist or a folder without images is a `BadPath`.

    Raises:
        DataError: no path gives an image file (the one message names each path).
    """
    found: list[Path | BadPath] = []
    for path in map(Path, paths):
        if path.is_dir():
            listing = D.list_images(path)
            if not listing.images:
                held = f" (only other files: {D.ignored_kinds(listing.ignored, path)})" if listing.ignored else ""
                found.append(BadPath(path, f"no image files in this folder{held}"))
                continue
            if listing.ignored:
                warn(D.ignored_files_message(path, listing.ignored))
            found += listing.images
        elif path.is_file():
            found.append(path)
        else:
            found.append(BadPath(path, "no such file or folder"))
    bad = [f for f in found if isinstance(f, BadPath)]
    if found and len(bad) == len(found):
        hint = (
            "give image files (extensions Pillow opens, e.g. .jpg, .png, .webp) or a folder of them"
            if any(f.reason.startswith("no image files") for f in bad)
            else "give image files or folders of images"
        )
        raise DataError("; ".join(f"{display_name(f.path)}: {f.reason}" for f in bad) + f"; {hint}")
    return found


def load_model(model_uri: str, tracking: str, registry: str | None = None) -> tuple[PyFuncModel, dict[str, Any]]:
    """Load a registered model with the pyfunc flavour.

    Args:
        tracking: MLflow tracking URI (resolves `runs:/` URIs and artifacts).
        registry: MLflow registry URI (resolves `models:/` URIs); default `tracking`.

    Returns:
        (pyfunc model, its sweep metadata dict).

    Raises:
        RegistryError: no store at an embedded path, unknown URI/alias/version, unreadable
            artifacts, or a model that was not registered by `sweep report` (no classes/preprocess
            metadata).
    """
    import mlflow

    from pipeline.config import sqlite_path

    registry = registry or tracking
    if ":/" not in model_uri and not Path(model_uri).is_dir():
        raise RegistryError(
            f"{model_uri}: not a model URI or a model folder; give models:/NAME@ALIAS (e.g. "
            f"models:/{model_uri.strip('/') or 'NAME'}@champion), models:/NAME/VERSION, runs:/RUN_ID/model "
            "or the folder of a saved MLflow model"
        )
    store = sqlite_path(registry if model_uri.startswith("models:/") else tracking)
    if store is not None and not store.is_file():
        # MLflow would create an empty store there and then report an unknown model
        raise RegistryError(
            f"no MLflow store at {store}: pass --tracking-uri, or set MLFLOW_TRACKING_URI "
            "(or SWEEP_HOME), to the store `sweep report` registered the model in"
        )
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(registry)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as err:  # noqa: BLE001  MlflowException, OSError, unpickling errors
        if connection_refused(err):  # the server, not the model: the same exit code as `run` and `report` give
            raise TrackingError(
                f"MLflow tracking server {mask_url(registry)} cannot be used: connection refused; start it, "
                "or fix --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
        where = tracking if registry == tracking else f"{tracking} (registry {registry})"
        raise RegistryError(
            f"{model_uri}: cannot be loaded from {where} ({first_line(err)}); "
            "check the name, version or alias (`mlflow ui`, `sweep report`) and "
            "--tracking-uri"
        ) from None
    meta = (model.metadata.metadata or {}) if model.metadata else {}
    if not {"classes", "preprocess"} <= set(meta):
        raise RegistryError(
            f"{model_uri}: has no sweep metadata (classes, preprocess); only models "
            "registered by `sweep report` can be used with `sweep predict`"
        )
    return model, meta


def eval_transform(preprocess: dict[str, Any]) -> D.Transform:
    """The study's eval transform from a registered model's `preprocess` metadata."""
    pp = D.Preprocess(
        preprocess["resize"],
        preprocess["crop"],
        tuple(preprocess["mean"]),
        tuple(preprocess["std"]),
        preprocess.get("interpolation", "bilinear"),
    )
    return D.eval_transform(pp)


def preprocess_images(files: list[Path], preprocess: dict[str, Any]) -> np.ndarray:
    """Decode (`imagefiles.decode_image`) and eval-transform images exactly as the study's val/test images.

    Returns:
        float32 array `(len(files), 3, crop, crop)`.

    Raises:
        DataError: one or more files cannot be read (all of them named, on one line).
    """
    transform = eval_transform(preprocess)
    arrays, bad = [], []
    for path in files:
        image, check = D.decode_image(path)
        if image is None:
            bad.append(f"{display_name(path)}: {check.reason}")
        else:
            arrays.append(transform(image).numpy())
    if bad:
        raise DataError(f"{len(bad)} unreadable image file(s): {'; '.join(bad)}")
    return np.stack(arrays).astype(np.float32)


def predict_files(
    model_uri: str, paths: list[Path], tracking: str | None = None, batch_size: int = 32, warn: Warn = _stderr
) -> list[Prediction]:
    """Predict the class of every image under `paths` with a registered model.

    Images are decoded and predicted `batch_size` at a time, so memory stays bounded for large
    folders. Files that cannot be read are skipped and named (see the module docstring).

    Args:
        model_uri: e.g. `models:/hymenoptera-classifier@champion`, `models:/NAME/3`, `runs:/...`.
        tracking: `--tracking-uri`; None: `$MLFLOW_TRACKING_URI`, else the embedded store.
        batch_size: images per forward pass.
        warn: receives each one-line warning (default: `warning: ...` on stderr).

    Returns:
        One `Prediction` per file, in input order (skipped files carry `error`).

    Raises:
        DataError: no path gives an image file (before the model is loaded), or no file that
            can be read at all. A missing path or an image-less folder among others is skipped
            and named, like an unreadable file.
        RegistryError: the model cannot be loaded or lacks sweep metadata.
    """
    from pipeline.config import resolve_tracking, sqlite_path
    from pipeline.tracking import quiet_mlflow

    quiet_mlflow()
    files = image_files(paths, warn)
    tracking_uri = resolve_tracking(tracking, None)
    registry = tracking or os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    missing = sqlite_path(tracking_uri)
    if missing is not None and not missing.is_file():
        tracking_uri = registry  # never create an empty tracking store: the registry's holds the runs
    model, meta = load_model(model_uri, tracking_uri, registry)
    classes, transform = list(meta["classes"]), eval_transform(meta["preprocess"])
    found = D.Findings()
    unusable: list[tuple[str, str]] = []  # bad command-line paths, named with the unreadable files
    predictions: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        arrays, rows = [], []
        for path in chunk:
            if isinstance(path, BadPath):
                unusable.append((display_name(path.path), path.reason))
                rows.append(Prediction(os.fsdecode(path.path), None, None, {}, path.reason))
                continue
            image, check = D.decode_image(path)
            found.add(display_name(path), check, path.suffix)
            rows.append(Prediction(os.fsdecode(path), None, None, {}, check.reason))
            if image is not None:
                arrays.append(np.asarray(image))
        probs: Iterator[np.ndarray] = iter(probabilities(model, classes, arrays, transform) if arrays else [])
        for row in rows:
            if row.error is None:
                p = next(probs)
                row = Prediction(
                    row.file,
                    classes[int(p.argmax())],
                    float(p.max()),
                    {c: float(v) for c, v in zip(classes, p, strict=True)},
                )
            predictions.append(row)
    for message in found.messages("predict"):
        warn(message)
    bad = unusable + found.bad
    if len(bad) == len(files):
        head = "" if len(files) == 1 else f"none of the {len(files)} image files can be read: "
        raise DataError(head + _named(bad))
    if bad:
        what = "inputs that give no image" if unusable else "image files that cannot be read"
        warn(f"skipped {len(bad)} of {len(files)} {what} (the others are predicted): {_named(bad)}")
    return predictions


def probabilities(
    model: PyFuncModel, classes: list[str], images: list[np.ndarray], transform: D.Transform
) -> np.ndarray:
    """Class probabilities `(N, classes)` of decoded uint8 `(H, W, 3)` images.

    A model registered with its own preprocessing (`pyfunc_model.py`) gets the pixels through
    its pyfunc `predict`, the path a deployed model takes; one registered before that (PyTorch
    flavour, float32 `(N, 3, crop, crop)` input) gets them eval-transformed here.
    """
    from PIL import Image

    if "pytorch" in (model.metadata.flavors if model.metadata else {}):
        batch = np.stack([transform(Image.fromarray(a)).numpy() for a in images]).astype(np.float32)
        return np.asarray(model.predict(batch))
    frame = pd.DataFrame(model.predict(pd.DataFrame({"image": images})))
    return np.array([[row[c] for c in classes] for row in frame["probabilities"]])


def _named(bad: list[tuple[str, str]], shown: int = 5) -> str:
    """'NAME: reason' (the pre-flight scan's line) for up to `shown` files, '; '-separated."""
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    return "; ".join(f"{name}: {why}" for name, why in bad[:shown]) + more
