"""What one trial stores in Optuna's user attrs: every key, who writes it, and its one reading.

Written by the objective (`Objective` in `_tune.py`) unless said otherwise:
- `best_epoch` (0-based epoch of the checkpoint), `seconds` (wall time of the trial, seconds),
  `epochs_run` (epochs trained), `epoch_<kk>` (one epoch's figures, `_history.py`);
- `fail_reason` (first line of the error of a FAIL trial), `interrupted` (Ctrl-C / SIGTERM), both
  read by `pipeline.distributed` to tell a dead trial from one that failed on its own;
- `retry_of` (the FAIL trial whose parameters this trial re-runs, Optuna's retry callback);
- `host`, `pid`, `worker`, `heartbeat_at`: the process that runs the trial (`pipeline.distributed`);
- `mlflow_run_id`: the trial's nested run (the MLflow observer, through `TrialStarted.record`);
- `baseline` ("linear_probe" or "seed_recipe"), `rerun_of` + `seed_index` (a seed re-run of trial
  N), `probe_id`, `probe_C`, `probe_cv_folds`, `checkpoint` (the probe's file): `_baselines.py`.

Readers outside this module use `TrialRecord.from_frozen(trial)`, never a bare key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

from pipeline.distributed import FAIL_REASON_ATTR, INTERRUPTED_ATTR
from pipeline.search._history import epoch_history

BEST_EPOCH_ATTR = "best_epoch"
SECONDS_ATTR = "seconds"
EPOCHS_RUN_ATTR = "epochs_run"
RETRY_OF_ATTR = "retry_of"
RUN_ID_ATTR = "mlflow_run_id"
CHECKPOINT_ATTR = "checkpoint"
BASELINE_ATTR = "baseline"
RERUN_ATTR = "rerun_of"
SEED_INDEX_ATTR = "seed_index"
PROBE_ATTR = "probe_id"  # unique id of one added probe trial, to find its number after add_trial
# study attr {trial number: run id} for runs made after their trial finished (the probe's, a store
# outage's): Optuna refuses user attrs on a finished trial
SYNCED_RUNS_ATTR = "mlflow_run_ids"
ROLE_ATTRS = (BASELINE_ATTR, RERUN_ATTR, SEED_INDEX_ATTR)  # what the trial is in the race


@dataclass(frozen=True)
class TrialRecord:
    """One trial as sweep reads it: Optuna's fields plus every user attr it wrote.

    Attributes:
        number, state (TrialState name), value (best `study.metric`; None unless COMPLETE), params.
        best_epoch: 0-based epoch of the checkpoint (None unless COMPLETE).
        epochs_run: epochs trained (the stored count, else the epochs in `history`).
        seconds: wall time of the trial in seconds (None for a trial that recorded none).
        fail_reason: first line of a FAIL trial's error (None when its process died).
        interrupted: True when stopped by Ctrl-C or SIGTERM.
        retry_of: number of the FAIL trial whose parameters this one re-runs.
        mlflow_run_id: its nested MLflow run.
        checkpoint: the checkpoint path it recorded (the probe's), else None.
        baseline: "linear_probe", "seed_recipe" or None (a searched or re-run trial).
        rerun_of, seed_index: a seed re-run of trial `rerun_of`, seed 1..r; else None.
        history: its epochs in order (`epoch_history`: epoch, train_loss, train_accuracy,
            val_loss, val_accuracy as fractions 0-1, lr, seconds).
    """

    number: int
    state: str
    value: float | None
    params: dict[str, Any] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int = 0
    seconds: float | None = None
    fail_reason: str | None = None
    interrupted: bool = False
    retry_of: int | None = None
    mlflow_run_id: str | None = None
    checkpoint: str | None = None
    baseline: str | None = None
    rerun_of: int | None = None
    seed_index: int | None = None
    history: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_frozen(cls, trial: FrozenTrial) -> TrialRecord:
        """Read `trial` (any state, any sweep version's attrs: missing keys read as the defaults)."""
        a = trial.user_attrs
        history = tuple(epoch_history(a))
        return cls(
            number=trial.number,
            state=trial.state.name,
            value=None if trial.value is None else float(trial.value),
            params=dict(trial.params),
            best_epoch=_int(a.get(BEST_EPOCH_ATTR)),
            epochs_run=int(a.get(EPOCHS_RUN_ATTR, len(history))),
            seconds=None if a.get(SECONDS_ATTR) is None else float(a[SECONDS_ATTR]),
            fail_reason=a.get(FAIL_REASON_ATTR) or None,
            interrupted=bool(a.get(INTERRUPTED_ATTR)),
            retry_of=_int(a.get(RETRY_OF_ATTR)),
            mlflow_run_id=a.get(RUN_ID_ATTR) or None,
            checkpoint=a.get(CHECKPOINT_ATTR) or None,
            baseline=a.get(BASELINE_ATTR) or None,
            rerun_of=_int(a.get(RERUN_ATTR)),
            seed_index=_int(a.get(SEED_INDEX_ATTR)),
            history=history,
        )

    @property
    def is_rerun(self) -> bool:
        return self.rerun_of is not None

    @property
    def is_probe(self) -> bool:
        return self.baseline == "linear_probe"

    @property
    def role(self) -> str:
        """ "search" (a sampled point), "seed_recipe" or "linear_probe" (baselines), or "rerun of N
        seed K" (a seed re-run of trial N)."""
        if self.is_rerun:
            return f"rerun of {self.rerun_of} seed {self.seed_index}"
        return self.baseline or "search"

    @property
    def role_words(self) -> str | None:
        """The role as users read it in run names and reports (`role_words`)."""
        return role_words(self.roles())

    def roles(self) -> dict[str, Any]:
        """The role attrs it carries ({} for a searched trial), as stored."""
        stored = {BASELINE_ATTR: self.baseline, RERUN_ATTR: self.rerun_of, SEED_INDEX_ATTR: self.seed_index}
        return {k: v for k, v in stored.items() if v is not None}


def record(trial: FrozenTrial) -> TrialRecord:
    """`TrialRecord.from_frozen(trial)`, short for comprehensions."""
    return TrialRecord.from_frozen(trial)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def run_id_of(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> str | None:
    """The MLflow run id of `trial`: its own record, else the study's `SYNCED_RUNS_ATTR`."""
    return TrialRecord.from_frozen(trial).mlflow_run_id or study_attrs.get(SYNCED_RUNS_ATTR, {}).get(str(trial.number))


def role_words(roles: Mapping[str, Any]) -> str | None:
    """A trial's role attrs (`TrialRecord.roles`) as users read them in run names and reports:
    "linear probe", "seed recipe", "re-run of 3, seed 1"; None for a sampled trial."""
    if roles.get(RERUN_ATTR) is not None:
        return f"re-run of {roles[RERUN_ATTR]}, seed {roles.get(SEED_INDEX_ATTR)}"
    baseline = roles.get(BASELINE_ATTR)
    return str(baseline).replace("_", " ") if baseline else None
