"""What the study's parent run says once the report has run: a description (the run page's
Description, MLflow's `mlflow.note.content` tag) and the selected trial's figures as metrics.

The description is Markdown: trial counts by state, the selected trial with its val figure and
epoch, the sealed-test accuracy with its 95% interval and the val -> test gap (the report's figures,
`Outcome.figures`: val is the champion's mean over seeds), the registered
model's URI and where the full report is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from optuna.trial import FrozenTrial

from pipeline.config import StudyConfig
from pipeline.report._markdown import Outcome, trial_phrase
from pipeline.search import TrialRecord
from pipeline.tracking import Tracker

NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description
STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def checkpoint_val_accuracy(trial: FrozenTrial) -> float | None:
    """Val accuracy (0-1) of the trial's checkpoint epoch (`best_epoch`; the last epoch when not
    recorded); None when the trial reported no epoch."""
    r = TrialRecord.from_frozen(trial)
    history = r.history
    if not history:
        return None
    epoch = r.best_epoch
    row = next((h for h in history if h["epoch"] == epoch), history[-1])
    return float(row["val_accuracy"])


def describe(cfg: StudyConfig, trials: Sequence[FrozenTrial], outcome: Outcome, report_file: str) -> str:
    """The parent run's description (Markdown), e.g.::

    **Study `tiny`**: 4 trials (2 complete, 1 pruned, 1 failed).

    Selected **trial 1**: val_accuracy 0.9744 at epoch 4.
    Sealed test split: test accuracy 0.909 (70/77; 95% CI 0.824-0.955, wilson); val 0.974, gap +0.065.
    Registered model: `models:/tiny-classifier@champion` (version 1).
    Full report: `report/report.html` in this run's artifacts.
    """
    counts = Counter(t.state.name for t in trials)
    states = ", ".join(f"{counts[s]} {word}" for s, word in STATE_WORDS.items() if counts[s])
    selected, registered = outcome.selected, outcome.registered
    figures = outcome.figures
    lines = [
        f"**Study `{cfg.study.name}`**: {len(trials)} trials ({states}).",
        "",
        f"Selected {trial_phrase(cfg, selected)}.",
        f"Sealed test split: {figures.describe()}.",
        f"Registered model: `{registered.uri}` (version {registered.version}).",
        f"Full report: `{report_file}` in this run's artifacts.",
    ]
    return "\n".join(lines)


def summarise_parent(
    tracker: Tracker,
    parent: str | None,
    cfg: StudyConfig,
    trials: Sequence[FrozenTrial],
    outcome: Outcome,
    fresh: bool,
    report_file: str = "report/report.html",
) -> None:
    """Set the parent run's description; with a fresh test evaluation (`fresh`), also log the
    selected trial's value (`selected_<metric>`; plus `selected_val_accuracy` of its checkpoint
    epoch in a val_loss study) and the test accuracy's 95% interval (`test_accuracy_ci_low`,
    `test_accuracy_ci_high`) as metrics, once, beside the `test_accuracy` the report logs."""
    tracker.set_tags(parent, {NOTE_TAG: describe(cfg, trials, outcome, report_file)})
    if not fresh:
        return
    selected, metric = outcome.selected, cfg.study.metric
    val, figures = checkpoint_val_accuracy(selected), outcome.figures
    metrics = {"test_accuracy_ci_low": figures.low, "test_accuracy_ci_high": figures.high}
    if selected.value is not None:
        metrics[f"selected_{metric}"] = selected.value
    if val is not None and metric != "val_accuracy":
        metrics["selected_val_accuracy"] = val
    tracker.log_metrics(parent, metrics, step=0)
