"""Pretrained classifiers: weights by name or local checkpoint (`resolve_weights`), a new head
(`build_model`), freeze depth over each architecture family's ordered stages, the frozen prefix /
trainable suffix cut, and the trial checkpoint written at the best epoch (`TrialCheckpoint`).
"""

from pipeline.models._checkpoints import TrialCheckpoint, remove, resolve, sha256
from pipeline.models._model import build_model, freeze, head_names, set_train_mode, stages, trainable_parameters
from pipeline.models._prefix import Split, split
from pipeline.models._weights import (
    LoadReport,
    WeightsSpec,
    pretrained_state,
    resolve_preprocess,
    resolve_weights,
    weights_preprocess,
)

__all__ = [
    "LoadReport",
    "Split",
    "TrialCheckpoint",
    "WeightsSpec",
    "build_model",
    "freeze",
    "head_names",
    "pretrained_state",
    "remove",
    "resolve",
    "resolve_preprocess",
    "resolve_weights",
    "set_train_mode",
    "sha256",
    "split",
    "stages",
    "trainable_parameters",
    "weights_preprocess",
]
