"""The two composition roots, as torchvision's `train.py::main`: `run_study` (stores, split
record, baselines, the run of trials with its observers) and `run_report` (champion, sealed test,
registry, report files).
"""

from pipeline.stages._report import run_report
from pipeline.stages._study_run import StudyOutcome, check_stores, run_study

__all__ = ["StudyOutcome", "check_stores", "run_report", "run_study"]
