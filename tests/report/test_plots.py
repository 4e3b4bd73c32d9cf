"""The report's plots on hand-made studies: which files are written, which are skipped and why."""

from __future__ import annotations

import matplotlib
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from pipeline.champion import TestEvaluation, trials_frame
from pipeline.config import StudyConfig
from pipeline.report import _plots as P

from conftest import study_dict

PNG = b"\x89PNG\r\n\x1a\n"
DIST = {"lr": FloatDistribution(0.001, 0.05, log=True), "freeze_depth": IntDistribution(0, 2)}


def _history(*accuracies: float) -> list[dict]:
    return [{"epoch": i, "val_accuracy": a, "val_loss": 1 - a} for i, a in enumerate(accuracies)]


def _add(study: optuna.Study, state: TrialState, value: float | None, params: dict, history: list[dict]) -> None:
    extra = {"intermediate_values": {h["epoch"]: h["val_accuracy"] for h in history}} if history else {}
    study.add_trial(
        create_trial(
            state=state, value=value, params=params, distributions=DIST, user_attrs={"history": history}, **extra
        )
    )


@pytest.fixture
def cfg(tmp_path) -> StudyConfig:
    return StudyConfig.model_validate(study_dict(tmp_path))  # search space: lr (log), freeze_depth


def _written(study, cfg, folder, selected):
    return P.write_plots(study, cfg, trials_frame(study, cfg), folder, selected)


def test_all_plots_of_a_study_with_complete_and_pruned_trials(cfg, tmp_path):
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 0.9, {"lr": 0.01, "freeze_depth": 0}, _history(0.6, 0.9))
    _add(study, TrialState.COMPLETE, 0.7, {"lr": 0.03, "freeze_depth": 2}, _history(0.5, 0.7))
    _add(study, TrialState.COMPLETE, 0.5, {"lr": 0.002, "freeze_depth": 1}, _history(0.4, 0.5))
    _add(study, TrialState.PRUNED, 0.3, {"lr": 0.04, "freeze_depth": 1}, _history(0.3))
    style = {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")}
    files, notes = _written(study, cfg, tmp_path, selected=0)
    assert [p.name for p in files] == [
        "optimization_history.png",
        "param_importances.png",
        "learning_curves.png",
        "val_accuracy_vs_lr.png",
        "val_accuracy_vs_freeze_depth.png",
    ]
    assert notes == []
    assert all(p.read_bytes()[:8] == PNG and p.stat().st_size > 1000 for p in files)
    # Optuna's plots switch pyplot to its ggplot style; the report keeps that to itself (only the
    # backend is set, to Agg)
    assert {k: v for k, v in matplotlib.rcParams.items() if not k.startswith("backend")} == style
    assert matplotlib.get_backend().lower() == "agg"


def test_plots_that_cannot_be_drawn_are_noted_and_stale_files_removed(cfg, tmp_path):
    (tmp_path / "param_importances.png").write_bytes(b"from an earlier report")
    (tmp_path / "val_accuracy_vs_lr.png").write_bytes(b"from an earlier report")
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.FAIL, None, {"lr": 0.01, "freeze_depth": 0}, [])
    files, notes = _written(study, cfg, tmp_path, selected=None)
    assert [p.name for p in files] == ["learning_curves.png"]
    assert notes == [
        "optimisation history skipped: no COMPLETE trial",
        (
            "parameter importances skipped: they need at least 2 COMPLETE trials whose parameters differ "
            "(this study has 0 COMPLETE trial(s))"
        ),
        "val accuracy vs lr skipped: no trial has reported an epoch yet",
        "val accuracy vs freeze_depth skipped: no trial has reported an epoch yet",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning_curves.png"]


def test_importances_of_trials_with_one_value_are_skipped(cfg, tmp_path):
    study = optuna.create_study(direction="maximize")
    for lr, depth in [(0.01, 0), (0.02, 1), (0.04, 2)]:
        _add(study, TrialState.COMPLETE, 0.5, {"lr": lr, "freeze_depth": depth}, _history(0.5))
    files, notes = _written(study, cfg, tmp_path, selected=0)
    assert "param_importances.png" not in [p.name for p in files]
    assert notes == [
        (
            "parameter importances skipped: every COMPLETE trial has the same val_accuracy (0.5), "
            "so no parameter explains a difference"
        )
    ]


def test_confusion_plot(tmp_path):
    evaluation = TestEvaluation(
        trial_number=1,
        checkpoint_sha256="ab" * 32,
        classes=("ants", "bees", "wasps"),
        n_images=9,
        accuracy=7 / 9,
        loss=0.5,
        precision=(1.0, 0.75, 0.667),
        recall=(1.0, 1.0, 0.333),
        f1=(1.0, 0.86, 0.44),
        support=(3, 3, 3),
        confusion=((3, 0, 0), (0, 3, 0), (0, 1, 2)),
        evaluated_at="2025-01-01T00:00:00+00:00",
    )
    path = P.confusion_plot(evaluation, tmp_path / "confusion_matrix.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


@pytest.mark.parametrize("classes", [("ants", "bees"), ("ants", "bees", "wasps")])
def test_confusion_title_is_whole_and_no_grid_crosses_the_cells(classes):
    n = len(classes)
    confusion = tuple(tuple(35 if i == j else (3 if j == (i + 1) % n else 0) for j in range(n)) for i in range(n))
    total = sum(map(sum, confusion))
    evaluation = TestEvaluation(
        trial_number=12,
        checkpoint_sha256="ab" * 32,
        classes=classes,
        n_images=total,
        accuracy=35 * n / total,
        loss=0.3,
        precision=(0.9,) * n,
        recall=(0.9,) * n,
        f1=(0.9,) * n,
        support=(38,) * n,
        confusion=confusion,
        evaluated_at="2025-01-01T00:00:00+00:00",
    )
    with matplotlib.rc_context({"axes.grid": True}):  # a grid-on style (ggplot) in force
        fig = P.confusion_figure(evaluation)
        fig.tight_layout()
        fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_title() == f"test split, trial 12\naccuracy {35 * n / total:.3f} ({35 * n}/{total})"
    title = ax.title.get_window_extent()
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1, "title cut"
    assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())


def test_learning_curve_labels_of_tied_trials_share_one_place():
    ends = [(0, 2, 1.0, "#1f77b4"), (1, 2, 1.0, "#ff7f0e"), (2, 2, 0.995, "#2ca02c"), (3, 2, 0.8, "#d62728")]
    ends += [(4, 0, 0.5, "#7f7f7f"), (5, 0, 0.5, "#7f7f7f")]
    labels = P.end_labels(ends, tolerance=0.015)
    assert [(x, round(y, 4), numbers, colour) for x, y, numbers, colour in labels] == [
        (0, 0.5, [4, 5], "dimgrey"),
        (2, 0.8, [3], "#d62728"),
        (2, 0.9983, [0, 1, 2], "dimgrey"),
    ]


def test_learning_curves_label_each_end_once_and_list_only_the_states_drawn(cfg):
    study = optuna.create_study(direction="maximize")
    _add(study, TrialState.COMPLETE, 1.0, {"lr": 0.01, "freeze_depth": 0}, _history(0.5, 1.0))
    _add(study, TrialState.COMPLETE, 1.0, {"lr": 0.02, "freeze_depth": 1}, _history(0.75, 1.0))
    _add(study, TrialState.PRUNED, 0.25, {"lr": 0.03, "freeze_depth": 2}, _history(0.25))
    fig = P.learning_curves_figure(study, cfg, selected=0)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0, 1", "2"]  # trials 0 and 1 end at the same point
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "complete (one colour per trial)",
        "pruned",
        "selected (trial 0)",
    ]  # no "fail" entry: no trial failed
