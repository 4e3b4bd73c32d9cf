"""The study file as a validated, frozen tree.

`load_study(path, overrides)` reads YAML, applies `--set key.path=value` overrides, and validates
everything before anything runs. Every problem is reported as one `ConfigError` naming the file,
the dotted key path, the reason and, where there is a closed set, the allowed values.

Relative paths in the file (`data.root`, `model.weights`, `study.storage`) are resolved against the
current working directory, the way `make run` and the CLI are used from the project root.

Checked before anything runs, so a bad file never leaves a stored study or a failed trial:
- duplicate keys (YAML would keep the last silently), with the key path and both lines;
- types are strict: `n_trials: true` is not 1; a YAML 1.1 boolean or number where text belongs
  (`pruner: {type: off}`) is named as such, with the hint to quote it;
- every search-space entry is built as the Optuna distribution the sampler will use;
- `registry.model_name` and `registry.alias` follow MLflow's registry rules (no '/', ':' in names;
  `latest` and `v<digits>` are reserved aliases);
- `model.arch` is a torchvision classification model or `timm/NAME`, and a batch of one image is
  refused for architectures with BatchNorm.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config._rules import alias_problem, check_arch, has_batch_norm, model_name_problem
from pipeline.config._schema import Bool, Float, Frozen, Int, Str, fail
from pipeline.config._settings import CacheSection, SelectionSection
from pipeline.config._space import (
    TUNABLE,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    PrunerConfig,
    SamplerConfig,
    reachable_high,
)
from pipeline.config._studyfile import Words, apply_override, describe, error_key, override_behind, parse, where
from pipeline.core import ConfigError

METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}  # each metric's only sane direction


def score_sign(direction: str) -> float:
    """+1.0 for "maximize", -1.0 for "minimize": `score_sign(d) * value` is larger the better the
    value, so one rule ranks in either direction (the larger score wins; ties go to the earlier
    epoch or the lower trial number, wherever sweep ranks).

    Raises:
        ValueError: any other direction.
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    return 1.0 if direction == "maximize" else -1.0


def best_index(values: Sequence[float], direction: str) -> int:
    """Index of the best of `values` in `direction`; ties go to the earliest.

    Raises:
        ValueError: `values` is empty, or an unknown direction.
    """
    if not values:
        raise ValueError("no values to choose the best of")
    sign = score_sign(direction)
    return max(range(len(values)), key=lambda i: (sign * values[i], -i))


class StudySection(Frozen):
    name: Str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    n_trials: Int = Field(10, ge=1)
    timeout: Float | None = Field(None, gt=0, description="seconds")
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    storage: Str | None = None
    heartbeat_interval: Int = Field(30, ge=1, description="seconds between trial heartbeats")
    grace_period: Int | None = Field(None, ge=1, description="seconds before a silent trial is stale")
    max_retries: Int = Field(2, ge=0, description="re-runs of a trial that died (kill -9, SIGTERM)")
    max_failed_trials: Int = Field(5, ge=1, description="stop the study after this many FAIL trials")

    @model_validator(mode="after")
    def _direction_fits_metric(self) -> StudySection:
        if METRICS[self.metric] != self.direction:
            raise fail(
                "direction",
                f"'{self.direction}' does not fit metric '{self.metric}' (use direction: {METRICS[self.metric]})",
            )
        return self


class DataSection(Frozen):
    root: Path
    train: Str = "train"
    val: Str | None = Field("val", description="val folder; null = a stratified val_fraction of train")
    test: Str | None = None
    test_fraction: Float = Field(0.5, gt=0, lt=1, description="share of val sealed as test when test is null")
    val_fraction: Float = Field(0.2, gt=0, lt=1, description="share of train held out as val when val is null")
    image_size: Int | None = Field(None, ge=16, description="crop side in pixels; null = weights'")
    batch_size: Int = Field(32, ge=1)
    num_workers: Int = Field(2, ge=0)
    seed: Int = 0
    bad_images: Literal["stop", "skip"] = "stop"


class PreprocessConfig(Frozen):
    """Eval preprocessing; each null field falls back to the weights' own metadata."""

    resize: Int | None = Field(None, ge=16)
    crop: Int | None = Field(None, ge=16)
    mean: tuple[Float, Float, Float] | None = None
    std: tuple[Float, Float, Float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None


class ModelSection(Frozen):
    arch: Str
    weights: Str = "DEFAULT"
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        check_arch(arch)
        return arch


class SchedulerConfig(Frozen):
    type: Literal["step", "cosine", "none"] = "step"
    step_size: Int = Field(7, ge=1, description="epochs")
    gamma: Float = Field(0.1, gt=0, le=1)


class TrainingSection(Frozen):
    epochs: Int = Field(8, ge=1)
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: Float = Field(1e-3, gt=0)
    head_lr_mult: Float = Field(1.0, gt=0, description="the new head's lr = lr x this")
    momentum: Float = Field(0.9, ge=0, lt=1)
    nesterov: Bool = False
    weight_decay: Float = Field(0.0, ge=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    freeze_depth: Int = Field(0, ge=0)
    aug_strength: Float = Field(1.0, ge=0, le=1)
    scheduler: SchedulerConfig = SchedulerConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Bool = False
    channels_last: Bool = False


class TrackingSection(Frozen):
    uri: Str | None = None
    experiment: Str | None = Field(None, description="MLflow experiment; null = study name")


class RegistrySection(Frozen):
    model_name: Str = "sweep-classifier"
    alias: Str = "champion"
    keep_top_k: Int = Field(1, ge=0, description="trial checkpoints kept after the report")
    serialization_format: Literal["pickle", "pt2"] = "pickle"

    @field_validator("model_name")
    @classmethod
    def _mlflow_name(cls, name: str) -> str:
        problem = model_name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @field_validator("alias")
    @classmethod
    def _mlflow_alias(cls, alias: str) -> str:
        problem = alias_problem(alias)
        if problem:
            raise ValueError(problem)
        return alias


class StudyConfig(Frozen):
    """The whole study file. Sections mirror the YAML top-level keys."""

    study: StudySection
    data: DataSection
    model: ModelSection
    training: TrainingSection = TrainingSection()
    search_space: dict[str, Param] = Field(default_factory=dict)
    tracking: TrackingSection = TrackingSection()
    registry: RegistrySection = RegistrySection()
    cache: CacheSection = CacheSection()
    selection: SelectionSection = SelectionSection()

    _source: str = PrivateAttr(default="<study>")  # the study file, named in with_params errors

    def __eq__(self, other: object) -> bool:
        # The same settings are the same study, whichever file they were read from.
        if not isinstance(other, StudyConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    @field_validator("search_space", mode="before")
    @classmethod
    def _tunable_names(cls, space: Any) -> Any:
        # Checked before the entries themselves: an unknown name is the problem to report.
        if not isinstance(space, dict):
            return space  # pydantic reports the type error
        unknown = [str(n) for n in space if n not in TUNABLE]
        if unknown:
            close = difflib.get_close_matches(unknown[0], TUNABLE, n=1)
            hint = f"; did you mean {close[0]}?" if close and len(unknown) == 1 else ""
            raise fail(
                unknown[0] if len(unknown) == 1 else "",
                f"unknown search-space parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(n) for n in unknown)} (tunable: {', '.join(sorted(TUNABLE))}){hint}",
            )
        return space

    @model_validator(mode="after")
    def _grid_needs_discrete_space(self) -> StudyConfig:
        if self.study.sampler.type == "grid":
            for name, p in self.search_space.items():
                if isinstance(p, FloatParam) and p.step is None:
                    raise fail(
                        f"search_space.{name}.step",
                        "the grid sampler (study.sampler.type: grid) needs a step on float "
                        "parameters; add step or use another sampler",
                    )
        return self

    @model_validator(mode="after")
    def _batches_of_two(self) -> StudyConfig:
        """BatchNorm computes statistics over each train batch: one image per batch fails outright
        wherever a feature map is 1x1 and otherwise trains on single-image statistics."""
        p = self.search_space.get("batch_size")
        if isinstance(p, IntParam):
            at = "search_space.batch_size.low" if p.low == 1 else None
        elif isinstance(p, CategoricalParam):
            one = any(c == 1 and not isinstance(c, bool) for c in p.choices)
            at = "search_space.batch_size.choices" if one else None
        else:
            at = "data.batch_size" if self.data.batch_size == 1 else None
        if at and has_batch_norm(self.model.arch):
            raise fail(
                at,
                f"a train batch of 1 image cannot train {self.model.arch}: its BatchNorm "
                "layers need at least 2 images per batch; use 2 or more",
            )
        return self

    @model_validator(mode="after")
    def _space_fits_fields(self) -> StudyConfig:
        """Every value the sampler can draw must be valid where it lands, so a bad range fails
        here, before the study, and not in every trial (e.g. momentum high 1.5, float freeze_depth)."""
        for name, p in self.search_space.items():
            section, key = TUNABLE[name]
            node: Any = self
            for part in section.split("."):
                node = getattr(node, part)
            target = f"{section}.{key}"
            annotation = type(node).model_fields[key].annotation
            if isinstance(p, FloatParam) and annotation is int:
                raise fail(f"search_space.{name}.type", f"{target} takes whole numbers; use type: int")
            if isinstance(p, CategoricalParam):
                values = [("choices", v) for v in p.choices]
            else:
                values = [("low", p.low), ("high", reachable_high(p))]
            for at, value in values:
                try:
                    type(node).model_validate({**node.model_dump(), key: value})
                except ValidationError as err:
                    why = next((e["msg"] for e in err.errors() if e["loc"][:1] == (key,)), err.errors()[0]["msg"])
                    raise fail(f"search_space.{name}.{at}", f"{value!r} is not a valid {target}: {why}") from None
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name

    def with_params(self, params: dict[str, Any]) -> StudyConfig:
        """Return a copy with sampled search-space values placed into their sections.

        Raises:
            ConfigError: a sampled value is invalid for its field (e.g. batch_size 0).
        """
        tree = self.model_dump(mode="python")
        for name, value in params.items():
            section, key = TUNABLE[name]
            node = tree
            for part in section.split("."):
                node = node[part]
            node[key] = value
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        cfg = _validate(tree, source=f"{self._source} (trial parameters {shown})")
        cfg._source = self._source
        return cfg

    def to_yaml(self) -> str:
        """The resolved study (defaults filled in), as stored with every parent run."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read, override and validate a study file.

    Args:
        path: YAML study file.
        overrides: `key.path=value` strings; values are parsed as YAML (`3`, `0.1`, `null`, `[a, b]`).

    Raises:
        ConfigError: missing file, YAML syntax error (with line and column), bad override,
            or a schema violation; the message names the file and the key path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found (give the path to a .yaml study file)")
    try:
        tree, words = parse(path.read_text(encoding="utf-8"), path)
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error at {where(err)}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read as YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys study, data, model, ...")
    for item in overrides:
        apply_override(tree, item, path, words)
    return _validate(tree, source=str(path), words=words, overrides=overrides)


def _validate(
    tree: dict, source: str, words: Words | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> StudyConfig:
    """A value a `--set` gave is blamed on that `--set`, not on the file that does not hold it."""
    try:
        cfg = StudyConfig.model_validate(tree)
        cfg._source = source
        return cfg
    except ValidationError as err:
        errors = err.errors()
        origins = [override_behind(error_key(e), overrides) for e in errors]
        lines = [
            f"--set {o}: {describe(e, words or {}, _allowed_keys)}" if o else describe(e, words or {}, _allowed_keys)
            for e, o in zip(errors, origins, strict=True)
        ]
        if len(lines) == 1:
            raise ConfigError(lines[0] if origins[0] else f"{source}: {lines[0]}") from None
        head = f"{source}: {len(lines)} problem(s) in the study file" + (" and --set" if any(origins) else "")
        raise ConfigError(f"{head}:\n  " + "\n  ".join(lines)) from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = StudyConfig
    parts = list(loc)
    if parts[:1] == ["search_space"]:
        tags: dict[str, type[Frozen]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}
        return list(tags[parts[2]].model_fields) if len(parts) == 3 and parts[2] in tags else []
    for part in parts:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        model = fields[part].annotation
    return list(getattr(model, "model_fields", {}))
