"""The report's PNG plots: optimisation history, parameter importances, learning curves, val
accuracy against each main parameter, and the test confusion matrix.

Optuna's own matplotlib plots draw the optimisation history and the importances. The learning
curves and the per-parameter scatter plots are drawn here because Optuna's counterparts leave out
what a pruning study needs to show (see `learning_curves` and `param_plots`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import TrialState

from pipeline.champion import TestEvaluation
from pipeline.config import FloatParam, IntParam, StudyConfig
from pipeline.core import first_line
from pipeline.report._test_tables import SHOWN_ROWS, is_compact
from pipeline.search import TrialRecord

MAIN_PARAMS = ("lr", "momentum", "freeze_depth", "aug_strength")
STATE_STYLE: dict[str, dict[str, Any]] = {
    "COMPLETE": {"linestyle": "-", "alpha": 0.9},
    "PRUNED": {"linestyle": "--", "color": "grey", "alpha": 0.7},
    "FAIL": {"linestyle": ":", "color": "tab:red", "alpha": 0.7},
    "RUNNING": {"linestyle": "-.", "color": "tab:purple", "alpha": 0.7},
}
STATE_COLOUR = {"COMPLETE": "tab:green", "PRUNED": "grey", "FAIL": "tab:red", "RUNNING": "tab:purple"}
LEGEND_LABEL = {"COMPLETE": "complete (one colour per trial)", "PRUNED": "pruned", "FAIL": "fail", "RUNNING": "running"}
LEGEND_COLOUR = {"COMPLETE": {"color": "tab:blue"}}  # a sample of the per-trial colours


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
        with warnings.catch_warnings():
            # PED-ANOVA's "Some regimes for parameter ... have less than N trials", one line per
            # parameter on every report: the linear probe, which samples no parameter, is a regime of
            # its own. The other regime holds the search's trials, which the importances come from.
            warnings.filterwarnings("ignore", message="Some regimes for parameter")
            _save_optuna_plot(lambda: plot_param_importances(study, params=varying, target_name=cfg.study.metric), path)
    except ValueError as err:  # a parameter no COMPLETE trial sampled (the search space changed)
        return f"parameter importances skipped: {first_line(err)}"
    return None


def learning_curves(study: optuna.Study, cfg: StudyConfig, path: Path, selected: int | None) -> Path:
    """Write `learning_curves_figure` as a PNG at `path`; returns `path`."""
    _save(learning_curves_figure(study, cfg, selected), path)
    return path


def learning_curves_figure(study: optuna.Study, cfg: StudyConfig, selected: int | None) -> Figure:
    """Val accuracy per epoch of every trial that reported one, styled by state, each line's end
    labelled with its trial number, the selected trial in bold black. Trials ending at the same
    point share one label (`3, 5`); the legend lists only the states drawn.

    Drawn here, not with Optuna's `plot_intermediate_values`: that one colours each trial from a
    20-colour cycle with a legend entry per trial, draws PRUNED and COMPLETE trials alike, leaves
    out FAIL trials' partial curves, and cannot mark the selected trial, while this plot exists to
    show where pruning stopped trials and what the winner looked like. It also plots val accuracy
    in a val_loss study, where the intermediate values are losses.
    """
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(7, 4.5)
    ends: list[tuple[int, float, float, str]] = []  # (trial, last epoch, its val accuracy, line colour)
    drawn: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        history = TrialRecord.from_frozen(t).history
        if not history:
            continue
        state = t.state.name if t.state.name in STATE_STYLE else "RUNNING"
        style = dict(STATE_STYLE[state])
        if t.number == selected:
            style.update(linewidth=2.8, color="black", alpha=1.0)
        else:
            drawn.add(state)
        x, y = [h["epoch"] for h in history], [h["val_accuracy"] for h in history]
        (line,) = ax.plot(x, y, marker=".", **style)
        ends.append((t.number, x[-1], y[-1], to_hex(line.get_color())))
    low, high = ax.get_ylim()
    for x_end, y_end, numbers, colour in end_labels(ends, tolerance=0.03 * (high - low)):
        ax.annotate(
            ", ".join(map(str, numbers)),
            (x_end, y_end),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize="x-small",
            color=colour,
        )
    proxies = {LEGEND_LABEL[s]: {**STATE_STYLE[s], **LEGEND_COLOUR.get(s, {})} for s in LEGEND_LABEL if s in drawn}
    if selected is not None and any(n == selected for n, *_ in ends):
        proxies[f"selected (trial {selected})"] = {"color": "black", "linewidth": 2.8}
    if proxies:
        ax.legend(handles=[Line2D([], [], label=k, **v) for k, v in proxies.items()], loc="best", fontsize="small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="epoch (step)",
        ylabel="val accuracy",
        title=f"val accuracy per epoch, labelled by trial\n{cfg.study.name}",
    )
    ax.grid(alpha=0.3)
    return fig


def end_labels(
    ends: Sequence[tuple[int, float, float, str]], tolerance: float
) -> list[tuple[float, float, list[int], str]]:
    """One label per group of line ends that would overlap: ends at the same epoch whose val
    accuracies lie within `tolerance` of the next one are labelled together.

    Args:
        ends: (trial number, last epoch, val accuracy there, line colour) per trial.
        tolerance: val-accuracy distance under which two labels at one epoch overlap (axis units).

    Returns:
        (epoch, mean val accuracy of the group, trial numbers in order, colour) per label; the
        colour is the line's for a single trial, dark grey for a group.
    """
    labels = []
    for x_end in sorted({x for _, x, _, _ in ends}):
        at_x = sorted((y, n, c) for n, x, y, c in ends if x == x_end)
        groups: list[list[tuple[float, int, str]]] = []
        for end in at_x:
            if groups and end[0] - groups[-1][-1][0] <= tolerance:
                groups[-1].append(end)
            else:
                groups.append([end])
        for group in groups:
            numbers = sorted(n for _, n, _ in group)
            colour = group[0][2] if len(group) == 1 else "dimgrey"
            labels.append((x_end, sum(y for y, _, _ in group) / len(group), numbers, colour))
    return labels


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
    """Write `confusion_figure` as a PNG at `path`; returns `path`."""
    _save(confusion_figure(evaluation), path)
    return path


def confusion_figure(evaluation: TestEvaluation) -> Figure:
    """The test confusion matrix (rows: true class, columns: predicted class, cells: counts),
    titled with the trial and the accuracy with its count on two lines, so a narrow figure of
    two classes still shows it whole; no grid lines across the cells. Beyond `COMPACT_CLASSES`
    classes: `compact_confusion_figure`, a fixed size whatever the class count."""
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    if is_compact(evaluation):
        return compact_confusion_figure(evaluation)
    n = len(evaluation.classes)
    fig, ax = _figure(max(4.0, 2.4 + 0.6 * n), max(3.6, 2.2 + 0.6 * n))
    ConfusionMatrixDisplay(np.array(evaluation.confusion), display_labels=list(evaluation.classes)).plot(
        ax=ax, colorbar=False, cmap="Blues"
    )
    ax.grid(False)  # a style with axes.grid on (Optuna's ggplot) would draw lines through the cells
    ax.set_title(_confusion_title(evaluation))
    return fig


def _confusion_title(evaluation: TestEvaluation) -> str:
    correct = sum(row[i] for i, row in enumerate(evaluation.confusion))
    return (
        f"test split, trial {evaluation.trial_number}\n"
        f"accuracy {evaluation.accuracy:.3f} ({correct}/{evaluation.n_images})"
    )


def compact_confusion_figure(evaluation: TestEvaluation) -> Figure:
    """Many classes at 11 x 4.8 inches (1210 x 528 px at the report's dpi): left, the matrix
    normalised by row (each true class's share predicted as each class) as an image with class
    indices on the axes; right, the `SHOWN_ROWS` most confused pairs as bars. No text per cell:
    K x K labels were what made the full plot take minutes and pass Pillow's pixel limit."""
    import numpy as np

    matrix = np.asarray(evaluation.confusion, dtype=np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(11, 4.8))
    left, right = fig.subplots(1, 2)
    shown = left.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="equal")
    fig.colorbar(shown, ax=left, fraction=0.046, label="share of the true class")
    left.grid(False)
    left.set(xlabel="predicted class (index)", ylabel="true class (index)", title=_confusion_title(evaluation))
    pairs = evaluation.confused_pairs(SHOWN_ROWS)
    labels = [f"{t} → {p}" for t, p in zip(pairs["true"], pairs["predicted"], strict=True)]
    right.barh(range(len(pairs)), pairs["count"], color="tab:red", alpha=0.7)
    right.set_yticks(range(len(pairs)), labels, fontsize="x-small")
    right.invert_yaxis()
    right.set(xlabel="test images", title=f"the {len(pairs)} most confused pairs (true → predicted)")
    return fig
