"""The lines a user reads after `sweep run`: what an interrupt left behind (before the first trial
or during the trials), the best trial with its role, the report's selection sentence, and no
PED-ANOVA regime warning from the importances plot."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial
from typer.testing import CliRunner

from pipeline.cli import _commands as cli
from pipeline.config import load_study
from pipeline.report._markdown import selection_rule
from pipeline.report._plots import importance_plot
from pipeline.search import plan_line
from pipeline.stages import StudyOutcome
from pipeline.stages import _study_run as study_run

from conftest import REPO, study_dict, write_study

runner = CliRunner()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "where, line",
    [
        (
            "prepare",
            "interrupted (Ctrl-C): stopped before any trial started; run the same command again to start the study",
        ),
        (
            "optimize",
            "interrupted (Ctrl-C): the trial that was running, if any, is recorded FAIL (it does not count and its "
            "parameters are retried); run the same command again to resume the study",
        ),
    ],
)
def test_ctrl_c_says_what_was_left_behind(sweep_home, study_file, monkeypatch, where, line):
    monkeypatch.setattr(study_run, where, _interrupt)
    result = runner.invoke(cli.app, ["run", str(study_file), "--quiet", "--no-report"])
    assert result.exit_code == 130
    plan = ["plan: 2 trials (sampled)"] if where == "optimize" else []  # the plan comes once the stores answered
    assert result.stderr.splitlines() == [*plan, line]


def test_ctrl_c_in_the_report_stage_says_the_trials_had_ended(sweep_home, study_file, monkeypatch):
    # A user's report: Ctrl-C after the last trial said a running trial was recorded FAIL.
    import pipeline.stages

    monkeypatch.setattr(pipeline.stages, "run_report", _interrupt)
    result = runner.invoke(cli.app, ["run", str(study_file), "--quiet"])
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1:] == [
        "interrupted (Ctrl-C): the trials had ended; the report stage stopped (a test evaluation already "
        "stored is kept and reused); run `sweep report` with this study file, or the same command again, "
        "to finish it"
    ]


def _probe_best_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(value=0.7, params={"lr": 0.01}, distributions={"lr": FloatDistribution(1e-4, 1.0)}))
    study.add_trial(create_trial(value=0.8158, user_attrs={"baseline": "linear_probe"}))
    return study


def test_summary_lines(capsys):
    study = _probe_best_study()
    cli._print_summary(StudyOutcome(study, "abc", "n_trials reached", True))
    assert capsys.readouterr().out.splitlines() == [
        f"study '{study.study_name}': 2 complete, 0 pruned, 0 failed (n_trials reached)",
        "best trial 1 (linear_probe): value 0.8158",
        "MLflow parent run abc",
    ]
    study.add_trial(create_trial(value=0.9, params={"lr": 0.02}, distributions={"lr": FloatDistribution(1e-4, 1.0)}))
    cli._print_summary(StudyOutcome(study, "abc", "n_trials reached", True))
    assert capsys.readouterr().out.splitlines()[1] == "best trial 2 (search): value 0.9000 params {'lr': 0.02}"


@pytest.mark.parametrize(
    "reruns, sentence",
    [
        (
            2,
            "Top 3 candidates by val (baselines included), each re-run with up to 2 further seed(s); the "
            "champion has the best mean (ties: lower std, then lower trial number). Only the champion is ever "
            "evaluated on test.",
        ),
        (
            0,
            "No seed re-runs (`selection.reruns: 0`): the champion is the trial with the best val (baselines "
            "included; ties: lower trial number). Only the champion is ever evaluated on test.",
        ),
    ],
)
def test_the_selection_sentence_fits_the_reruns(tmp_path, image_root, reruns, sentence):
    cfg = load_study(write_study(tmp_path / "s.yaml", study_dict(image_root, selection={"reruns": reruns})))
    assert selection_rule(cfg) == sentence


def test_importances_with_the_linear_probe_warn_of_no_regime(tmp_path, image_root):
    cfg = load_study(write_study(tmp_path / "s.yaml", study_dict(image_root)))
    study = optuna.create_study(direction="maximize")
    dists = {"lr": FloatDistribution(0.001, 0.05, log=True), "freeze_depth": optuna.distributions.IntDistribution(0, 2)}
    for i in range(6):
        study.add_trial(
            create_trial(
                value=0.5 + 0.05 * i, params={"lr": 0.001 * (i + 1), "freeze_depth": i % 3}, distributions=dists
            )
        )
    study.add_trial(create_trial(value=0.8, user_attrs={"baseline": "linear_probe"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert importance_plot(study, cfg, tmp_path / "imp.png") is None
    assert (tmp_path / "imp.png").stat().st_size > 0
    assert [str(w.message) for w in caught if "regime" in str(w.message)] == []


def test_the_readme_exit_code_table_lists_every_error_family():

    from pipeline.core import _errors as errors

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("Exit codes:") :].split("\n\n")[1]
    listed = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    families = {
        cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.SweepError)
    }
    assert listed == ["0", "1", *map(str, sorted(families - {1})), "130 / 143"]


def test_an_unknown_arch_is_a_study_file_error(tmp_path, image_root):
    path = write_study(tmp_path / "s.yaml", study_dict(image_root, model={"arch": "resnet999"}))
    result = runner.invoke(cli.app, ["check-weights", str(path)])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}: model.arch: unknown arch 'resnet999'; did you mean ")


def test_report_help_names_the_champion_not_the_best_trial():
    result = runner.invoke(cli.app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "choose the champion (baselines and seed re-runs, see README), test it once on the sealed test split" in text
    assert "best COMPLETE trial" not in text


@pytest.mark.parametrize(
    "n_trials, selection, line",
    [
        (
            3,
            {"baselines": {"linear_probe": True, "seed_recipe": True}, "top_k": 3, "reruns": 2, "refit": True},
            "plan: 3 trials (the seed recipe + 2 sampled) + the linear probe; then up to 6 re-runs (top 3 x 2 "
            "seeds); the report refits the champion on train + val",
        ),
        (
            5,
            {"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0, "refit": False},
            "plan: 5 trials (sampled)",
        ),
        (
            1,
            {"baselines": {"linear_probe": True, "seed_recipe": True}, "top_k": 2, "reruns": 1, "refit": False},
            "plan: 1 trial (the seed recipe) + the linear probe; then up to 2 re-runs (top 2 x 1 seeds)",
        ),
    ],
)
def test_the_plan_line_counts_every_training_the_run_will_do(tmp_path, image_root, n_trials, selection, line):
    """A user's report: `n_trials: 3` ran eight trainings with nothing saying so up front."""
    tree = study_dict(image_root, study={"n_trials": n_trials}, selection=selection)
    assert plan_line(load_study(write_study(tmp_path / "s.yaml", tree))) == line
