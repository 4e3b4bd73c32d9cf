"""The report's PNG plots: optimisation history, parameter importances, learning curves, val
accuracy against each main parameter, and the test confusion matrix.

Optuna's own matplotlib plots draw the optimisation history and the importances. The learning
curves and the per-parameter scatter plots are drawn here because Optuna's counterparts leave out
what a pruning study needs to show (see `learning_curves` and `param_plots`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import TrialState

from pipeline.config import StudyConfig
from pipeline.errors import first_line
from pipeline.evaluation import TestEvaluation
from pipeline.space import FloatParam, IntParam

MAIN_PARAMS = ("lr", "momentum", "freeze_depth", "aug_strength")
STATE_STYLE: dict[str, dict[str, Any]] = {
    "COMPLETE": {"linestyle": "-", "alpha": 0.9},
    "PRUNED": {"linestyle": "--", "color": "grey", "alpha": 0.7},
    "FAIL": {"linestyle": ":", "color": "tab:red", "alpha": 0.7},
    "RUNNING": {"linestyle": "-.", "color": "tab:purple", "alpha": 0.7},
}
STATE_COLOUR = {"COMPLETE": "tab:green", "PRUNED": "grey", "FAIL": "tab:red", "RUNNING": "tab:purple"}


def write_plots(
    study: optuna.Study, cfg: StudyConfig, frame: pd.DataFrame, folder: Path, selected: int | None
) -> tuple[list[Path], list[str]]:
    """Write the comparison plots as PNG files into `folder` (an existing folder).

    A plot that cannot be drawn yet (no COMPLETE trial, no epoch reported) is skipped with a note,
    and its file from an earlier report is removed so the folder never shows a stale plot.

    Args:
        frame: `comparison.trials_frame` of the study.
        selected: number of the selected trial (highlighted), None when there is none.

    Returns:
        (files written, one note per skipped plot saying why).
    """
    written: list[Path] = []
    notes: list[str] = []
    for name, draw in (("optimization_history", history_plot), ("param_importances", importance_plot)):
        path = folder / f"{name}.png"
        _keep_or_note(path, draw(study, cfg, path), written, notes)
    written.append(learning_curves(study, cfg, folder / "learning_curves.png", selected))
    for name in [p for p in MAIN_PARAMS if p in cfg.search_space]:
        path = folder / f"val_accuracy_vs_{name}.png"
        _keep_or_note(path, param_plot(frame, cfg, name, path), written, notes)
    return written, notes


def _keep_or_note(path: Path, note: str | None, written: list[Path], notes: list[str]) -> None:
    if note is None:
        written.append(path)
    else:
        notes.append(note)
        path.unlink(missing_ok=True)  # not a stale plot from an earlier report


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    # A bare Figure, not pyplot: no backend, no global figure list to leak into.
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _save_optuna_plot(draw: Callable[[], Axes], path: Path) -> None:
    """Run one of Optuna's matplotlib plots (they draw through pyplot) and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # the report runs on servers and in CI, without a display
    import matplotlib.pyplot as plt

    # Optuna's plots switch the global style to ggplot: keep that inside this call.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = draw().get_figure(root=True)
        if fig is None:  # an Axes Optuna drew is always on a figure
            raise RuntimeError(f"Optuna's plot for {path.name} has no figure")
        _save(fig, path)
    plt.close(fig)


def history_plot(study: optuna.Study, cfg: StudyConfig, path: Path) -> str | None:
    """Optuna's optimisation history (value per COMPLETE trial, best so far) as a PNG.

    Returns:
        None when written, else why it was skipped.
    """
    from optuna.visualization.matplotlib import plot_optimization_history

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return "optimisation history skipped: no COMPLETE trial"
    _save_optuna_plot(lambda: plot_optimization_history(study, target_name=cfg.study.metric), path)
    return None


def importance_plot(study: optuna.Study, cfg: StudyConfig, path: Path) -> str | None:
    """Optuna's parameter importances (its default evaluator, PED-ANOVA, over COMPLETE trials) of
    the parameters that vary.

    Returns:
        None when written, else why it was skipped: fewer than 2 COMPLETE trials, no parameter
        that varies, or one value for every trial (the evaluator would draw equal bars that mean
        nothing).
    """
    from optuna.visualization.matplotlib import plot_param_importances

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [p for p in cfg.search_space if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(done) < 2 or not varying:
        return (
            f"parameter importances skipped: they need at least 2 COMPLETE trials whose "
            f"parameters differ (this study has {len(done)} COMPLETE trial(s))"
        )
    values = {t.value for t in done}
    if len(values) == 1:
        return (
            f"parameter importances skipped: every COMPLETE trial has the same {cfg.study.metric} "
            f"({values.pop():.4g}), so no parameter explains a difference"
        )
    try:
        _save_optuna_plot(lambda: plot_param_importances(study, params=varying, target_name=cfg.study.metric), path)
    except ValueError as err:  # a parameter no COMPLETE trial sampled (the search space changed)
        return f"parameter importances skipped: {first_line(err)}"
    return None


def learning_curves(study: optuna.Study, cfg: StudyConfig, path: Path, selected: int | None) -> Path:
    """Val accuracy per epoch of every trial that reported one, styled by state, each line labelled
    with its trial number, the selected trial in bold black.

    Drawn here, not with Optuna's `plot_intermediate_values`: that one colours each trial from a
    20-colour cycle with a legend entry per trial, draws PRUNED and COMPLETE trials alike, leaves
    out FAIL trials' partial curves, and cannot mark the selected trial, while this plot exists to
    show where pruning stopped trials and what the winner looked like. It also plots val accuracy
    in a val_loss study, where the intermediate values are losses.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(7, 4.5)
    for t in study.get_trials(deepcopy=False):
        history = t.user_attrs.get("history", [])
        if not history:
            continue
        style = dict(STATE_STYLE.get(t.state.name, STATE_STYLE["RUNNING"]))
        if t.number == selected:
            style.update(linewidth=2.8, color="black", alpha=1.0)
        x, y = [h["epoch"] for h in history], [h["val_accuracy"] for h in history]
        (line,) = ax.plot(x, y, marker=".", **style)
        ax.annotate(
            str(t.number),
            (x[-1], y[-1]),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize="x-small",
            color=line.get_color(),
        )
    proxies = {
        "complete (one colour per trial)": {**STATE_STYLE["COMPLETE"], "color": "tab:blue"},
        "pruned": STATE_STYLE["PRUNED"],
        "fail": STATE_STYLE["FAIL"],
    }
    if selected is not None:
        proxies[f"selected (trial {selected})"] = {"color": "black", "linewidth": 2.8}
    ax.legend(handles=[Line2D([], [], label=k, **v) for k, v in proxies.items()], loc="best", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="epoch (step)",
        ylabel="val accuracy",
        title=f"val accuracy per epoch, labelled by trial\n{cfg.study.name}",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def param_plot(frame: pd.DataFrame, cfg: StudyConfig, name: str, path: Path) -> str | None:
    """Best val accuracy of each trial (every state, coloured by state) against parameter `name`.

    Drawn here, not with Optuna's `plot_slice`: that one plots COMPLETE trials only, and in a
    pruning study most trials are PRUNED; where they were stopped is what this plot shows.

    Returns:
        None when written, else why it was skipped (no trial has reported an epoch).
    """
    rows = frame.dropna(subset=[name, "best_val_accuracy"])
    if rows.empty:
        return f"val accuracy vs {name} skipped: no trial has reported an epoch yet"
    fig, ax = _figure(5, 3.6)
    for state, group in rows.groupby("state"):
        ax.scatter(
            group[name],
            group["best_val_accuracy"],
            label=str(state).lower(),
            alpha=0.8,
            color=STATE_COLOUR.get(str(state), "tab:purple"),
        )
    p = cfg.search_space[name]
    if isinstance(p, (FloatParam, IntParam)) and p.log:
        ax.set_xscale("log")
    ax.set(xlabel=name, ylabel="best val accuracy", title=f"val accuracy vs {name}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def confusion_plot(evaluation: TestEvaluation, path: Path) -> Path:
    """The test confusion matrix as a PNG (rows: true class, columns: predicted class)."""
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(evaluation.classes)
    fig, ax = _figure(2.2 + 0.6 * n, 1.8 + 0.6 * n)
    ConfusionMatrixDisplay(np.array(evaluation.confusion), display_labels=list(evaluation.classes)).plot(
        ax=ax, colorbar=False, cmap="Blues"
    )
    ax.set_title(f"test split, trial {evaluation.trial_number} (accuracy {evaluation.accuracy:.3f})")
    _save(fig, path)
    return path
