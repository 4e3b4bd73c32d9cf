"""Selection that resists luck: top candidates by val, seed re-runs, choose by the mean.

Pure functions over Optuna `FrozenTrial`s (no MLflow, no I/O). The maximum of a small, noisy val
set over many trials and epochs overstates the winner (the winner's curse of hyperparameter
search); re-running the top `k` candidates with `r` further seeds and choosing by the mean makes
the choice depend less on one lucky draw of data order and augmentation.

Trial user attrs read here (`TrialRecord`, set by whoever enqueues or runs the trials):
`rerun_of` (the number of the trial whose params a re-run repeats), `seed_index` (1..r on re-runs;
the original trial counts as seed index 0), `baseline` (`"linear_probe"` or `"seed_recipe"`).

A candidate's value per seed is the trial's value (its best val metric over epochs, see
`train.fit`). With `r = 0` and no baselines, `choose_champion(candidate_table(...))` picks the
best COMPLETE trial by value, ties to the lower trial number: the selection before re-runs.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import score_sign
from pipeline.search._record import RERUN_ATTR, SEED_INDEX_ATTR, record

# Baselines whose val value does not depend on a training seed (no data order, no augmentation):
# re-running them would repeat the same number, so they take part with their single value.
SEEDLESS: frozenset[str] = frozenset({"linear_probe"})
# A re-run in one of these states is not "missing": it is done, running, queued, or (pruned) spent.
# A FAIL re-run is missing again; a retry of it (Optuna's RetryFailedTrialCallback copies user
# attrs) shows up as WAITING or RUNNING and counts as present.
_PRESENT = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)

TABLE_COLUMNS = (
    "number",
    "kind",
    "baseline",
    "params",
    "value",
    "n_seeds",
    "seed_values",
    "mean",
    "std",
    "min",
    "max",
    "mean_best_epoch",
    "refit_epochs",
)


def _sign(direction: str) -> float:
    """The sort key's sign: ascending `_sign(d) * value` puts the best first (`score_sign`, negated)."""
    return -score_sign(direction)


def _value(trial: FrozenTrial) -> float:
    """The trial's value as a float (NaN when it has none; callers keep only trials with one)."""
    return math.nan if trial.value is None else float(trial.value)


def is_rerun(trial: FrozenTrial) -> bool:
    """True for a seed re-run (it carries `rerun_of`)."""
    return record(trial).is_rerun


def role(trial: FrozenTrial) -> str:
    """What the trial is in the race: "search" (a sampled point), "seed_recipe" or "linear_probe"
    (baselines), or "rerun of N seed K" (a seed re-run of trial N)."""
    return record(trial).role


def rerun_attrs(number: int, seed_index: int) -> dict[str, int]:
    """User attrs for the re-run `seed_index` (1..r) of trial `number`, for `study.enqueue_trial`."""
    if seed_index < 1:
        raise ValueError(f"seed_index of a re-run starts at 1 (0 is the original trial), got {seed_index}")
    return {RERUN_ATTR: int(number), SEED_INDEX_ATTR: int(seed_index)}


def top_candidates(trials: Sequence[FrozenTrial], k: int, direction: str = "maximize") -> list[FrozenTrial]:
    """The `k` best COMPLETE original trials (baselines included, re-runs excluded) by value.

    Order: best value first; ties go to the lower trial number. `k` larger than the number of
    such trials returns them all.

    Raises:
        ValueError: `k < 1` or an unknown direction.
    """
    if k < 1:
        raise ValueError(f"k (candidates to re-run) must be at least 1, got {k}")
    sign = _sign(direction)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and not is_rerun(t)]
    return sorted(done, key=lambda t: (sign * _value(t), t.number))[:k]


def rerun_plan(
    trials: Sequence[FrozenTrial], k: int, r: int, direction: str = "maximize", seedless: Collection[str] = SEEDLESS
) -> list[tuple[int, int]]:
    """Re-runs still missing for the top `k` candidates: `(trial number, seed index)` pairs.

    Each candidate needs seed indexes 1..r; one is present when some trial carries
    `rerun_of == number` and that `seed_index` in state COMPLETE, RUNNING, WAITING or PRUNED, so a
    resumed study or a second worker enqueues only what nobody has. Candidates whose `baseline` is
    in `seedless` (the linear probe) need none. Order: candidate rank, then seed index.

    Raises:
        ValueError: `r < 0`, `k < 1` or an unknown direction.
    """
    if r < 0:
        raise ValueError(f"r (seed re-runs per candidate) must be at least 0, got {r}")
    present = {(rec.rerun_of, rec.seed_index) for t in trials if (rec := record(t)).is_rerun and t.state in _PRESENT}
    return [
        (t.number, i)
        for t in top_candidates(trials, k, direction)
        if record(t).baseline not in seedless
        for i in range(1, r + 1)
        if (t.number, i) not in present
    ]


def _seed_trials(original: FrozenTrial, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The original plus its COMPLETE re-runs, one per seed index (the lowest number when a race
    between workers ran one twice), ordered by seed index."""
    by_index: dict[tuple[int, int], FrozenTrial] = {(0, 0): original}
    reruns = sorted(
        (
            t
            for t in trials
            if t.state == TrialState.COMPLETE and t.value is not None and record(t).rerun_of == original.number
        ),
        key=lambda t: t.number,
    )
    for t in reruns:
        index = record(t).seed_index
        # A re-run without a seed index is still a seed of its own, after the indexed ones.
        by_index.setdefault((0, int(index)) if index is not None else (1, t.number), t)
    return [by_index[i] for i in sorted(by_index)]


def _best_step(values: dict[int, float], sign: float) -> int | None:
    """Step of the best intermediate value; ties go to the earlier step (as `train.fit` does)."""
    return min(values, key=lambda s: (sign * values[s], s)) if values else None


def _refit_epochs(seeds: list[FrozenTrial], sign: float) -> int | None:
    """Number of epochs (step + 1) at which the mean val curve over the seeds peaks, over the steps
    every seed reported; ties go to fewer epochs. None when the seeds share no step."""
    steps = set.intersection(*(set(t.intermediate_values) for t in seeds))
    if not steps:
        return None
    curve = {s: float(np.mean([t.intermediate_values[s] for t in seeds])) for s in steps}
    best = _best_step(curve, sign)
    return None if best is None else best + 1


def candidate_table(trials: Sequence[FrozenTrial], k: int | None = None, direction: str = "maximize") -> pd.DataFrame:
    """One row per candidate (the top `k` by `top_candidates`; all COMPLETE originals when None).

    Columns:
        number (the original trial), kind ("trial" | "baseline"), baseline (its name, "" for
        trials), params (dict), value (the original's value, as the search saw it), n_seeds
        (original + COMPLETE re-runs), seed_values (tuple, by seed index), mean, std (sample
        standard deviation, ddof 1; NaN for one seed), min, max, mean_best_epoch (mean 0-based step
        of each seed's best intermediate value; NaN without intermediate values), refit_epochs
        (epoch count at which the mean val curve peaks; <NA> without intermediate values).

    Rows are in champion order (see `choose_champion`), so row 0 is the champion.
    """
    sign = _sign(direction)
    originals = top_candidates(trials, k if k is not None else max(len(trials), 1), direction)
    rows = []
    for t in originals:
        seeds = _seed_trials(t, trials)
        values = [_value(s) for s in seeds]
        best_steps = [b for s in seeds if (b := _best_step(s.intermediate_values, sign)) is not None]
        name = record(t).baseline or ""
        rows.append(
            {
                "number": t.number,
                "kind": "baseline" if name else "trial",
                "baseline": name,
                "params": dict(t.params),
                "value": _value(t),
                "n_seeds": len(values),
                "seed_values": tuple(values),
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "min": min(values),
                "max": max(values),
                "mean_best_epoch": float(np.mean(best_steps)) if best_steps else math.nan,
                "refit_epochs": _refit_epochs(seeds, sign),
            }
        )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table["refit_epochs"] = table["refit_epochs"].astype("Int64")
    table["n_seeds"] = table["n_seeds"].astype(int)
    return _champion_order(table, direction)


def _champion_order(table: pd.DataFrame, direction: str) -> pd.DataFrame:
    # A single seed has no spread: it ranks as std 0 among ties on the mean (with r = 0 every
    # candidate has one seed, so ties fall through to the trial number).
    # Means equal to 12 decimals tie: mean(0.7, 0.8, 0.9) is 0.7999999999999999, not 0.8.
    key = pd.DataFrame(
        {
            "mean": (_sign(direction) * table["mean"]).round(12),
            "std": table["std"].fillna(0.0),
            "number": table["number"],
        }
    )
    order = key.sort_values(["mean", "std", "number"], kind="mergesort").index
    return table.loc[order].reset_index(drop=True)


def choose_champion(table: pd.DataFrame, direction: str = "maximize") -> int:
    """The champion's trial number: best mean (equal to 12 decimals is a tie); ties go to the lower
    std (a single seed counts as 0), then the lower trial number.

    Raises:
        ValueError: an empty table (no COMPLETE trial to choose from).
    """
    if table.empty:
        raise ValueError("no candidate to choose from: the study has no COMPLETE trial")
    return int(_champion_order(table, direction)["number"].iloc[0])
