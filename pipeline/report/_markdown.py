"""`report.md`: the study's report as GitHub-flavoured Markdown, beside its plots."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline.champion import Choice, Cleanup, Compute, TestEvaluation, TestFigures
from pipeline.config import StudyConfig
from pipeline.registry import Registered
from pipeline.report._test_tables import SHOWN_ROWS, is_compact, lowest_recall
from pipeline.search import TrialRecord


@dataclass(frozen=True)
class Outcome:
    """What the report did with the selected trial (absent when no trial is COMPLETE)."""

    selected: FrozenTrial
    test: TestEvaluation
    registered: Registered
    cleanup: Cleanup
    figures: TestFigures  # the one set of test figures every description of the model quotes
    refitted: bool = False  # the tested model is the champion's configuration retrained on train + val


def table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """`frame` as a Markdown pipe table (`DataFrame.to_markdown`, no index): missing values as
    empty cells, `|` inside a cell escaped, floats with `floatfmt`."""
    cells = frame.astype(object).where(frame.notna(), "")
    cells = cells.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v)
    return cells.to_markdown(index=False, floatfmt=floatfmt)


def linked_numbers(frame: pd.DataFrame, run_link: Callable[[str], str] | None) -> pd.DataFrame:
    """`frame` with each trial number as a Markdown link to its MLflow run (when it has one)."""
    if run_link is None:
        return frame
    numbers = [
        f"[{n}]({run_link(r)})" if isinstance(r, str) and r else n
        for n, r in zip(frame["number"], frame["mlflow_run_id"], strict=True)
    ]
    return frame.assign(number=numbers)


def write_markdown(
    folder: Path,
    cfg: StudyConfig,
    trials: Sequence[FrozenTrial],
    frame: pd.DataFrame,
    compute: Compute,
    outcome: Outcome | None = None,
    notes: Sequence[str] = (),
    plots: Sequence[Path] = (),
    selection: Sequence[str] = (),
    run_link: Callable[[str], str] | None = None,
) -> Path:
    """Write `folder/report.md` (UTF-8) and return its path.

    Sections: header with trial counts by state, the selected trial / test split / registered
    model (or a line saying nothing was selected), compute, the trials table (`frame` without the
    run ids) with failed trials' reasons, plots (relative links), checkpoints, notes.
    `run_link(run_id)`: the MLflow UI address of a run; each trial number then links to its run.

    Raises:
        OSError: the file cannot be written.
    """
    counts = frame["state"].value_counts().to_dict()
    lines = [
        f"# Study report: {cfg.study.name}",
        "",
        f"Metric: `{cfg.study.metric}` ({cfg.study.direction}); trials: "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())),
        "",
    ]
    if outcome is None:
        lines += ["**No COMPLETE trial**: nothing was tested or registered.", ""]
    else:
        lines += [*selection, *selection_lines(cfg, outcome)]
    lines += compute_lines(compute)
    lines += [
        "## Trials",
        "",
        f"Sorted by `{cfg.study.metric}`; `seconds` is wall time; epochs are 0-based.",
        "",
        table(linked_numbers(frame, run_link).drop(columns=["mlflow_run_id"])),
        "",
    ]
    failed = fail_reasons(trials)
    if failed:
        lines += ["Failed trials:", "", *[f"- trial {n}: {r}" for n, r in failed], ""]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    if outcome is not None:
        c = outcome.cleanup
        lines += [
            "## Checkpoints",
            "",
            (
                f"Kept: {', '.join(p.name for p in c.kept) or 'none'}; "
                f"deleted by this report: {', '.join(p.name for p in c.deleted) or 'none'} "
                f"(registry.keep_top_k = {cfg.registry.keep_top_k}, the selected trial is always kept)."
            ),
            "",
        ]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def trial_phrase(cfg: StudyConfig, trial: FrozenTrial, title: bool = False) -> str:
    """ "**trial 3** (seed recipe): val_accuracy 0.9487 at epoch 4 (lr=0.001, ...)" (markdown); the
    linear probe has neither epochs nor params: "**trial 0** (linear probe): val_accuracy 0.9231 (...)"."""
    rec = TrialRecord.from_frozen(trial)
    role = f" ({rec.role_words})" if rec.role_words else ""
    name = f"**{'Trial' if title else 'trial'} {trial.number}**{role}"
    head = f"{name}: {cfg.study.metric} {trial.value:.4f}"
    if rec.baseline == "linear_probe":
        return f"{head} (logistic regression on the frozen backbone's features)"
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"{head} at epoch {rec.best_epoch}" + (f" ({params})" if params else "")


def selection_lines(cfg: StudyConfig, outcome: Outcome) -> list[str]:
    """Selected trial, sealed-test results (per class and confusion matrix) and registered model."""
    selected, test, registered = outcome.selected, outcome.test, outcome.registered
    return [
        "## Selected trial",
        "",
        (
            f"{trial_phrase(cfg, selected, title=True)}. Chosen among COMPLETE trials by "
            f"`{cfg.study.metric}` (ties: lower trial number); test figures never choose anything."
        ),
        "",
        f"## Test split (sealed; evaluated once, {test.evaluated_at})",
        "",
        (
            f"Accuracy **{test.accuracy:.4f}** on {test.n_images} images "
            f"(mean cross-entropy {test.loss:.4f}); checkpoint sha256 `{test.checkpoint_sha256[:16]}…`."
        ),
        "",
        *test_tables(test),
        "![confusion matrix](confusion_matrix.png)",
        "",
        "## Registered model",
        "",
        (
            f"`{registered.name}` version {registered.version}, alias `{registered.alias}`: "
            f"load it with `{registered.uri}`."
        ),
        "",
    ]


def test_tables(test: TestEvaluation) -> list[str]:
    """Per-class figures and the confusion matrix: whole up to `COMPACT_CLASSES` classes, beyond
    that the lowest recalls and the most confused pairs, pointing at the CSV files."""
    if not is_compact(test):
        return [
            table(test.per_class(), floatfmt=".4f"),
            "",
            "Confusion matrix (rows: true class, columns: predicted; also in `confusion_matrix.csv`):",
            "",
            table(test.confusion_frame().reset_index(names="")),
            "",
        ]
    n = len(test.classes)
    return [
        f"The {SHOWN_ROWS} classes with the lowest recall (all {n} in `per_class.csv`):",
        "",
        table(lowest_recall(test), floatfmt=".4f"),
        "",
        f"The {SHOWN_ROWS} most confused pairs (the whole {n} x {n} matrix in `confusion_matrix.csv`):",
        "",
        table(test.confused_pairs(SHOWN_ROWS), floatfmt=".4f"),
        "",
    ]


def compute_lines(c: Compute) -> list[str]:
    """The compute section: trial-epochs and seconds spent, and what pruning saved."""
    return [
        "## Compute",
        "",
        f"Spent: {c.trial_epochs} trial-epochs, {c.seconds:.1f} s of trial wall time.",
        (
            f"Pruning stopped {c.pruned_trials} trial(s) early and saved {c.epochs_saved} trial-epochs "
            f"(about {c.seconds_saved:.1f} s at each pruned trial's mean epoch time), "
            f"{100 * c.saved_fraction:.0f}% of running every trial to its last epoch."
        ),
        "",
    ]


def fail_reasons(trials: Sequence[FrozenTrial]) -> list[tuple[int, str]]:
    """(trial number, recorded `fail_reason`) of every FAIL trial, in trial order."""
    return [
        (t.number, TrialRecord.from_frozen(t).fail_reason or "no reason recorded (process stopped)")
        for t in trials
        if t.state == TrialState.FAIL
    ]


def selection_rule(cfg: StudyConfig) -> str:
    """The report's sentence on how the champion was chosen, for the study's `selection` settings."""
    s = cfg.selection
    how = (
        f"Top {s.top_k} candidates by val (baselines included), each re-run with up to {s.reruns} further "
        "seed(s); the champion has the best mean (ties: lower std, then lower trial number)."
        if s.reruns
        else "No seed re-runs (`selection.reruns: 0`): the champion is the trial with the best val "
        "(baselines included; ties: lower trial number)."
    )
    return f"{how} Only the champion is ever evaluated on test."


def markdown_lines(cfg: StudyConfig, choice: Choice, figures: TestFigures, refitted: bool) -> list[str]:
    """The report's selection section: candidates (mean ± std over seeds, spread) and the
    champion's honest test figures."""
    t = choice.table
    shown = pd.DataFrame(
        {
            "trial": t["number"],
            "kind": [b or k for k, b in zip(t["kind"], t["baseline"], strict=True)],
            "params": [
                ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "-"
                for p in t["params"]
            ],
            "seeds": t["n_seeds"],
            f"mean ± std {cfg.study.metric}": [
                f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"
                for m, s in zip(t["mean"], t["std"], strict=True)
            ],
            "spread (min-max)": [f"{a:.4f}-{b:.4f}" for a, b in zip(t["min"], t["max"], strict=True)],
            "refit epochs": t["refit_epochs"],
        }
    )
    tested = (
        f"the champion's configuration refitted on train + val"
        f"{f' for {choice.refit_epochs} epoch(s)' if choice.refit_epochs else ''}"
        if refitted
        else "the champion trial's best-epoch checkpoint"
    )
    gap = "" if figures.gap is None else f"; val → test gap {figures.gap:+.4f} (val: the champion's mean over seeds)"
    return [
        "## Candidates and champion",
        "",
        selection_rule(cfg),
        "",
        table(shown),
        "",
        (
            f"**Champion: trial {choice.selected.number}**; tested model: {tested}. Test accuracy "
            f"**{figures.accuracy:.4f}** ({figures.correct}/{figures.total}; {figures.confidence:.0%} "
            f"{figures.method} interval {figures.low:.4f}-{figures.high:.4f}){gap}."
        ),
        "",
    ]
