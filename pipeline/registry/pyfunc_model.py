"""The registered model's code (MLflow "models from code"): an image classifier that takes what
users have and returns class names with probabilities, with nothing of `pipeline` installed.

MLflow copies this file into the model and runs it at load time, with the model's `code/` folder
(which holds `portable.py`, the study's decoding and eval transform) on `sys.path`. Input, one
image per row of a one-column DataFrame, or a list / Series / 1-D array of:
- image file paths (`str`), encoded image bytes (JPEG, PNG, WEBP, ...), or base64 text of them
  (what an `mlflow models serve` JSON request carries; MLflow decodes `binary` columns itself);
- uint8 pixel arrays `(H, W, 3)` (a DataFrame column of them; a whole `(N, H, W, 3)` batch goes
  through `unwrap_python_model().predict_arrays`).
Output: a DataFrame, one row per input in order: `label` (class name), `probability` (0-1),
`probabilities` ({class name: 0-1}) and `error` (None, or why the item could not be read; its
other fields are then empty), so one bad image never fails the batch.

The tensor path: `unwrap_python_model().module` is the torch `Sequential(net=<classifier>,
probabilities=Softmax)` taking float32 `(N, 3, crop, crop)` normalised images (`.net`: logits).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

try:  # in a loaded model: the copy in its code/ folder (code_paths)
    import portable  # type: ignore[import-not-found, unused-ignore]
except ModuleNotFoundError:  # logging from the project, which validates the model on an example
    from pipeline.data import portable

BATCH = 32  # images per forward pass: bounded memory for long inputs
CLASSIFIER = "classifier"  # the artifact key of the torch module


def load_module(path: str) -> torch.nn.Module:
    """The exported module: a `torch.export` program (`.pt2`, no pickled classes) or a pickled
    `nn.Module` (needs torchvision/timm at load; like any pickle, load only models you trust)."""
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    return torch.load(path, map_location="cpu", weights_only=False).eval()


class ImageClassifier(PythonModel):
    """Files, bytes or pixels in; class names and probabilities out (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        config = context.model_config
        self.classes: list[str] = list(config["classes"])
        pp = config["preprocess"]
        self.transform = portable.eval_transform(
            pp["resize"], pp["crop"], pp["mean"], pp["std"], pp.get("interpolation", "bilinear")
        )
        self.module = load_module(context.artifacts[CLASSIFIER])

    # `pd.DataFrame`: what MLflow hands over after enforcing the signature (a list, a Series or a
    # string become a one-column frame), and a hint it infers no second schema from.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.predict_items(_items(model_input))

    def predict_arrays(self, images: np.ndarray) -> pd.DataFrame:
        """uint8 `(N, H, W, 3)` pixels (RGB) -> the output DataFrame."""
        return self.predict_items(list(images))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """float32 `(N, 3, crop, crop)` normalised images -> float32 `(N, classes)` probabilities."""
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()

    def predict_items(self, items: list[Any]) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        for start in range(0, len(items), BATCH):
            rows += self._batch(items[start : start + BATCH])
        frame = pd.DataFrame(rows, columns=["label", "probability", "probabilities", "error"])
        frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)  # None, not NaN
        return frame

    def _batch(self, items: list[Any]) -> list[dict[str, Any]]:
        tensors: list[np.ndarray] = []
        rows: list[dict[str, Any]] = []
        for item in items:
            try:
                tensors.append(self.transform(portable.open_item(item)).numpy())
                rows.append({"error": None})
            except Exception as err:  # noqa: BLE001  Pillow's plugins raise many types on corrupt data
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                rows.append(
                    {
                        "label": None,
                        "probability": None,
                        "probabilities": None,
                        "error": f"{portable.describe(item)}: {reason}",
                    }
                )
        probs = iter(self.probabilities(np.stack(tensors)) if tensors else [])
        for row in rows:
            if row["error"] is None:
                p = next(probs)
                row.update(
                    label=self.classes[int(p.argmax())],
                    probability=float(p.max()),
                    probabilities={c: float(v) for c, v in zip(self.classes, p, strict=True)},
                )
        return rows


def _items(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, Iterable):
        return list(model_input)
    return [model_input]


mlflow.models.set_model(ImageClassifier())
