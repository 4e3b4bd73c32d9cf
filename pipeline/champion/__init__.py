"""Choosing the model to register, without the test split: the trials table, the candidates
(mean over seeds), the champion and its optional refit on train + val; then the one sealed-test
evaluation and its honest figures (Wilson interval, val -> test gap).
"""

from pipeline.champion._champion import Choice, choose, honest_figures, metadata, record_tested, tested_model
from pipeline.champion._comparison import (
    Cleanup,
    Compute,
    clean_checkpoints,
    compute_spent,
    ranked_complete,
    trials_frame,
)
from pipeline.champion._confidence import TestFigures, sealed_test_figures
from pipeline.champion._evaluation import TestEvaluation, eval_preprocess, evaluate_once, rebuild

__all__ = [
    "Choice",
    "Cleanup",
    "Compute",
    "TestEvaluation",
    "TestFigures",
    "choose",
    "clean_checkpoints",
    "compute_spent",
    "eval_preprocess",
    "evaluate_once",
    "honest_figures",
    "metadata",
    "ranked_complete",
    "rebuild",
    "record_tested",
    "sealed_test_figures",
    "tested_model",
    "trials_frame",
]
