"""report.md: Markdown tables and the sections of a study without a COMPLETE trial."""

from __future__ import annotations

import math

import optuna
import pandas as pd
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from pipeline.champion import Compute, trials_frame
from pipeline.config import StudyConfig
from pipeline.report import _markdown as MD

from conftest import study_dict


def test_table_leaves_missing_cells_empty_and_escapes_pipes():
    frame = pd.DataFrame(
        {
            "number": [0, 1],
            "best": [0.123456, math.nan],
            "epoch": pd.array([2, None], dtype="Int64"),
            "choice": ["a|b", None],
        }
    )
    assert MD.table(frame).splitlines() == [
        "|   number |   best |   epoch | choice   |",
        "|---------:|-------:|--------:|:---------|",
        "|        0 | 0.1235 |       2 | a\\|b     |",
        "|        1 |        |         |          |",
    ]
    assert MD.table(frame[["best"]].head(1), floatfmt=".2f").splitlines()[-1] == "|   0.12 |"


def test_report_of_a_study_without_complete_trial(tmp_path):
    cfg = StudyConfig.model_validate(study_dict(tmp_path))
    study = optuna.create_study(direction="maximize")
    dist = {"lr": FloatDistribution(0.001, 0.05, log=True), "freeze_depth": IntDistribution(0, 2)}
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            value=0.5,
            params={"lr": 0.01, "freeze_depth": 1},
            distributions=dist,
            intermediate_values={0: 0.5},
            user_attrs={"history": [{"epoch": 0, "val_accuracy": 0.5}], "epochs_run": 1},
        )
    )
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            params={"lr": 0.02, "freeze_depth": 0},
            distributions=dist,
            user_attrs={"fail_reason": "out of memory: lower data.batch_size"},
        )
    )
    study.add_trial(create_trial(state=TrialState.FAIL, params={"lr": 0.03, "freeze_depth": 0}, distributions=dist))
    trials = study.get_trials()
    compute = Compute(trial_epochs=1, seconds=12.34, pruned_trials=1, epochs_saved=1, seconds_saved=6.0)
    path = MD.write_markdown(
        tmp_path,
        cfg,
        trials,
        trials_frame(study, cfg),
        compute,
        notes=["optimisation history skipped: no COMPLETE trial"],
        plots=[tmp_path / "learning_curves.png"],
    )
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.md"
    assert text.startswith(
        "# Study report: tiny\n\nMetric: `val_accuracy` (maximize); trials: 2 fail, 1 pruned\n\n"
        "**No COMPLETE trial**: nothing was tested or registered.\n"
    )
    assert (
        "Spent: 1 trial-epochs, 12.3 s of trial wall time.\nPruning stopped 1 trial(s) early and saved 1 "
        "trial-epochs (about 6.0 s at each pruned trial's mean epoch time), 50% of running every trial "
        "to its last epoch."
    ) in text
    assert (
        "Failed trials:\n\n- trial 1: out of memory: lower data.batch_size\n"
        "- trial 2: no reason recorded (process stopped)\n"
    ) in text
    assert "## Plots\n\n![learning_curves](learning_curves.png)\n" in text
    assert text.endswith("## Notes\n\n- optimisation history skipped: no COMPLETE trial\n")
    assert "## Selected trial" not in text and "## Checkpoints" not in text and "mlflow_run_id" not in text


def test_the_selected_trial_reads_by_its_role_and_the_probe_has_no_empty_params(tmp_path):
    """A user's report: the probe read `val_accuracy 0.8667 at epoch 0 ()` in report.md."""
    cfg = StudyConfig.model_validate(study_dict(tmp_path))
    probe = create_trial(state=TrialState.COMPLETE, value=0.8667, user_attrs={"baseline": "linear_probe"})
    probe.number = 1
    rerun = create_trial(
        state=TrialState.COMPLETE,
        value=0.9,
        params={"lr": 0.0123456, "freeze_depth": 2},
        distributions={"lr": FloatDistribution(1e-4, 0.1, log=True), "freeze_depth": IntDistribution(0, 4)},
        user_attrs={"rerun_of": 3, "seed_index": 1, "best_epoch": 2},
    )
    rerun.number = 5
    assert MD.trial_phrase(cfg, probe, title=True) == (
        "**Trial 1** (linear probe): val_accuracy 0.8667 (logistic regression on the frozen backbone's features)"
    )
    assert MD.trial_phrase(cfg, rerun) == (
        "**trial 5** (re-run of 3, seed 1): val_accuracy 0.9000 at epoch 2 (lr=0.01235, freeze_depth=2)"
    )
