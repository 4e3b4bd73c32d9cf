"""The report stage: compare the trials, test the selected one once, hand the model off.

`run_report(cfg)` on a finished or interrupted study:
1. **Compare** (`pipeline.champion`, `pipeline.report`): the trials table is written as
   `trials.csv`, with PNG plots, under the report folder.
2. **Select, then test once** (`pipeline.champion`, `pipeline.champion`): the champion is the
   best mean val over seeds among the top `selection.top_k` candidates (baselines included),
   chosen from Optuna alone (`reruns: 0`, baselines off: the best COMPLETE trial by value, ties to
   the lower number). Its checkpoint, or with `selection.refit` its refit on train + val, is
   evaluated on the sealed test split exactly once; later reports reuse the stored result. Test
   accuracy comes with a 95% Wilson interval and the val -> test gap.
3. **Register** (`pipeline.registry`, `pipeline.registry`): only the selected model, under
   `registry.model_name`, with the alias moved to it; a later report that selects the same
   checkpoint reuses that version.
4. **Clean up** trial checkpoints: the top `registry.keep_top_k` COMPLETE trials and the selected
   one are kept, the other COMPLETE trials' checkpoints are deleted.
5. **Write** `report.md` (`pipeline.report`) and `report.html` (the same, self-contained, which
   MLflow's artifact viewer renders: `pipeline.report`), log every file to the study's MLflow
   parent run under `report/`, with the selection tagged on that run and summed up in its
   description (`pipeline.report`).

Report folder: `--out` when given, else `$SWEEP_REPORTS/<study>`, else `reports/<study>` next to the
store folder (`$SWEEP_HOME/../reports/<study>`; `./reports/<study>` with the default `./mlruns`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import optuna
from optuna.trial import FrozenTrial

from pipeline import champion
from pipeline.champion import (
    Cleanup,
    Compute,
    TestEvaluation,
    clean_checkpoints,
    compute_spent,
    evaluate_once,
    trials_frame,
)
from pipeline.config import StudyConfig, experiment_artifacts, home, storage_url, tracking_uri
from pipeline.core import RegistryError, TrackingError
from pipeline.distributed import open_storage, study_lock
from pipeline.registry import Registered, register_selected
from pipeline.report import (
    Outcome,
    confusion_plot,
    markdown_lines,
    summarise_parent,
    write_html,
    write_markdown,
    write_plots,
    write_test_tables,
)
from pipeline.search import TrialRecord
from pipeline.tracking import PARENT_ATTR, Tracker, mark_champion, reconcile, remember_run_ids, run_url, ui_base

REPORTS_ENV = "SWEEP_REPORTS"


def report_dir(study_name: str, out: str | Path | None = None) -> Path:
    """Where the report files of `study_name` go (see the module docstring for the order)."""
    if out is not None:
        return Path(out)
    if os.environ.get(REPORTS_ENV):
        return Path(os.environ[REPORTS_ENV]) / study_name
    return home().parent / "reports" / study_name


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
    registered: Registered
    cleanup: Cleanup
    compute: Compute
    files: tuple[Path, ...]
    notes: tuple[str, ...] = ()
    role: str | None = None  # "linear probe", "seed recipe", "re-run of 3, seed 1"; None: a sampled trial
    refitted: bool = False  # the tested and registered model was retrained on train + val

    def summary(self) -> str:
        """Five lines (selection, test, registry, checkpoints, folder) plus one per note."""
        r, t = self.registered, self.test
        tested = "evaluated now" if self.evaluated_now else "stored evaluation, not re-run"
        version = "registered" if r.created else "already registered"
        alias = (
            f"alias '{r.alias}' -> version {r.version}"
            if r.previous_alias_version in (None, r.version)
            else f"alias '{r.alias}' moved from version {r.previous_alias_version} to {r.version}"
        )
        epoch = "" if self.best_epoch is None or self.role == "linear probe" else f" at epoch {self.best_epoch}"
        role = f" ({self.role})" if self.role else ""
        refit = "; its configuration refitted on train + val is what was tested and registered" if self.refitted else ""
        lines = [
            (
                f"selected trial {self.selected_trial}{role} of study '{self.study_name}': {self.metric} "
                f"{self.val_value:.4f}{epoch}{refit}"
            ),
            f"test accuracy {t.accuracy:.4f} on {t.n_images} images ({tested})",
            f"model '{r.name}' version {r.version} {version}; {alias} ({r.uri})",
            f"checkpoints: kept {len(self.cleanup.kept)}, deleted {len(self.cleanup.deleted)}",
            f"report: {self.folder}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def run_report(
    cfg: StudyConfig,
    *,
    storage: str | None = None,
    tracking: str | None = None,
    out: str | Path | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> ReportResult:
    """Compare, select, test once, register, clean up and write the report (module docstring).

    Re-running on an unchanged study rewrites the report files but neither re-evaluates the test
    split nor creates a second model version. One report stage runs at a time per study, on any
    machine: the study's "report" lock lives in its own storage (`pipeline.distributed`, seen
    through a gRPC proxy too); `on_wait` gets one line naming the holder while another one runs.

    Raises:
        StudyStateError: no such study in the storage.
        RegistryError: no COMPLETE trial (after writing the comparison), a missing checkpoint, a
            registry that fails to answer, or a failed registration.
        TrackingError: the MLflow store cannot be used, or the report folder cannot be created.
        DataError: the test split cannot be read (only when it has to be evaluated).
    """
    from pipeline.search import load_existing

    study = load_existing(cfg, storage)  # a study never run: say so before taking any lock
    backend = open_storage(storage_url(cfg, storage))
    # A second report waits, then finds the test evaluation and the model version recorded and
    # reuses them.
    with study_lock(backend, cfg.study.name, "report", on_wait=on_wait):
        return _report(cfg, study, tracking, out)


def _report(cfg: StudyConfig, study: optuna.Study, tracking: str | None, out: str | Path | None) -> ReportResult:
    trials = study.get_trials(deepcopy=False)
    folder = _make_folder(report_dir(cfg.study.name, out))
    notes: list[str] = list(worker_notes(trials, cfg.study.n_trials))
    tracker, parent = _open_tracker(cfg, tracking, study, trials, notes)
    frame, compute = trials_frame(study, cfg), compute_spent(trials, cfg.training.epochs)
    frame.to_csv(folder / "trials.csv", index=False)
    try:
        choice = champion.choose(trials, cfg)
    except RegistryError:  # no COMPLETE trial: the comparison is still written, then the clear message
        plots, plot_notes = write_plots(study, cfg, frame, folder, None)
        link = partial(run_url, ui_base(tracker.uri), tracker.experiment_id)
        md = write_markdown(folder, cfg, trials, frame, compute, None, notes + plot_notes, plots, (), link)
        _log_files(tracker, parent, [folder / "trials.csv", *plots, md, write_html(md)])
        raise
    plots, plot_notes = write_plots(study, cfg, frame, folder, choice.selected.number)
    notes += plot_notes
    outcome, fresh, section = _hand_off(cfg, study, trials, choice, tracker, parent)
    notes.append(section[0])
    untested = outcome.test.untested_classes()
    if untested:
        notes.append(
            f"{len(untested)} class(es) have no test image, so no test figures: {', '.join(untested[:10])}"
            + (" ..." if len(untested) > 10 else "")
            + "; add images to them (a carved split needs about 10 per class) or a test folder"
        )
    confusion = confusion_plot(outcome.test, folder / "confusion_matrix.png")
    tables = write_test_tables(outcome.test, folder)
    link = partial(run_url, ui_base(tracker.uri), tracker.experiment_id)
    md = write_markdown(folder, cfg, trials, frame, compute, outcome, notes, plots, section[1:], link)
    files = (folder / "trials.csv", *plots, confusion, *tables, md, write_html(md))
    _log_files(tracker, parent, files)
    _tag_parent(tracker, parent, outcome, fresh)
    summarise_parent(tracker, parent, cfg, trials, outcome, fresh)
    return ReportResult(
        study_name=cfg.study.name,
        folder=folder,
        metric=cfg.study.metric,
        selected_trial=outcome.selected.number,
        val_value=cast(float, outcome.selected.value),  # COMPLETE: it has a value
        best_epoch=TrialRecord.from_frozen(outcome.selected).best_epoch,
        test=outcome.test,
        evaluated_now=fresh,
        registered=outcome.registered,
        cleanup=outcome.cleanup,
        compute=compute,
        files=files,
        notes=tuple(notes),
        role=TrialRecord.from_frozen(outcome.selected).role_words,
        refitted=outcome.refitted,
    )


def worker_notes(trials: Sequence[FrozenTrial], n_trials: int) -> list[str]:
    """Lines on what many workers did to the study: trials finished beyond `n_trials` (overshoot)
    and the parameters of dead or interrupted trials re-run by another trial."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from pipeline.search import overshoot

    lines = []
    extra = overshoot(trials, n_trials)
    if extra:
        lines.append(
            f"overshoot: {extra} trial(s) finished beyond study.n_trials = {n_trials} (started by "
            "workers in the same instant as the last counted trials)"
        )
    retries = [(RetryHeartbeatStaleTrialCallback.retry_history(t), t.number) for t in trials]
    retried = [f"trial {history[-1]} as trial {number}" for history, number in retries if history]
    if retried:
        lines.append(f"re-run after their process died or was interrupted: {', '.join(retried)}")
    return lines


def _open_tracker(
    cfg: StudyConfig, tracking: str | None, study: optuna.Study, trials: Sequence[FrozenTrial], notes: list[str]
) -> tuple[Tracker, str | None]:
    """The study's tracker and parent run id; trials run while the store was down get their runs
    now that it answers (`track.reconcile`)."""
    uri = tracking_uri(cfg, tracking)
    tracker = Tracker(uri, cfg.experiment_name, experiment_artifacts(uri), warn=notes.append)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent:
        tracker.parent_id = parent
        synced = reconcile(tracker, trials, cfg.study.name)
        if synced:
            notes.append(f"MLflow runs of trial(s) {', '.join(map(str, synced))} rebuilt from Optuna's record")
        remember_run_ids(study, tracker)
    return tracker, parent


def _hand_off(
    cfg: StudyConfig,
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    choice: champion.Choice,
    tracker: Tracker,
    parent: str | None,
) -> tuple[Outcome, bool, list[str]]:
    """Test the champion's model (its checkpoint, or its refit on train + val) once, register it,
    then delete the checkpoints not kept. Also returns the selection section of the report, its
    first line the one-line figures."""
    selected = choice.selected
    checkpoint, path, sha, refitted = champion.tested_model(study, cfg, choice)
    evaluation, fresh = evaluate_once(study, cfg, checkpoint, sha)
    champion.record_tested(study, selected, path, sha, refitted)
    figures = champion.honest_figures(cfg, choice, evaluation)
    extra = champion.metadata(choice, figures, refitted)
    registered = register_selected(cfg, tracker, parent, selected, checkpoint, sha, evaluation, extra)
    mark_champion(tracker, selected)
    cleanup = clean_checkpoints(trials, selected, cfg.study.direction, cfg.registry.keep_top_k, cfg.study.name)
    section = [figures.describe(), *markdown_lines(cfg, choice, figures, refitted)]
    return Outcome(selected, evaluation, registered, cleanup, figures, refitted), fresh, section


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingError(
            f"{folder}: cannot create the report folder ({err.strerror or err}); "
            f"pass --out DIR or set {REPORTS_ENV} to a writable folder"
        ) from None
    return folder


def _log_files(tracker: Tracker, parent: str | None, files: Sequence[Path]) -> None:
    for path in files:
        tracker.log_artifact(parent, path, "report")


def _tag_parent(tracker: Tracker, parent: str | None, outcome: Outcome, fresh: bool) -> None:
    test, registered = outcome.test, outcome.registered
    tracker.set_tags(
        parent,
        {
            "sweep.selected_trial": str(outcome.selected.number),
            "sweep.test_accuracy": f"{test.accuracy:.6f}",
            "sweep.registered_model": f"{registered.name}/{registered.version}",
        },
    )
    if fresh:  # logged once, with the one evaluation
        tracker.log_metrics(parent, {"test_accuracy": test.accuracy, "test_loss": test.loss}, step=0)
