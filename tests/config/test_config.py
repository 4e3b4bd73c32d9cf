"""The study file: the shipped examples validate, `--set` overrides, and every bad value gives one
ConfigError whose exact text names the file, the dotted key path, the reason and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import TUNABLE, FloatParam, IntParam, StudyConfig, load_study
from pipeline.config._studyfile import apply_override
from pipeline.core import ConfigError

from conftest import REPO, study_dict, write_study

TUNABLE_LIST = (
    "aug_strength, batch_size, epochs, freeze_depth, gamma, head_lr_mult, label_smoothing, lr, "
    "momentum, nesterov, optimizer, step_size, weight_decay"
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A valid tiny study file (the data folder need not exist: config does not read it)."""
    return write_study(tmp_path / "study.yaml", study_dict(tmp_path / "images"))


def error(path: Path, overrides=(), text: str | None = None) -> str:
    """The ConfigError message for `path` (rewritten with `text` first, if given), with the
    `overrides` written into the file: these tests are about values in a study file."""
    if text is not None:
        path.write_text(text)
    if overrides:
        tree = yaml.safe_load(path.read_text())
        for item in overrides:
            apply_override(tree, item, path, {})
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return set_error(path)


def set_error(path: Path, overrides=()) -> str:
    """The ConfigError message for `path` loaded with `--set` `overrides`."""
    with pytest.raises(ConfigError) as info:
        load_study(path, overrides)
    return str(info.value)


# ---- the shipped examples ---------------------------------------------------------------------


def test_example_study_validates():
    cfg = load_study(REPO / "studies" / "hymenoptera.yaml")
    assert cfg.study.name == "hymenoptera-resnet18"
    assert (cfg.study.n_trials, cfg.study.sampler.type, cfg.study.pruner.type) == (12, "tpe", "median")
    assert cfg.data.root == Path("data/hymenoptera_data")
    assert (cfg.data.test, cfg.data.test_fraction, cfg.data.image_size) == (None, 0.5, 224)
    assert (cfg.model.arch, cfg.model.weights) == ("resnet18", "IMAGENET1K_V1")
    assert list(cfg.search_space) == ["lr", "momentum", "freeze_depth", "aug_strength"]
    assert cfg.search_space["lr"] == FloatParam(type="float", low=1e-4, high=0.1, log=True)
    assert cfg.search_space["freeze_depth"] == IntParam(type="int", low=0, high=5)
    assert cfg.experiment_name == "hymenoptera"


def test_offline_example_study_validates():
    cfg = load_study(REPO / "studies" / "hymenoptera_offline.yaml")
    assert cfg.model.arch == "timm/efficientnet_lite0"
    assert cfg.model.weights == "weights/efficientnet_lite0_imagenet.pth"
    assert cfg.model.preprocess.mean == (0.5, 0.5, 0.5) and cfg.model.preprocess.std == (0.5, 0.5, 0.5)
    assert cfg.model.preprocess.resize is None  # the rest comes from the weights
    assert cfg.search_space["freeze_depth"].high == 8
    assert (cfg.training.scheduler.step_size, cfg.training.epochs) == (4, 6)
    assert (cfg.study.n_trials, cfg.data.image_size) == (12, 224)


def test_defaults_are_filled_in(path):
    cfg = load_study(path)
    assert cfg.training.optimizer == "sgd" and cfg.training.momentum == 0.9
    assert cfg.training.scheduler.type == "step" and cfg.training.scheduler.gamma == 0.1
    assert cfg.data.bad_images == "stop" and cfg.data.test_fraction == 0.5
    assert cfg.registry.serialization_format == "pickle"
    assert cfg.experiment_name == "tiny"  # no tracking.experiment: the study name


def test_to_yaml_round_trips(path, tmp_path):
    cfg = load_study(path)
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.to_yaml())
    assert load_study(again) == cfg


def test_config_is_frozen(path):
    cfg = load_study(path)
    with pytest.raises(Exception, match="frozen"):
        cfg.training.epochs = 5


# ---- --set overrides ------------------------------------------------------------------------------


def test_set_overrides_existing_keys(path):
    cfg = load_study(path, ["training.epochs=3", "training.lr=1e-3", "study.sampler.seed=null"])
    assert cfg.training.epochs == 3
    assert cfg.training.lr == 0.001  # '1e-3' is a float, not the YAML 1.1 string
    assert cfg.study.sampler.seed is None


def test_set_creates_new_nested_keys(path):
    cfg = load_study(
        path, ["training.scheduler.gamma=0.5", "model.preprocess.mean=[0.5, 0.5, 0.5]", "tracking.experiment=other"]
    )
    assert cfg.training.scheduler.gamma == 0.5
    assert cfg.model.preprocess.mean == (0.5, 0.5, 0.5)
    assert cfg.experiment_name == "other"


def test_set_adds_a_search_space_entry(path):
    cfg = load_study(path, ["search_space.optimizer={type: categorical, choices: [sgd, adamw]}"])
    assert cfg.search_space["optimizer"].choices == ("sgd", "adamw")


def test_set_without_equals_sign(path):
    assert set_error(path, ["foo"]) == ("--set 'foo': expected KEY.PATH=VALUE, e.g. --set training.epochs=3")


def test_set_with_empty_key(path):
    assert set_error(path, ["=3"]) == ("--set '=3': expected KEY.PATH=VALUE, e.g. --set training.epochs=3")


def test_set_below_a_scalar(path):
    assert set_error(path, ["training.epochs.x=3"]) == "--set training.epochs.x: 'epochs' is not a mapping"


def test_a_bad_set_is_blamed_on_the_set_not_on_the_study_file(path):
    """A user's report: `--set training.lr_rate=...` named the YAML file, which has no such key."""
    assert set_error(path, ["training.lr_rate=0.1"]).startswith(
        "--set training.lr_rate=0.1: training.lr_rate: unknown key (allowed: epochs, optimizer, lr,"
    )
    assert set_error(path, ["training.epochs=x", "training.lr=-1"]) == (
        f"{path}: 2 problem(s) in the study file and --set:\n"
        "  --set training.epochs=x: training.epochs: Input should be a valid integer (got 'x')\n"
        "  --set training.lr=-1: training.lr: Input should be greater than 0 (got -1)"
    )


def test_set_unknown_key_is_named(path):
    assert set_error(path, ["nope.x=3"]) == (
        "--set nope.x=3: nope: unknown key (allowed: study, data, model, training, search_space, tracking, "
        "registry, cache, selection)"
    )


# ---- unknown keys, types, ranges ------------------------------------------------------------------


def test_typo_in_key_names_path_allowed_keys_and_close_match(path):
    assert error(path, ["study.n_trail=3"]) == (
        f"{path}: study.n_trail: unknown key (allowed: name, direction, metric, n_trials, timeout, "
        "sampler, pruner, storage, heartbeat_interval, grace_period, max_retries, max_failed_trials); "
        "did you mean n_trials?"
    )


def test_unknown_key_inside_a_search_space_entry(path):
    assert error(path, ["search_space.lr.lo=1"]) == (
        f"{path}: search_space.lr.lo: unknown key (allowed: type, low, high, log, step); did you mean low?"
    )


def test_unknown_key_deep_in_a_section(path):
    assert error(path, ["study.sampler.sed=1"]) == (
        f"{path}: study.sampler.sed: unknown key (allowed: type, seed); did you mean seed?"
    )


def test_wrong_type(path):
    assert error(path, ["training.epochs=three"]) == (
        f"{path}: training.epochs: Input should be a valid integer (got 'three')"
    )


def test_section_that_is_not_a_mapping(path):
    assert error(path, ["training=3"]) == f"{path}: training: expected a mapping (key: value lines) (got 3)"


def test_several_problems_are_listed_together(path):
    assert error(path, ["training.epochs=0", "training.lr=-1"]) == (
        f"{path}: 2 problem(s) in the study file:\n"
        "  training.epochs: Input should be greater than or equal to 1 (got 0)\n"
        "  training.lr: Input should be greater than 0 (got -1)"
    )


def test_missing_required_section(path):
    tree = yaml.safe_load(path.read_text())
    del tree["model"]
    write_study(path, tree)
    assert error(path) == f"{path}: model: required key is missing"


def test_low_greater_than_high(path):
    assert error(path, ["search_space.lr.low=1"]) == (
        f"{path}: search_space.lr.low: 1.0 is greater than high (0.05); swap them"
    )


def test_int_low_greater_than_high(path):
    assert error(path, ["search_space.freeze_depth.low=3"]) == (
        f"{path}: search_space.freeze_depth.low: 3 is greater than high (2); swap them"
    )


def test_log_range_including_zero(path):
    assert error(path, ["search_space.lr.low=0"]) == (
        f"{path}: search_space.lr.low: a log range must be > 0, but low is 0.0; raise low or set log: false"
    )


def test_step_with_log(path):
    assert error(path, ["search_space.lr.step=0.01"]) == (
        f"{path}: search_space.lr.step: step cannot be combined with log: true"
    )


def test_search_space_entry_without_type(path):
    assert error(path, ["search_space.lr={low: 0.1, high: 0.2}"]) == (
        f"{path}: search_space.lr: missing 'type' (one of float, int, categorical)"
    )


def test_search_space_entry_with_bad_type(path):
    assert error(path, ["search_space.lr.type=floaty"]) == (
        f"{path}: search_space.lr: type must be one of float, int, categorical"
    )


def test_search_range_outside_the_field(path):
    # Caught before the study, not as a failed trial whenever the sampler draws > 1.
    assert error(path, ["search_space.momentum={type: float, low: 0.5, high: 1.5}"]) == (
        f"{path}: search_space.momentum.high: 1.5 is not a valid training.momentum: Input should be less than 1"
    )


def test_stepped_range_checks_the_reachable_high(path):
    # 0.5 + 2 * 0.2 = 0.9 is the largest value drawn; high 1.0 itself is never sampled.
    cfg = load_study(path, ["search_space.momentum={type: float, low: 0.5, high: 1.0, step: 0.2}"])
    assert cfg.search_space["momentum"].high == 1.0


def test_float_range_for_an_integer_field(path):
    assert error(path, ["search_space.freeze_depth={type: float, low: 0, high: 2}"]) == (
        f"{path}: search_space.freeze_depth.type: training.freeze_depth takes whole numbers; use type: int"
    )


def test_bad_categorical_choice(path):
    assert error(path, ["search_space.optimizer={type: categorical, choices: [sgd, lion]}"]) == (
        f"{path}: search_space.optimizer.choices: 'lion' is not a valid training.optimizer: "
        "Input should be 'sgd', 'adamw' or 'adam'"
    )


def test_search_range_into_a_nested_section(path):
    assert error(path, ["search_space.gamma={type: float, low: 0.1, high: 2}"]) == (
        f"{path}: search_space.gamma.high: 2.0 is not a valid training.scheduler.gamma: "
        "Input should be less than or equal to 1"
    )


# ---- closed sets --------------------------------------------------------------------------------


def test_unknown_arch_suggests_close_match(path):
    assert error(path, ["model.arch=resnet19"]) == (
        f"{path}: model.arch: unknown arch 'resnet19'; did you mean resnet18, resnet152, resnet101? "
        "(use a torchvision classification model from torchvision.models.list_models(), e.g. "
        "resnet18, efficientnet_b0, mobilenet_v3_large, or timm/NAME)"
    )


def test_unknown_timm_arch_suggests_close_match(path):
    assert error(path, ["model.arch=timm/efficientnet_lit0"]) == (
        f"{path}: model.arch: unknown arch 'timm/efficientnet_lit0': timm has no model "
        "'efficientnet_lit0'; did you mean timm/efficientnet_lite0, timm/efficientnet_lite4, "
        "timm/efficientnet_lite3? (see timm.list_models())"
    )


def test_timm_arch_with_tag_is_known(path):
    assert load_study(path, ["model.arch=timm/efficientnet_lite0.ra_in1k"]).model.arch == (
        "timm/efficientnet_lite0.ra_in1k"
    )


def test_unknown_sampler_lists_allowed(path):
    assert error(path, ["study.sampler.type=tpee"]) == (
        f"{path}: study.sampler.type: Input should be 'tpe', 'random', 'grid', 'cmaes' or 'qmc' (got 'tpee')"
    )


def test_unknown_pruner_lists_allowed(path):
    assert error(path, ["study.pruner.type=asha"]) == (
        f"{path}: study.pruner.type: Input should be 'median', 'percentile', 'successive_halving', "
        "'hyperband' or 'none' (got 'asha')"
    )


def test_unknown_search_space_name_lists_tunable_names(path):
    assert error(path, ["search_space.lrr={type: float, low: 0.1, high: 0.2}"]) == (
        f"{path}: search_space.lrr: unknown search-space parameter 'lrr' (tunable: {TUNABLE_LIST}); did you mean lr?"
    )


def test_several_unknown_search_space_names(path):
    assert error(path, ["search_space.foo={type: int, low: 1, high: 2}", "search_space.bar=1"]) == (
        f"{path}: search_space: unknown search-space parameters 'foo', 'bar' (tunable: {TUNABLE_LIST})"
    )


def test_tunable_names_all_land_in_a_real_field():
    for name, (section, key) in TUNABLE.items():
        model = StudyConfig
        for part in section.split("."):
            model = model.model_fields[part].annotation
        assert key in model.model_fields, name


def test_grid_sampler_needs_step_on_floats(path):
    assert error(path, ["study.sampler.type=grid"]) == (
        f"{path}: search_space.lr.step: the grid sampler (study.sampler.type: grid) needs a step on "
        "float parameters; add step or use another sampler"
    )


def test_grid_sampler_accepts_stepped_floats(path):
    cfg = load_study(
        path, ["study.sampler.type=grid", "search_space.lr={type: float, low: 0.01, high: 0.03, step: 0.01}"]
    )
    assert cfg.search_space["lr"].step == 0.01


def test_direction_must_fit_metric(path):
    assert error(path, ["study.direction=minimize"]) == (
        f"{path}: study.direction: 'minimize' does not fit metric 'val_accuracy' (use direction: maximize)"
    )


def test_val_loss_is_minimized(path):
    cfg = load_study(path, ["study.metric=val_loss", "study.direction=minimize"])
    assert (cfg.study.metric, cfg.study.direction) == ("val_loss", "minimize")


# ---- the file itself ----------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column(path):
    text = "study:\n  name: tiny\n   n_trials: 3\n"
    assert error(path, text=text) == (
        f"{path}: YAML syntax error at line 3, column 12: mapping values are not allowed here"
    )


def test_unclosed_bracket_says_where_it_opened(path):
    assert error(path, text="study:\n  name: [a\n") == (
        f"{path}: YAML syntax error at line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 2, column 9)"
    )


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_study(missing)
    assert str(info.value) == f"{missing}: study file not found (give the path to a .yaml study file)"


def test_empty_file(path):
    assert error(path, text="") == (f"{path}: the top level must be a mapping with keys study, data, model, ...")


def test_config_error_exit_code():
    assert ConfigError.exit_code == 2


# ---- with_params --------------------------------------------------------------------------------


def test_with_params_places_values_in_their_sections(path):
    cfg = load_study(path)
    out = cfg.with_params(
        {
            "batch_size": 4,
            "lr": 0.02,
            "momentum": 0.5,
            "step_size": 2,
            "gamma": 0.5,
            "freeze_depth": 2,
            "aug_strength": 0.25,
            "optimizer": "adamw",
        }
    )
    assert out.data.batch_size == 4
    assert (out.training.lr, out.training.momentum, out.training.freeze_depth) == (0.02, 0.5, 2)
    assert (out.training.scheduler.step_size, out.training.scheduler.gamma) == (2, 0.5)
    assert (out.training.aug_strength, out.training.optimizer) == (0.25, "adamw")
    # Untouched: the original and the fields not sampled.
    assert cfg.data.batch_size == 8 and cfg.training.lr == 0.01
    assert out.data.image_size == 32 and out.study == cfg.study
    assert out.search_space == cfg.search_space


def test_with_params_invalid_value_names_file_and_key(path):
    cfg = load_study(path)
    with pytest.raises(ConfigError) as info:
        cfg.with_params({"batch_size": 0})
    assert str(info.value) == (
        f"{path} (trial parameters batch_size=0): data.batch_size: Input should be greater than or equal to 1 (got 0)"
    )


def test_with_params_twice_keeps_naming_the_file(path):
    cfg = load_study(path).with_params({"lr": 0.02})
    with pytest.raises(ConfigError, match=rf"^{path} \(trial parameters epochs=0\): training.epochs"):
        cfg.with_params({"epochs": 0})


# ---- duplicate keys -------------------------------------------------------------------------------

DUPLICATED = """\
study: {name: tiny, n_trials: 2}
data: {root: images, batch_size: 8}
model: {arch: resnet18, weights: none}
training:
  epochs: 1
search_space:
  lr: {type: float, low: 0.001, high: 0.05, log: true}
  freeze_depth: {type: int, low: 0, high: 2}
  lr: {type: float, low: 0.1, high: 0.5}
training:
  lr: 0.01
"""


def test_duplicate_keys_are_named_with_both_lines(path):
    # The users' input: a second `training:` block appended, a stale second `lr:` in the space.
    assert error(path, text=DUPLICATED) == (
        f"{path}: 2 duplicate keys:\n"
        "  search_space.lr: duplicate key (lines 7 and 9); YAML would keep only the last one: merge "
        "them or delete one\n"
        "  training: duplicate key (lines 4 and 10); YAML would keep only the last one: merge them or "
        "delete one"
    )


def test_one_duplicate_key_deep_in_a_section(path):
    text = "study:\n  name: tiny\n  sampler:\n    type: tpe\n    seed: 1\n    seed: 2\n"
    assert error(path, text=text) == (
        f"{path}: study.sampler.seed: duplicate key (lines 5 and 6); YAML would keep only the last "
        "one: merge them or delete one"
    )


def test_duplicate_key_inside_a_set_value(path):
    assert set_error(path, ["search_space.lr={type: float, low: 0.1, low: 0.2, high: 0.3}"]) == (
        "--set search_space.lr: low: duplicate key (lines 1 and 1); YAML would keep only "
        "the last one: merge them or delete one"
    )


def test_yaml_merge_keys_are_not_duplicates(path):
    tree = yaml.safe_load(path.read_text())
    del tree["training"]
    text = yaml.safe_dump(tree, sort_keys=False) + "training:\n  <<: {epochs: 3, lr: 0.1}\n  lr: 0.02\n"
    path.write_text(text)
    cfg = load_study(path)
    assert (cfg.training.epochs, cfg.training.lr) == (3, 0.02)


# ---- every distribution built as Optuna builds it ----------------------------------------------


def test_int_log_range_with_a_step_is_refused_as_optuna_would(path):
    assert error(path, ["search_space.batch_size={type: int, low: 8, high: 64, log: true, step: 8}"]) == (
        f"{path}: search_space.batch_size: Optuna cannot sample this distribution: Samplers and other "
        "components in Optuna only accept step is 1 when `log` argument is True."
    )


def test_each_parameter_is_the_optuna_distribution_the_sampler_uses(path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    cfg = load_study(
        path,
        [
            "search_space.optimizer={type: categorical, choices: [sgd, adam]}",
            "search_space.step_size={type: int, low: 1, high: 10, step: 4}",
        ],
    )
    space = cfg.search_space
    assert space["lr"].distribution() == FloatDistribution(0.001, 0.05, log=True)
    assert space["freeze_depth"].distribution() == IntDistribution(0, 2)
    assert space["optimizer"].distribution() == CategoricalDistribution(("sgd", "adam"))
    with pytest.warns(UserWarning, match=r"It will be replaced with \[1, 9\]"):  # Optuna's rounding
        assert space["step_size"].distribution() == IntDistribution(1, 9, step=4)


def test_validation_does_not_leak_optunas_rounding_warning(path, recwarn):
    load_study(path, ["search_space.step_size={type: int, low: 1, high: 10, step: 4}"])
    assert [str(w.message) for w in recwarn] == []


# ---- registry names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, why",
    [
        (
            "team/classifier",
            (
                "'team/classifier' contains '/': MLflow registered model names cannot contain "
                "'/', ':' or '%' ('?' breaks models:/ URIs); use e.g. 'team-classifier'"
            ),
        ),
        (
            "ants:bees",
            (
                "'ants:bees' contains ':': MLflow registered model names cannot contain '/', ':' or "
                "'%' ('?' breaks models:/ URIs); use e.g. 'ants-bees'"
            ),
        ),
        ("..hidden", ("'..hidden': MLflow treats model names as paths and refuses '.' and names starting with '..'")),
        ("  ", "a registered model name cannot be blank (got '  ')"),
    ],
)
def test_registry_model_names_mlflow_refuses(path, name, why):
    assert error(path, [f"registry.model_name='{name}'"]) == f"{path}: registry.model_name: {why}"


@pytest.mark.parametrize(
    "alias, why",
    [
        (
            "latest",
            (
                "'latest' is reserved by MLflow (models:/NAME@latest always means the newest version); "
                "choose another alias, e.g. champion"
            ),
        ),
        (
            "Latest",
            (
                "'Latest' is reserved by MLflow (models:/NAME@latest always means the newest version); "
                "choose another alias, e.g. champion"
            ),
        ),
        (
            "v2",
            (
                "'v2' is reserved by MLflow for version aliases (models:/NAME@v2 means version 2); choose "
                "another alias, e.g. champion"
            ),
        ),
        (
            "V10",
            (
                "'V10' is reserved by MLflow for version aliases (models:/NAME@V10 means version 10); "
                "choose another alias, e.g. champion"
            ),
        ),
        (
            "best model",
            ("'best model': an MLflow alias may only contain letters, digits, underscores (_) and dashes (-)"),
        ),
    ],
)
def test_registry_aliases_mlflow_reserves_or_refuses(path, alias, why):
    assert error(path, [f"registry.alias='{alias}'"]) == f"{path}: registry.alias: {why}"


def test_registry_rules_match_what_the_mlflow_store_does(tmp_path):
    # Our up-front rules against MLflow's own store: every name refused here is refused there
    # ('%' and '?' are refused on top: MLflow's file store and models:/ URIs), the rest accepted.
    from mlflow.tracking import MlflowClient

    from pipeline.config._config import alias_problem, model_name_problem

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("a/b", "a:b", "..x", ".", " ", "ok-name", "naïve model", "a.b", "2024"):
        try:
            client.create_registered_model(name)
            accepted = True
        except Exception:  # noqa: BLE001  MlflowException: refused
            accepted = False
        assert accepted == (model_name_problem(name) is None), name
    client.create_model_version("ok-name", (tmp_path / "m").as_uri())
    for alias in ("latest", "LATEST", "v2", "V3", "a b", "a.b", "x" * 256, "champion", "-x", "1st", "v2b"):
        try:
            client.set_registered_model_alias("ok-name", alias, "1")
            accepted = True
        except Exception:  # noqa: BLE001  MlflowException: refused
            accepted = False
        assert accepted == (alias_problem(alias) is None), alias


# ---- strict types and YAML 1.1 words ------------------------------------------------------------


def test_a_boolean_count_is_not_one(path):
    tree = yaml.safe_load(path.read_text())
    text = yaml.safe_dump(tree, sort_keys=False).replace("n_trials: 2", "n_trials: true")
    assert error(path, text=text) == (
        f"{path}: study.n_trials: Input should be a valid integer (got True: YAML read the unquoted true as a boolean)"
    )


def test_yaml_boolean_where_a_name_belongs_says_so_and_suggests_quotes(path):
    # The users' input: `pruner: {type: off}`.
    text = path.read_text().replace("pruner:\n    type: none", "pruner: {type: off}")
    assert "type: off" in text
    assert error(path, text=text) == (
        f"{path}: study.pruner.type: Input should be 'median', 'percentile', 'successive_halving', "
        "'hyperband' or 'none' (got False: YAML read the unquoted off as a boolean; write it in quotes "
        "('off') for the text)"
    )


def test_yaml_number_where_a_name_belongs(path):
    assert error(path, ["study.name=2024"]) == (
        f"{path}: study.name: Input should be a valid string (got 2024: YAML read the unquoted 2024 as "
        "a number; write it in quotes ('2024') for the text)"
    )


def test_quoted_number_where_a_count_belongs(path):
    assert error(path, ["training.epochs='3'"]) == (
        f"{path}: training.epochs: Input should be a valid integer (got '3': quoted, it is text; remove the quotes)"
    )


def test_yaml_boolean_in_a_set_value_is_named_too(path):
    assert set_error(path, ["data.bad_images=no"]) == (
        "--set data.bad_images=no: data.bad_images: Input should be 'stop' or 'skip' (got False: YAML read "
        "the unquoted no as a boolean; write it in quotes ('no') for the text)"
    )


def test_whole_numbers_still_fill_float_fields(path):
    cfg = load_study(path, ["training.lr=1", "search_space.momentum={type: float, low: 0, high: 0.5}"])
    assert cfg.training.lr == 1.0 and cfg.search_space["momentum"].low == 0.0


# ---- batches of one image and BatchNorm ---------------------------------------------------------


def test_batch_size_one_is_refused_for_a_batchnorm_arch(path):
    assert error(path, ["data.batch_size=1"]) == (
        f"{path}: data.batch_size: a train batch of 1 image cannot train resnet18: its BatchNorm "
        "layers need at least 2 images per batch; use 2 or more"
    )


def test_batch_size_one_in_the_search_space_is_refused(path):
    assert error(path, ["search_space.batch_size={type: int, low: 1, high: 8}"]) == (
        f"{path}: search_space.batch_size.low: a train batch of 1 image cannot train resnet18: its "
        "BatchNorm layers need at least 2 images per batch; use 2 or more"
    )
    assert error(path, ["search_space.batch_size={type: categorical, choices: [4, 1]}"]).startswith(
        f"{path}: search_space.batch_size.choices: a train batch of 1 image cannot train resnet18"
    )


@pytest.mark.parametrize(
    "arch, refused", [("vit_b_16", False), ("regnet_x_400mf", True), ("timm/efficientnet_lite0", True)]
)
def test_batch_size_one_depends_on_batchnorm(path, arch, refused):
    overrides = [f"model.arch={arch}", "data.batch_size=1"]
    if refused:
        assert error(path, overrides).startswith(f"{path}: data.batch_size: a train batch of 1 image")
    else:
        assert load_study(path, overrides).data.batch_size == 1


def test_config_does_not_import_the_model_module(path):
    import subprocess
    import sys

    code = (
        "import sys; from pipeline.config import load_study; "
        f"load_study({str(path)!r}, ['data.batch_size=1', 'model.arch=vit_b_16']); "
        "print('pipeline.models' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout.strip() == "False", result.stderr
