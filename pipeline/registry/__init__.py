"""The hand-off: log the champion as an MLflow model with its metadata, register it, move the
alias, and load it back to predict on image files.
"""

from pipeline.registry._handoff import register_selected
from pipeline.registry._predict import Prediction, display_name, predict_files
from pipeline.registry._versions import Registered

__all__ = ["Registered", "predict_files", "register_selected", "Prediction", "display_name"]
