"""The report stage: compare the trials, test the selected one once, hand the model off.

`run_report(cfg)` on a finished or interrupted study:
1. **Compare.** `trials_frame` (one row per trial, sorted by the study's metric) is written as
   `trials.csv` and `report.md`, with PNG plots (optimisation history, parameter importances,
   learning curves, val accuracy against each main parameter), under the report folder, and all of
   it is logged to the study's MLflow parent run under `report/`.
2. **Select, then test once.** The best COMPLETE trial by the study's value (ties: lower trial
   number) is chosen from Optuna alone. Its best-val checkpoint is evaluated on the sealed test
   split exactly once: the result is stored in a study user attr keyed by trial number and the
   checkpoint's sha256, and later reports reuse it. Test figures never choose anything.
3. **Register** (`pipeline.registry`): only the selected model, under `registry.model_name`, with
   the alias moved to it; a later report that selects the same checkpoint reuses that version.
4. **Clean up** trial checkpoints: the top `registry.keep_top_k` COMPLETE trials and the selected
   one are kept, the other COMPLETE trials' checkpoints are deleted.

Report folder: `--out` when given, else `$SWEEP_REPORTS/<study>`, else `reports/<study>` next to the
store folder (`$SWEEP_HOME/../reports/<study>`; `./reports/<study>` with the default `./mlruns`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import StudyConfig
from pipeline.errors import DataError, RegistryError, TrackingError

REPORTS_ENV = "SWEEP_REPORTS"
TEST_ATTR = "sweep_test_eval"  # study user attr prefix: f"{TEST_ATTR}:{trial}:{sha256}"
MAIN_PARAMS = ("lr", "momentum", "freeze_depth", "aug_strength")
BASE_COLUMNS = ("number", "state")
RESULT_COLUMNS = ("best_epoch", "epochs_run", "seconds", "mlflow_run_id")


# ---- compare -------------------------------------------------------------------------------------

def report_dir(study_name: str, out: str | Path | None = None) -> Path:
    """Where the report files of `study_name` go (see the module docstring for the order)."""
    if out is not None:
        return Path(out)
    if os.environ.get(REPORTS_ENV):
        return Path(os.environ[REPORTS_ENV]) / study_name
    from pipeline.tune import home

    return home().parent / "reports" / study_name


def best_of_history(history: Sequence[dict], metric: str, direction: str) -> tuple[float, int | None]:
    """(best value of `metric`, its 0-based epoch) over a trial's epochs; ties keep the earlier
    epoch, as `train.fit` does. (nan, None) when the trial reported no epoch."""
    if not history:
        return math.nan, None
    sign = 1.0 if direction == "maximize" else -1.0
    best = max(range(len(history)), key=lambda i: (sign * history[i][metric], -i))
    return float(history[best][metric]), int(history[best]["epoch"])


def trial_seconds(trial: FrozenTrial) -> float:
    """Wall seconds of a trial: its recorded `seconds`, else start-to-complete, else nan."""
    if "seconds" in trial.user_attrs:
        return float(trial.user_attrs["seconds"])
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return math.nan


def trials_frame(study, cfg: StudyConfig) -> pd.DataFrame:
    """One row per trial, read from Optuna only (nothing is written).

    Columns: number, state, one column per sampled parameter (search-space order), `best_<metric>`
    (best value of the study's metric over the epochs run: the trial's value when COMPLETE), plus
    `best_val_accuracy` (fraction 0-1) when the metric is val_loss, best_epoch (0-based epoch of
    the best metric, the checkpoint's epoch), epochs_run, seconds (wall), mlflow_run_id.
    Rows are sorted by `best_<metric>` in the study's direction (FAIL/RUNNING trials and trials
    without a value last),
    ties by trial number.
    """
    trials = study.get_trials(deepcopy=False)
    metric, direction = cfg.study.metric, cfg.study.direction
    names = list(cfg.search_space)
    names += sorted({p for t in trials for p in t.params} - set(names))
    rows = []
    for t in trials:
        history = t.user_attrs.get("history", [])
        best, epoch = best_of_history(history, metric, direction)
        rows.append({"number": t.number, "state": t.state.name,
                     **{p: t.params.get(p) for p in names},
                     "best_val_accuracy": best_of_history(history, "val_accuracy", "maximize")[0],
                     f"best_{metric}": best, "best_epoch": epoch,
                     "epochs_run": int(t.user_attrs.get("epochs_run", len(history))),
                     "seconds": trial_seconds(t), "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    values = ["best_val_accuracy"] if metric == "val_accuracy" else [f"best_{metric}", "best_val_accuracy"]
    columns = [*BASE_COLUMNS, *names, *values, *RESULT_COLUMNS]
    frame = pd.DataFrame(rows, columns=columns)
    frame["best_epoch"] = frame["best_epoch"].astype("Int64")
    # Unfinished trials (FAIL, RUNNING) go last: a partial best must not sit above the winner.
    unfinished = ~frame["state"].isin(["COMPLETE", "PRUNED"])
    return (frame.assign(_unfinished=unfinished)
            .sort_values(["_unfinished", f"best_{metric}", "number"], ascending=[True, direction == "minimize", True],
                         na_position="last", kind="stable")
            .drop(columns="_unfinished").reset_index(drop=True))


@dataclass(frozen=True)
class Compute:
    """Compute spent by the study and what pruning saved (estimates use each pruned trial's
    mean epoch time)."""

    trial_epochs: int  # epochs run by every trial, all states
    seconds: float  # wall seconds of every trial
    pruned_trials: int
    epochs_saved: int  # sum over pruned trials of (planned epochs - epochs run)
    seconds_saved: float

    @property
    def saved_fraction(self) -> float:
        """Share of the no-pruning compute that pruning avoided, 0-1."""
        total = self.trial_epochs + self.epochs_saved
        return self.epochs_saved / total if total else 0.0


def compute_spent(trials: Sequence[FrozenTrial], planned_epochs: int) -> Compute:
    """Sum trial-epochs and seconds; estimate the epochs and seconds pruning saved.

    Args:
        planned_epochs: `training.epochs`; a trial that sampled `epochs` uses its own value.
    """
    epochs, seconds, saved, saved_s, pruned = 0, 0.0, 0, 0.0, 0
    for t in trials:
        history = t.user_attrs.get("history", [])
        run = int(t.user_attrs.get("epochs_run", len(history)))
        epochs += run
        s = trial_seconds(t)
        seconds += 0.0 if math.isnan(s) else s
        if t.state != TrialState.PRUNED:
            continue
        pruned += 1
        left = max(int(t.params.get("epochs", planned_epochs)) - run, 0)
        times = [h["seconds"] for h in history if "seconds" in h]
        per_epoch = sum(times) / len(times) if times else (0.0 if math.isnan(s) else s / max(run, 1))
        saved += left
        saved_s += left * per_epoch
    return Compute(epochs, seconds, pruned, saved, saved_s)


# ---- select ---------------------------------------------------------------------------------------

def ranked_complete(trials: Sequence[FrozenTrial], direction: str) -> list[FrozenTrial]:
    """COMPLETE trials, best first by their value; ties: lower trial number first."""
    sign = -1.0 if direction == "maximize" else 1.0
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def select_trial(trials: Sequence[FrozenTrial], direction: str, study_name: str = "") -> FrozenTrial:
    """The best COMPLETE trial (Optuna states and values only, never MLflow run statuses).

    Raises:
        RegistryError: no COMPLETE trial; the message counts the trials by state.
    """
    ranked = ranked_complete(trials, direction)
    if ranked:
        return ranked[0]
    words = {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed", TrialState.RUNNING: "running",
             TrialState.WAITING: "waiting"}
    counts = [f"{n} {w}" for s, w in words.items() if (n := sum(t.state == s for t in trials))]
    raise RegistryError(
        f"study '{study_name}' has no COMPLETE trial ({', '.join(counts) or 'no trials'}): nothing to "
        "test or register; run `sweep run` with this study file to add trials (raise --n-trials)"
    )


def checkpoint_path(trial: FrozenTrial, study_name: str) -> Path:
    """The trial's checkpoint: the path it recorded, else `<store>/checkpoints/<study>/trial-<n>.pt`
    (the recorded path may be relative to another working directory)."""
    from pipeline.tune import checkpoint_dir

    recorded = trial.user_attrs.get("checkpoint")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    return checkpoint_dir(study_name) / f"trial-{trial.number}.pt"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- test once ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestEvaluation:
    """The selected trial's checkpoint on the sealed test split (fractions 0-1, counts)."""

    trial_number: int
    checkpoint_sha256: str
    classes: tuple[str, ...]  # index order
    n_images: int
    accuracy: float
    loss: float  # mean cross-entropy per image
    precision: tuple[float, ...]  # per class, index order
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    evaluated_at: str  # ISO 8601, UTC

    __test__ = False  # not a pytest class

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "TestEvaluation":
        tuples = {k: tuple(record[k]) for k in ("classes", "precision", "recall", "f1", "support")}
        return cls(**{**record, **tuples, "confusion": tuple(tuple(r) for r in record["confusion"])})

    def per_class(self) -> pd.DataFrame:
        return pd.DataFrame({"class": self.classes, "precision": self.precision, "recall": self.recall,
                             "f1": self.f1, "support": self.support})

    def confusion_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.confusion, index=[f"true {c}" for c in self.classes],
                            columns=[f"pred {c}" for c in self.classes])


def evaluation_key(trial_number: int, sha256: str) -> str:
    """Study user attr holding the test evaluation of one checkpoint of one trial."""
    return f"{TEST_ATTR}:{trial_number}:{sha256}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a trial checkpoint on the CPU (tensors and plain values only).

    Raises:
        RegistryError: missing or unreadable file.
    """
    import torch

    if not path.is_file():
        raise RegistryError(f"{path}: checkpoint of the selected trial not found; re-run the trial "
                            "(`sweep run` with a new study name) or restore the file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RegistryError(f"{path}: checkpoint cannot be read ({_first_line(err)}); "
                            "restore the file or re-run the study") from None


def evaluate_on_test(cfg: StudyConfig, checkpoint: dict[str, Any], sha256: str) -> TestEvaluation:
    """Rebuild the checkpoint's model and evaluate it on the sealed test split (one pass).

    The split is rebuilt exactly as the study built it (same folders, seed, bad-image policy).

    Raises:
        DataError: the image folders cannot be read.
        RegistryError: the data's classes no longer match the checkpoint's `class_to_idx`.
    """
    import torch
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from pipeline import data as D
    from pipeline import train as TR

    splits = _splits(cfg)
    if splits.class_to_idx != checkpoint["class_to_idx"]:
        raise RegistryError(
            f"{cfg.data.root}: classes {splits.class_to_idx} differ from the selected checkpoint's "
            f"{checkpoint['class_to_idx']}; restore the data the study was run on"
        )
    model = rebuild(checkpoint)
    pp = D.Preprocess(**{**checkpoint["preprocess"], "mean": tuple(checkpoint["preprocess"]["mean"]),
                         "std": tuple(checkpoint["preprocess"]["std"])})
    loader = D.make_loader(splits.root, splits.test, D.eval_transform(pp), cfg.data.batch_size,
                           cfg.data.num_workers, shuffle=False)
    device = TR.pick_device(cfg.training.device)
    result = TR.evaluate(model.to(device), loader, torch.nn.CrossEntropyLoss(), device)
    labels, preds = result.labels.numpy(), result.predictions.numpy()
    idx = list(range(len(splits.classes)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    confusion = confusion_matrix(labels, preds, labels=idx)
    return TestEvaluation(
        trial_number=int(checkpoint["trial_number"]), checkpoint_sha256=sha256,
        classes=tuple(splits.classes), n_images=len(labels), accuracy=float(result.accuracy),
        loss=float(result.loss), precision=tuple(map(float, precision)), recall=tuple(map(float, recall)),
        f1=tuple(map(float, f1)), support=tuple(map(int, support)),
        confusion=tuple(tuple(map(int, row)) for row in confusion),
        evaluated_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def rebuild(checkpoint: dict[str, Any]):
    """The checkpoint's classifier (arch + best-val weights), in eval mode on the CPU."""
    from pipeline import model as M

    net, _ = M.build_model(M.WeightsSpec(checkpoint["arch"], "none", "none"), len(checkpoint["class_to_idx"]))
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval()


def _splits(cfg: StudyConfig):
    from pipeline import data as D

    d = cfg.data
    splits = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed)
    return D.scan_images(splits, d.bad_images)


def evaluate_once(study, cfg: StudyConfig, checkpoint: dict[str, Any], sha256: str) -> tuple[TestEvaluation, bool]:
    """The test evaluation of this exact checkpoint: the stored one, else evaluate and store it.

    Returns:
        (evaluation, True when it was evaluated by this call).
    """
    key = evaluation_key(int(checkpoint["trial_number"]), sha256)
    stored = study.user_attrs.get(key)
    if stored is not None:
        return TestEvaluation.from_record(stored), False
    evaluation = evaluate_on_test(cfg, checkpoint, sha256)
    # Stored before registering, so a failed registration never leads to a second test pass.
    study.set_user_attr(key, evaluation.to_record())
    return evaluation, True


# ---- clean up -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cleanup:
    kept: tuple[Path, ...]
    deleted: tuple[Path, ...]


def clean_checkpoints(trials: Sequence[FrozenTrial], selected: FrozenTrial, direction: str,
                      keep_top_k: int, study_name: str) -> Cleanup:
    """Delete the checkpoints of COMPLETE trials outside the top `keep_top_k` (the selected trial
    is always kept). Only COMPLETE trials' files are touched: a trial still running elsewhere may
    be writing its own checkpoint."""
    ranked = ranked_complete(trials, direction)
    keep = {t.number for t in ranked[:keep_top_k]} | {selected.number}
    kept, deleted = [], []
    for t in ranked:
        path = checkpoint_path(t, study_name)
        if not path.is_file():
            continue
        if t.number in keep:
            kept.append(path)
        else:
            path.unlink()
            deleted.append(path)
    return Cleanup(tuple(kept), tuple(deleted))


# ---- plots ----------------------------------------------------------------------------------------

_STATE_STYLE = {
    "COMPLETE": {"linestyle": "-", "alpha": 0.9},
    "PRUNED": {"linestyle": "--", "color": "grey", "alpha": 0.7},
    "FAIL": {"linestyle": ":", "color": "tab:red", "alpha": 0.7},
    "RUNNING": {"linestyle": "-.", "color": "tab:purple", "alpha": 0.7},
}
_STATE_COLOUR = {"COMPLETE": "tab:green", "PRUNED": "grey", "FAIL": "tab:red", "RUNNING": "tab:purple"}


def write_plots(study, cfg: StudyConfig, frame: pd.DataFrame, folder: Path,
                selected: int | None) -> tuple[list[Path], list[str]]:
    """Write the comparison plots as PNG files into `folder`.

    Returns:
        (files written, notes on plots that were skipped and why).
    """
    import matplotlib

    matplotlib.use("Agg")  # the report runs on servers and in CI, without a display
    import warnings

    written, notes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning on its matplotlib plots
        for name, draw in (("optimization_history.png", _history_plot),
                           ("param_importances.png", _importance_plot)):
            note = draw(study, cfg, folder / name)
            if note:
                notes.append(note)
                (folder / name).unlink(missing_ok=True)  # not a stale plot from an earlier report
            else:
                written.append(folder / name)
    written.append(_learning_curves(study, cfg, folder / "learning_curves.png", selected))
    params, param_notes = _param_plots(frame, cfg, folder)
    return written + params, notes + param_notes


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _history_plot(study, cfg: StudyConfig, path: Path) -> str | None:
    from optuna.visualization.matplotlib import plot_optimization_history

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return "optimisation history skipped: no COMPLETE trial"
    ax = plot_optimization_history(study, target_name=cfg.study.metric)
    _save(ax.figure, path)
    return None


def _importance_plot(study, cfg: StudyConfig, path: Path) -> str | None:
    from optuna.visualization.matplotlib import plot_param_importances

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [p for p in cfg.search_space if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(done) < 2 or not varying:
        return (f"parameter importances skipped: they need at least 2 COMPLETE trials whose "
                f"parameters differ (this study has {len(done)} COMPLETE trial(s))")
    try:
        ax = plot_param_importances(study, params=varying, target_name=cfg.study.metric)
    except Exception as err:  # the evaluators reject degenerate studies in several ways
        return f"parameter importances skipped: {_first_line(err)}"
    _save(ax.figure, path)
    return None


def _learning_curves(study, cfg: StudyConfig, path: Path, selected: int | None) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in study.get_trials(deepcopy=False):
        history = t.user_attrs.get("history", [])
        if not history:
            continue
        style = dict(_STATE_STYLE.get(t.state.name, _STATE_STYLE["RUNNING"]))
        if t.number == selected:
            style.update(linewidth=2.8, color="black", alpha=1.0)
        x, y = [h["epoch"] for h in history], [h["val_accuracy"] for h in history]
        line, = ax.plot(x, y, marker=".", **style)
        ax.annotate(str(t.number), (x[-1], y[-1]), xytext=(4, 0), textcoords="offset points",
                    fontsize="x-small", color=line.get_color())
    proxies = {"complete (one colour per trial)": {**_STATE_STYLE["COMPLETE"], "color": "tab:blue"},
               "pruned": _STATE_STYLE["PRUNED"], "fail": _STATE_STYLE["FAIL"]}
    if selected is not None:
        proxies[f"selected (trial {selected})"] = {"color": "black", "linewidth": 2.8}
    ax.legend(handles=[Line2D([], [], label=k, **v) for k, v in proxies.items()], loc="best", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch (step)", ylabel="val accuracy",
           title=f"val accuracy per epoch, labelled by trial\n{cfg.study.name}")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def _param_plots(frame: pd.DataFrame, cfg: StudyConfig, folder: Path) -> tuple[list[Path], list[str]]:
    """Best val accuracy of each trial (every state) against each main parameter in the space."""
    import matplotlib.pyplot as plt

    from pipeline.config import FloatParam, IntParam

    written, notes = [], []
    for name in [p for p in MAIN_PARAMS if p in cfg.search_space]:
        rows = frame.dropna(subset=[name, "best_val_accuracy"])
        path = folder / f"val_accuracy_vs_{name}.png"
        if rows.empty:
            notes.append(f"val accuracy vs {name} skipped: no trial has reported an epoch yet")
            path.unlink(missing_ok=True)
            continue
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for state, group in rows.groupby("state"):
            ax.scatter(group[name], group["best_val_accuracy"], label=state.lower(), alpha=0.8,
                       color=_STATE_COLOUR.get(state, "tab:purple"))
        p = cfg.search_space[name]
        if isinstance(p, (FloatParam, IntParam)) and p.log:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="best val accuracy", title=f"val accuracy vs {name}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        _save(fig, path)
        written.append(path)
    return written, notes


def confusion_plot(evaluation: TestEvaluation, path: Path) -> Path:
    """Confusion matrix of the test evaluation as a PNG (rows: true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(evaluation.classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * n, 1.8 + 0.6 * n))
    ConfusionMatrixDisplay(np.array(evaluation.confusion), display_labels=list(evaluation.classes)).plot(
        ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(f"test split, trial {evaluation.trial_number} (accuracy {evaluation.accuracy:.3f})")
    _save(fig, path)
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# ---- the stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportResult:
    """What `run_report` did; `summary()` gives the lines `sweep report` prints."""

    study_name: str
    folder: Path
    metric: str
    selected_trial: int
    val_value: float  # the selected trial's value (best `metric` over its epochs)
    best_epoch: int | None
    test: TestEvaluation
    evaluated_now: bool  # False: the stored test evaluation was reused
    registered: Any  # registry.Registered
    cleanup: Cleanup
    compute: Compute
    files: tuple[Path, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        r, t = self.registered, self.test
        tested = "evaluated now" if self.evaluated_now else "stored evaluation, not re-run"
        version = "registered" if r.created else "already registered"
        alias = (f"alias '{r.alias}' -> version {r.version}" if r.previous_alias_version in (None, r.version)
                 else f"alias '{r.alias}' moved from version {r.previous_alias_version} to {r.version}")
        lines = [
            f"selected trial {self.selected_trial} of study '{self.study_name}': {self.metric} "
            f"{self.val_value:.4f} (epoch {self.best_epoch})",
            f"test accuracy {t.accuracy:.4f} on {t.n_images} images ({tested})",
            f"model '{r.name}' version {r.version} {version}; {alias} ({r.uri})",
            f"checkpoints: kept {len(self.cleanup.kept)}, deleted {len(self.cleanup.deleted)}",
            f"report: {self.folder}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def run_report(cfg: StudyConfig, *, storage: str | None = None, tracking: str | None = None,
               out: str | Path | None = None) -> ReportResult:
    """Compare, select, test once, register and clean up (module docstring) for a stored study.

    Re-running on an unchanged study rewrites the report files but neither re-evaluates the test
    split nor creates a second model version.

    Raises:
        StudyStateError: no such study in the storage.
        RegistryError: no COMPLETE trial (after writing the comparison), a missing checkpoint, or
            a failed registration.
        TrackingError: the MLflow store cannot be used, or the report folder cannot be created.
        DataError: the test split cannot be read (only when it has to be evaluated).
    """
    from pipeline import tune
    from pipeline.track import Tracker

    study = tune.load_existing(cfg, storage)
    trials = study.get_trials(deepcopy=False)
    folder = _make_folder(report_dir(cfg.study.name, out))
    notes: list[str] = []
    tracker = Tracker(tune.tracking_uri(cfg, tracking), cfg.experiment_name, tune.home() / "artifacts",
                      warn=notes.append)
    parent = study.user_attrs.get(tune.PARENT_ATTR)
    if parent:  # trials run while the store was down get their runs now that it answers
        tracker.parent_id = parent
        tune.close_stale_runs(study, tracker)
        synced = tune.sync_runs(study, tracker)
        if synced:
            notes.append(f"MLflow runs of trial(s) {', '.join(map(str, synced))} rebuilt from Optuna's record")
    frame, compute = trials_frame(study, cfg), compute_spent(trials, cfg.training.epochs)
    ranked = ranked_complete(trials, cfg.study.direction)
    plots, plot_notes = _write_comparison(study, cfg, frame, folder, ranked[0] if ranked else None)
    notes += plot_notes
    if not ranked:
        md = _write_markdown(folder, cfg, trials, frame, compute, notes=notes, plots=plots)
        _log_files(tracker, parent, [folder / "trials.csv", *plots, md])
        select_trial(trials, cfg.study.direction, cfg.study.name)  # raises the clear message
    selected = ranked[0]
    evaluation, fresh, registered, cleanup = _hand_off(cfg, study, trials, selected, tracker)
    confusion = confusion_plot(evaluation, folder / "confusion_matrix.png")
    md = _write_markdown(folder, cfg, trials, frame, compute, selected, evaluation, registered, cleanup,
                         notes, plots)
    files = (folder / "trials.csv", *plots, confusion, md)
    _log_files(tracker, parent, files)
    _tag_parent(tracker, parent, selected, evaluation, registered, fresh)
    return ReportResult(cfg.study.name, folder, cfg.study.metric, selected.number, float(selected.value),
                        selected.user_attrs.get("best_epoch"), evaluation, fresh, registered, cleanup,
                        compute, files, tuple(notes))


def _hand_off(cfg: StudyConfig, study, trials, selected: FrozenTrial, tracker):
    """Test the selected checkpoint once, register it, then delete the checkpoints not kept."""
    path = checkpoint_path(selected, cfg.study.name)
    checkpoint = load_checkpoint(path)
    sha = sha256_of(path)
    evaluation, fresh = evaluate_once(study, cfg, checkpoint, sha)
    registered = _register(cfg, tracker, study, selected, checkpoint, sha, evaluation)
    cleanup = clean_checkpoints(trials, selected, cfg.study.direction, cfg.registry.keep_top_k, cfg.study.name)
    return evaluation, fresh, registered, cleanup


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(f"{folder}: cannot create the report folder ({err.strerror or err}); "
                            f"pass --out DIR or set {REPORTS_ENV} to a writable folder") from None
    return folder


def _write_comparison(study, cfg, frame, folder: Path, selected) -> tuple[list[Path], list[str]]:
    """trials.csv and the plots; returns (plot files, notes on skipped plots)."""
    frame.to_csv(folder / "trials.csv", index=False)
    return write_plots(study, cfg, frame, folder, selected.number if selected else None)


def _register(cfg: StudyConfig, tracker, study, selected: FrozenTrial, checkpoint: dict, sha: str,
              evaluation: TestEvaluation):
    from pipeline import registry
    from pipeline.tune import PARENT_ATTR

    parent = study.user_attrs.get(PARENT_ATTR)
    run_id = _existing_run(tracker, selected.user_attrs.get("mlflow_run_id")) or _existing_run(tracker, parent)
    return registry.register(
        lambda: _export(cfg, selected, checkpoint, sha, evaluation, parent), study=cfg.study.name, sha256=sha,
        tracking=tracker.uri, experiment_id=tracker.experiment_id, run_id=run_id, name=cfg.registry.model_name,
        alias=cfg.registry.alias, serialization_format=cfg.registry.serialization_format)


def _export(cfg: StudyConfig, selected: FrozenTrial, checkpoint: dict, sha: str, evaluation: TestEvaluation,
            parent: str | None):
    """The registered model with metadata that makes it usable alone, and its lineage tags."""
    from pipeline import registry

    metric = cfg.study.metric
    metadata = {
        "classes": list(evaluation.classes), "class_to_idx": dict(checkpoint["class_to_idx"]),
        "preprocess": dict(checkpoint["preprocess"]), "arch": checkpoint["arch"],
        "weights_origin": checkpoint["weights_origin"], "study": cfg.study.name,
        "trial_number": selected.number, "best_epoch": checkpoint["best_epoch"],
        "params": dict(checkpoint["params"]), metric: float(selected.value),
        "test_accuracy": evaluation.accuracy, "checkpoint_sha256": sha,
        "output": "class probabilities (softmax), columns in `classes` order",
    }
    tags = {registry.STUDY_TAG: cfg.study.name, registry.TRIAL_TAG: str(selected.number),
            registry.PARENT_TAG: parent or "", registry.RUN_TAG: selected.user_attrs.get("mlflow_run_id") or "",
            registry.SHA_TAG: sha}
    description = (f"study {cfg.study.name}, trial {selected.number} (epoch {checkpoint['best_epoch']}): "
                   f"{metric} {selected.value:.4f}, test accuracy {evaluation.accuracy:.4f} "
                   f"on {evaluation.n_images} images; {checkpoint['arch']} from {checkpoint['weights_origin']}")
    return registry.Export(registry.export_module(rebuild(checkpoint)), _input_example(cfg, checkpoint),
                           metadata, tags, description)


def _existing_run(tracker, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        tracker.client.get_run(run_id)
    except Exception:
        return None  # the run lives in another store (different --tracking-uri)
    return run_id


def _input_example(cfg: StudyConfig, checkpoint: dict):
    """Preprocessed val images (never test ones), float32 `(B, 3, crop, crop)`: a real example of
    the value ranges. B = 1 for "pickle" (the JSON example is ~1.5 MB per 160 px image); B = 2 for
    "pt2", whose export keeps a batch axis of size 1 static."""
    from pipeline import data as D
    from pipeline import predict

    d = cfg.data
    size = 2 if cfg.registry.serialization_format == "pt2" else 1
    splits = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed)
    for rel, _ in splits.val:
        try:
            example = predict.preprocess_images([splits.root / rel], checkpoint["preprocess"])
        except DataError:
            continue  # an unreadable val image (bad_images: skip): take the next one
        return example.repeat(size, axis=0)
    raise RegistryError(f"{d.root / d.val}: no readable val image for the model's input example")


def _log_files(tracker, parent: str | None, files: list[Path]) -> None:
    for path in files:
        tracker.log_artifact(parent, path, "report")


def _tag_parent(tracker, parent, selected, evaluation: TestEvaluation, registered, fresh: bool) -> None:
    tracker.set_tags(parent, {"sweep.selected_trial": str(selected.number),
                              "sweep.test_accuracy": f"{evaluation.accuracy:.6f}",
                              "sweep.registered_model": f"{registered.name}/{registered.version}"})
    if fresh:
        tracker.log_metrics(parent, {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss}, step=0)


# ---- markdown -------------------------------------------------------------------------------------

def markdown_table(frame: pd.DataFrame, floats: str = "{:.4g}") -> str:
    """A GitHub-flavoured Markdown table (pandas' `to_markdown` needs tabulate, not installed)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return ""
        return (floats.format(v) if isinstance(v, float) else str(v)).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _write_markdown(folder: Path, cfg: StudyConfig, trials: Sequence[FrozenTrial], frame: pd.DataFrame,
                    compute: Compute, selected: FrozenTrial | None = None, evaluation: TestEvaluation | None = None,
                    registered=None, cleanup: Cleanup | None = None, notes: Sequence[str] = (),
                    plots: Sequence[Path] = ()) -> Path:
    counts = frame["state"].value_counts().to_dict()
    lines = [f"# Study report: {cfg.study.name}", "",
             f"Metric: `{cfg.study.metric}` ({cfg.study.direction}); trials: "
             + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())), ""]
    if selected is None:
        lines += ["**No COMPLETE trial**: nothing was tested or registered.", ""]
    else:
        lines += _selection_lines(cfg, selected, evaluation, registered)
    lines += _compute_lines(compute)
    lines += ["## Trials", "", f"Sorted by `{cfg.study.metric}`; `seconds` is wall time; epochs are 0-based.",
              "", markdown_table(frame.drop(columns=["mlflow_run_id"])), ""]
    failed = _fail_reasons(trials)
    if failed:
        lines += ["Failed trials:", "", *[f"- trial {n}: {r}" for n, r in failed], ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if cleanup is not None:
        lines += ["## Checkpoints", "", f"Kept: {', '.join(p.name for p in cleanup.kept) or 'none'}; "
                  f"deleted by this report: {', '.join(p.name for p in cleanup.deleted) or 'none'} "
                  f"(registry.keep_top_k = {cfg.registry.keep_top_k}, the selected trial is always kept).", ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _selection_lines(cfg, selected: FrozenTrial, evaluation: TestEvaluation, registered) -> list[str]:
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in selected.params.items())
    return [
        "## Selected trial", "",
        f"**Trial {selected.number}**: {cfg.study.metric} {selected.value:.4f} at epoch "
        f"{selected.user_attrs.get('best_epoch')} ({params}). Chosen among COMPLETE trials by "
        f"`{cfg.study.metric}` (ties: lower trial number); test figures never choose anything.", "",
        f"## Test split (sealed; evaluated once, {evaluation.evaluated_at})", "",
        f"Accuracy **{evaluation.accuracy:.4f}** on {evaluation.n_images} images "
        f"(mean cross-entropy {evaluation.loss:.4f}); checkpoint sha256 `{evaluation.checkpoint_sha256[:16]}…`.", "",
        markdown_table(evaluation.per_class(), floats="{:.4f}"), "",
        "Confusion matrix (rows: true class, columns: predicted):", "",
        markdown_table(evaluation.confusion_frame().reset_index(names="")), "",
        "![confusion matrix](confusion_matrix.png)", "",
        "## Registered model", "",
        f"`{registered.name}` version {registered.version}, alias `{registered.alias}`: "
        f"load it with `{registered.uri}`.", "",
    ]


def _compute_lines(c: Compute) -> list[str]:
    return [
        "## Compute", "",
        f"Spent: {c.trial_epochs} trial-epochs, {c.seconds:.1f} s of trial wall time.",
        f"Pruning stopped {c.pruned_trials} trial(s) early and saved {c.epochs_saved} trial-epochs "
        f"(about {c.seconds_saved:.1f} s at each pruned trial's mean epoch time), "
        f"{100 * c.saved_fraction:.0f}% of running every trial to its last epoch.", "",
    ]


def _fail_reasons(trials: Sequence[FrozenTrial]) -> list[tuple[int, str]]:
    return [(t.number, t.user_attrs.get("fail_reason", "no reason recorded (process stopped)"))
            for t in trials if t.state == TrialState.FAIL]
