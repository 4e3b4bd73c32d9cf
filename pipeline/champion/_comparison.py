"""Compare the trials of a study: the trials table, the compute spent, the ranking, the selected
trial and which trial checkpoints are kept.

Everything here reads Optuna's record only (`FrozenTrial` states, values, params and the user
attrs the objective writes: the epochs (`pipeline.search`), `epochs_run`, `seconds`, `mlflow_run_id`, `checkpoint`);
MLflow run statuses never choose anything. Only `clean_checkpoints` changes anything (it deletes
checkpoint files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline import models as M
from pipeline.config import StudyConfig, best_index, score_sign
from pipeline.core import RegistryError
from pipeline.search import TrialRecord, role, run_id_of

BASE_COLUMNS = ("number", "state", "role")
RESULT_COLUMNS = ("best_epoch", "epochs_run", "seconds", "mlflow_run_id")
STATE_WORDS = {
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


# ---- the trials table --------------------------------------------------------------------------


def best_of_history(history: Sequence[dict[str, Any]], metric: str, direction: str) -> tuple[float, int | None]:
    """Best value of `metric` over a trial's epochs and its 0-based epoch.

    Ties keep the earlier epoch, as `train.fit` does.

    Args:
        history: the trial's `history` user attr, one dict per epoch with `epoch` and `metric` keys.
        direction: "maximize" or "minimize".

    Returns:
        (value, epoch); (nan, None) when the trial reported no epoch.
    """
    if not history:
        return math.nan, None
    best = best_index([h[metric] for h in history], direction)
    return float(history[best][metric]), int(history[best]["epoch"])


def trial_seconds(trial: FrozenTrial) -> float:
    """Wall seconds of a trial: the `seconds` the objective recorded (the training itself), else
    Optuna's `FrozenTrial.duration` (start to end, for trials made elsewhere), else nan (a trial
    still running, or one whose process died before it ended)."""
    seconds = TrialRecord.from_frozen(trial).seconds
    if seconds is not None:
        return seconds
    return trial.duration.total_seconds() if trial.duration is not None else math.nan


def epochs_run(trial: FrozenTrial) -> int:
    """Epochs the trial trained: its `epochs_run` user attr, else the length of its history."""
    return TrialRecord.from_frozen(trial).epochs_run


def trials_frame(study: optuna.Study, cfg: StudyConfig) -> pd.DataFrame:
    """One row per trial, read from Optuna only (nothing is written).

    Columns: number, state, role (`selection.role`: search, seed_recipe, linear_probe, or "rerun of
    N seed K"), one column per sampled parameter (search-space order, then any other
    parameter sorted by name), `best_<metric>` (best value of the study's metric over the epochs
    run: the trial's value when COMPLETE), plus `best_val_accuracy` (fraction 0-1) when the metric
    is val_loss, best_epoch (0-based, the checkpoint's epoch; nullable Int64), epochs_run, seconds
    (wall, see `trial_seconds`), mlflow_run_id.

    Rows: COMPLETE and PRUNED trials first, sorted by `best_<metric>` in the study's direction
    (trials without a value last, ties by trial number), then FAIL/RUNNING trials the same way: a
    partial best must not sit above the winner.
    """
    trials = study.get_trials(deepcopy=False)
    metric, direction = cfg.study.metric, cfg.study.direction
    names = list(cfg.search_space)
    names += sorted({p for t in trials for p in t.params} - set(names))
    rows = []
    attrs = study.user_attrs
    for t in trials:
        r = TrialRecord.from_frozen(t)
        history = r.history
        best, epoch = best_of_history(history, metric, direction)
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "role": role(t),
                **{p: t.params.get(p) for p in names},
                "best_val_accuracy": best_of_history(history, "val_accuracy", "maximize")[0],
                f"best_{metric}": best,
                "best_epoch": epoch,
                "epochs_run": epochs_run(t),
                "seconds": trial_seconds(t),
                "mlflow_run_id": run_id_of(attrs, t),
            }
        )
    values = ["best_val_accuracy"] if metric == "val_accuracy" else [f"best_{metric}", "best_val_accuracy"]
    frame = pd.DataFrame(rows, columns=[*BASE_COLUMNS, *names, *values, *RESULT_COLUMNS])
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")
    unfinished = ~frame["state"].isin(["COMPLETE", "PRUNED"])
    return (
        frame.assign(_unfinished=unfinished)
        .sort_values(
            ["_unfinished", f"best_{metric}", "number"],
            ascending=[True, direction == "minimize", True],
            na_position="last",
            kind="stable",
        )
        .drop(columns="_unfinished")
        .reset_index(drop=True)
    )


# ---- compute ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compute:
    """Compute spent by the study and what pruning saved.

    Attributes:
        trial_epochs: epochs run by every trial, all states.
        seconds: wall seconds of every trial (trials without a known time count 0).
        pruned_trials: number of PRUNED trials.
        epochs_saved: sum over PRUNED trials of (planned epochs - epochs run).
        seconds_saved: `epochs_saved` priced at each pruned trial's mean epoch time (an estimate).
    """

    trial_epochs: int
    seconds: float
    pruned_trials: int
    epochs_saved: int
    seconds_saved: float

    @property
    def saved_fraction(self) -> float:
        """Share of the no-pruning compute (in trial-epochs) that pruning avoided, 0-1."""
        total = self.trial_epochs + self.epochs_saved
        return self.epochs_saved / total if total else 0.0


def compute_spent(trials: Sequence[FrozenTrial], planned_epochs: int) -> Compute:
    """Sum trial-epochs and seconds over all trials; estimate what pruning saved.

    Args:
        planned_epochs: `training.epochs`; a trial that sampled `epochs` uses its own value.
    """
    epochs, seconds, saved, saved_s, pruned = 0, 0.0, 0, 0.0, 0
    for t in trials:
        run, s = epochs_run(t), trial_seconds(t)
        epochs += run
        seconds += 0.0 if math.isnan(s) else s
        if t.state != TrialState.PRUNED:
            continue
        pruned += 1
        left = max(int(t.params.get("epochs", planned_epochs)) - run, 0)
        times = [h["seconds"] for h in TrialRecord.from_frozen(t).history if "seconds" in h]
        per_epoch = sum(times) / len(times) if times else (0.0 if math.isnan(s) else s / max(run, 1))
        saved += left
        saved_s += left * per_epoch
    return Compute(epochs, seconds, pruned, saved, saved_s)


# ---- ranking and selection ----------------------------------------------------------------------


def ranked_complete(trials: Sequence[FrozenTrial], direction: str) -> list[FrozenTrial]:
    """COMPLETE trials with a value, best first in `direction`; ties: lower trial number first."""
    sign = -score_sign(direction)
    scored = [(sign * t.value, t.number, t) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return [t for _, _, t in sorted(scored, key=lambda s: s[:2])]


def require_complete(trials: Sequence[FrozenTrial], study_name: str = "") -> None:
    """Raise unless some trial is COMPLETE (a PRUNED trial did not train to the end: never a champion).

    Raises:
        RegistryError: no COMPLETE trial; the message counts the trials by state.
    """
    if any(t.state == TrialState.COMPLETE for t in trials):
        return
    counts = [f"{n} {w}" for s, w in STATE_WORDS.items() if (n := sum(t.state == s for t in trials))]
    raise RegistryError(
        f"study '{study_name}' has no COMPLETE trial ({', '.join(counts) or 'no trials'}): nothing to "
        "test or register; run `sweep run` with this study file to add trials (raise --n-trials)"
    )


def checkpoint_path(trial: FrozenTrial, study_name: str) -> Path:
    """The trial's checkpoint file (`M.resolve` of the path it recorded)."""
    return M.resolve(TrialRecord.from_frozen(trial).checkpoint, study_name, trial.number)


# ---- which checkpoints stay ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cleanup:
    """Checkpoint files of COMPLETE trials after `clean_checkpoints`."""

    kept: tuple[Path, ...]
    deleted: tuple[Path, ...]  # deleted by this call (empty when an earlier report deleted them)


def clean_checkpoints(
    trials: Sequence[FrozenTrial], selected: FrozenTrial, direction: str, keep_top_k: int, study_name: str
) -> Cleanup:
    """Delete the checkpoints of COMPLETE trials outside the top `keep_top_k`; the selected trial's
    is always kept. Only COMPLETE trials' files are touched: a trial still running elsewhere may be
    writing its own, and PRUNED/FAIL trials never write one."""
    ranked = ranked_complete(trials, direction)
    keep = {t.number for t in ranked[:keep_top_k]} | {selected.number}
    present = [(t.number, checkpoint_path(t, study_name)) for t in ranked]
    present = [(n, p) for n, p in present if p.is_file()]
    kept = tuple(p for n, p in present if n in keep)
    deleted = M.remove(p for n, p in present if n not in keep)
    return Cleanup(kept, tuple(deleted))
