"""The report's champion: chosen from the candidate table, refitted if asked, and its honest figures.

1. `choose`: the top `selection.top_k` COMPLETE originals by val (baselines included), each with
   its seed re-runs, in `selection.candidate_table`; the champion is the best mean
   (`selection.choose_champion`). With `reruns: 0` and the baselines off this is the best
   COMPLETE trial by value, ties to the lower number: the selection before re-runs.
2. `tested_model`: the model that goes to the sealed test split and the registry. Without
   `selection.refit`: the champion trial's checkpoint. With it: the champion's configuration
   retrained on train + val (`pipeline.training`), saved as `refit-trial-<n>.pt` and recorded in the
   study (`sweep_refit:<n>`: path and sha256), so a second report reuses the same file and
   therefore the same stored test evaluation instead of refitting and testing again.
3. `honest_figures`: test accuracy with its 95% Wilson interval and the val -> test gap, where
   val is the champion's mean val accuracy over seeds (what selection believed), never a test
   score of any other candidate.
The study records which model was tested under `sweep_tested`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from pipeline import models as M
from pipeline import training as TR
from pipeline.champion._comparison import checkpoint_path, require_complete
from pipeline.champion._confidence import TestFigures, sealed_test_figures
from pipeline.champion._evaluation import TestEvaluation, eval_preprocess, sealed_splits
from pipeline.config import StudyConfig, checkpoint_dir
from pipeline.models import TrialCheckpoint
from pipeline.search import TrialRecord, candidate_table, choose_champion

REFIT_ATTR = "sweep_refit"  # study user attr prefix: f"{REFIT_ATTR}:{trial}" -> {"path", "sha256", "epochs"}
TESTED_ATTR = "sweep_tested"  # study user attr: the model the sealed test split was read for


@dataclass(frozen=True)
class Choice:
    """The champion and the table it was chosen from (row 0 is the champion)."""

    selected: FrozenTrial
    table: pd.DataFrame  # selection.candidate_table columns
    val: float  # the champion's mean value of `study.metric` over its seeds
    refit_epochs: int | None  # epochs at which its mean val curve peaked; None for the probe


def choose(trials: Sequence[FrozenTrial], cfg: StudyConfig) -> Choice:
    """The champion among the top `selection.top_k` candidates by mean val over seeds.

    Raises:
        RegistryError: no COMPLETE trial (the message counts the trials by state).
    """
    direction = cfg.study.direction
    require_complete(trials, cfg.study.name)
    table = candidate_table(trials, cfg.selection.top_k, direction)
    number = choose_champion(table, direction)
    row = table.iloc[0]
    epochs = row["refit_epochs"]
    selected = next(t for t in trials if t.number == number)
    return Choice(selected, table, float(row["mean"]), None if pd.isna(epochs) else int(epochs))


def tested_model(study: optuna.Study, cfg: StudyConfig, choice: Choice) -> tuple[TrialCheckpoint, Path, str, bool]:
    """The checkpoint to test once and register: `(checkpoint, path, sha256, refitted)`.

    Raises:
        RegistryError: the champion's checkpoint is missing or unreadable.
        DataError: the image folders cannot be read (refit only).
    """
    selected = choice.selected
    path = checkpoint_path(selected, cfg.study.name)
    original = TrialCheckpoint.load(path)
    if not cfg.selection.refit:
        return original, path, M.sha256(path), False
    key = f"{REFIT_ATTR}:{selected.number}"
    record = study.user_attrs.get(key)
    if record and Path(record["path"]).is_file() and M.sha256(Path(record["path"])) == record["sha256"]:
        return TrialCheckpoint.load(Path(record["path"])), Path(record["path"]), record["sha256"], True
    refitted, epochs = _refit(cfg, selected, original, choice.refit_epochs)
    out = refitted.save(checkpoint_dir(cfg.study.name) / f"refit-trial-{selected.number}.pt")
    sha = M.sha256(out)
    study.set_user_attr(key, {"path": str(out), "sha256": sha, "epochs": epochs})
    return refitted, out, sha, True


def _refit(
    cfg: StudyConfig, selected: FrozenTrial, original: TrialCheckpoint, refit_epochs: int | None
) -> tuple[TrialCheckpoint, int]:
    d = cfg.data
    spec = M.resolve_weights(cfg.model.arch, cfg.model.weights)
    source = TR.Source(sealed_splits(cfg), spec, M.pretrained_state(spec), eval_preprocess(original))
    seed = d.seed + selected.number
    if TrialRecord.from_frozen(selected).is_probe:
        state, epochs = TR.refit_probe(cfg, source, seed), 1
    else:
        run = cfg.with_params(dict(selected.params))
        epochs = refit_epochs or run.training.epochs
        state = TR.refit_trial(run, source, epochs, seed)
    # The refitted weights stand in for the original's: everything else it records holds.
    return dataclasses.replace(original, state_dict=state, best_epoch=epochs - 1), epochs


def record_tested(study: optuna.Study, selected: FrozenTrial, path: Path, sha256: str, refitted: bool) -> None:
    """Record in the study which model the sealed test split was read for."""
    record = {"trial": selected.number, "refit": refitted, "checkpoint": str(path), "sha256": sha256}
    if study.user_attrs.get(TESTED_ATTR) != record:
        study.set_user_attr(TESTED_ATTR, record)


def honest_figures(cfg: StudyConfig, choice: Choice, test: TestEvaluation) -> TestFigures:
    """Test accuracy with its 95% Wilson interval; the gap against the champion's mean val
    accuracy (None when the study's metric is val_loss)."""
    correct = sum(row[i] for i, row in enumerate(test.confusion))
    val = choice.val if cfg.study.metric == "val_accuracy" else None
    return sealed_test_figures(int(correct), test.n_images, val)


def metadata(choice: Choice, figures: TestFigures, refitted: bool) -> dict[str, Any]:
    """The selection's figures for the registered model's metadata (plain JSON values)."""
    return {
        "selection": {
            "champion": choice.selected.number,
            "baseline": TrialRecord.from_frozen(choice.selected).baseline or "",
            "val_mean": choice.val,
            "refit": refitted,
            "candidates": candidate_records(choice.table),
        },
        "test": figures.to_record(),
    }


def candidate_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The candidate table as JSON-ready rows (no test figures: only the champion is tested)."""
    rows = []
    for r in table.to_dict("records"):
        rows.append(
            {
                "number": int(r["number"]),
                "kind": r["kind"],
                "baseline": r["baseline"],
                "params": r["params"],
                "n_seeds": int(r["n_seeds"]),
                "seed_values": [float(v) for v in r["seed_values"]],
                "mean": float(r["mean"]),
                "std": None if math.isnan(r["std"]) else float(r["std"]),
                "refit_epochs": None if pd.isna(r["refit_epochs"]) else int(r["refit_epochs"]),
            }
        )
    return rows
