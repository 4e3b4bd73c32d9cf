"""The study file as a validated, frozen tree (`load_study` -> `StudyConfig`): YAML text,
`--set` overrides, the section types and the search space's distributions, every bad value named
with its path; and where a study's stores live (`home`, `storage_url`, `tracking_uri`, checkpoints).
"""

from pipeline.config._config import (
    METRICS,
    PreprocessConfig,
    StudyConfig,
    TrainingSection,
    best_index,
    load_study,
    score_sign,
)
from pipeline.config._space import TUNABLE, CategoricalParam, FloatParam, IntParam
from pipeline.config._stores import (
    artifact_root,
    check_local_paths,
    check_writable,
    checkpoint_dir,
    damaged_schema,
    experiment_artifacts,
    home,
    resolve_tracking,
    sqlite_path,
    storage_url,
    store_lock,
    tracking_uri,
)

__all__ = [
    "CategoricalParam",
    "FloatParam",
    "IntParam",
    "PreprocessConfig",
    "StudyConfig",
    "TUNABLE",
    "TrainingSection",
    "artifact_root",
    "check_local_paths",
    "check_writable",
    "checkpoint_dir",
    "damaged_schema",
    "experiment_artifacts",
    "home",
    "load_study",
    "best_index",
    "score_sign",
    "METRICS",
    "resolve_tracking",
    "sqlite_path",
    "storage_url",
    "store_lock",
    "tracking_uri",
]
