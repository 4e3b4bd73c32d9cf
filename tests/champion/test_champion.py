"""Baselines, seed re-runs, champion selection, refit and honest figures (issue 8).

One tiny study (ResNet-18 from scratch, 32 px, 1 epoch, 2 trials) with both baselines, one re-run
per top-2 candidate and refit on; reported twice while every loader the report builds is recorded.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline import data as D
from pipeline.champion import choose, trials_frame
from pipeline.champion._champion import TESTED_ATTR
from pipeline.champion._comparison import ranked_complete
from pipeline.config import load_study, storage_url, tracking_uri
from pipeline.models import _model as M
from pipeline.search import TrialRecord
from pipeline.search._selection import rerun_plan
from pipeline.search._stopping import counted
from pipeline.stages import _report as R
from pipeline.stages import run_study
from pipeline.training._refit import refit_samples
from pipeline.training._train import build_training

from conftest import make_folder, study_dict, write_study

SELECTION = {"baselines": {"linear_probe": True, "seed_recipe": True}, "top_k": 2, "reruns": 1, "refit": True}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("champion")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWEEP_HOME", str(tmp / "mlruns"))
        images = make_folder(tmp / "images", {"train": 6, "val": 6})
        tree = study_dict(images, selection=SELECTION, training={"epochs": 1, "lr": 0.01})
        tree["search_space"]["momentum"] = {"type": "float", "low": 0.5, "high": 0.95}
        cfg = load_study(write_study(tmp / "study.yaml", tree))
        outcome = run_study(cfg)
        loads: list[list] = []

        def recording(real, samples_at):
            def record(*args, **kwargs):
                loads.append(list(args[samples_at]))
                return real(*args, **kwargs)

            return record

        # Every image set the report reads: loaders (the test pass, the probe's refit) and the
        # image lists a fit builds (a trial's refit through `fit_config`).
        reals = {name: getattr(D, name) for name in ("make_loader", "ImageList", "CachedImageList")}
        for name, real in reals.items():
            mp.setattr(D, name, recording(real, 1))
        first = R.run_report(cfg, out=tmp / "report")
        first_loads = list(loads)
        second = R.run_report(cfg, out=tmp / "report")
        for name, real in reals.items():
            mp.setattr(D, name, real)
        from pipeline.champion._evaluation import sealed_splits

        yield SimpleNamespace(
            cfg=cfg,
            outcome=outcome,
            first=first,
            second=second,
            loads=loads,
            first_loads=first_loads,
            splits=sealed_splits(cfg),
            tmp=tmp,
            study=optuna.load_study(study_name=cfg.study.name, storage=storage_url(cfg)),
        )


def _role(t):
    return t.user_attrs.get("baseline") or ("rerun" if t.user_attrs.get("rerun_of") is not None else "search")


def test_baselines_are_trials_and_candidates(done):
    trials = done.study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    seed, probe = trials[0], [t for t in trials if t.user_attrs.get("baseline") == "linear_probe"]
    assert seed.user_attrs["baseline"] == "seed_recipe"
    assert seed.params == {"lr": 0.001, "freeze_depth": 0, "momentum": 0.9}
    assert len(probe) == 1 and probe[0].params == {} and probe[0].intermediate_values == {}
    # its one epoch in the record every trial stores (val figures kept to 6 significant digits)
    assert probe[0].value == pytest.approx(probe[0].user_attrs["epoch_00"]["val_acc"], rel=1e-5)
    assert "history" not in probe[0].user_attrs
    assert probe[0].user_attrs["checkpoint"].endswith(".pt")
    # Candidates are the top 2 COMPLETE originals, baselines included.
    table = choose(trials, done.cfg).table
    ranked = sorted((t for t in trials if _role(t) != "rerun"), key=lambda t: (-t.value, t.number))[:2]
    assert sorted(table["number"]) == sorted(t.number for t in ranked)


def test_reruns_are_tagged_and_not_counted(done):
    trials = done.study.get_trials()
    reruns = [t for t in trials if _role(t) == "rerun"]
    top = sorted((t for t in trials if _role(t) != "rerun"), key=lambda t: (-t.value, t.number))[:2]
    expected = sorted((t.number, 1) for t in top if t.user_attrs.get("baseline") != "linear_probe")
    assert sorted((t.user_attrs["rerun_of"], t.user_attrs["seed_index"]) for t in reruns) == expected
    for t in reruns:
        assert t.params == trials[t.user_attrs["rerun_of"]].params
        assert len(t.intermediate_values) == 1  # ran to its last epoch
    assert counted(done.study) == 2 == done.cfg.study.n_trials
    assert len(trials) == 2 + 1 + len(expected)
    assert rerun_plan(trials, 2, 1) == []  # nothing left missing: a resume enqueues nothing
    # The trials table (trials.csv, report.md, `sweep status`) says which trial is what.
    roles = dict(zip(*[trials_frame(done.study, done.cfg)[c] for c in ("number", "role")], strict=True))
    assert roles == {
        t.number: (
            f"rerun of {t.user_attrs['rerun_of']} seed {t.user_attrs['seed_index']}"
            if "rerun_of" in t.user_attrs
            else t.user_attrs.get("baseline") or "search"
        )
        for t in trials
    }
    assert {"linear_probe", "seed_recipe"} <= set(roles.values())
    assert sum(r.startswith("rerun of ") for r in roles.values()) == len(expected)


def test_baselines_and_reruns_are_tagged_nested_runs(done):
    client = MlflowClient(tracking_uri(done.cfg))
    exp = client.get_experiment_by_name(done.cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    nested = {int(r.data.tags["sweep.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    trials = done.study.get_trials()
    assert sorted(nested) == [t.number for t in trials]
    for t in trials:
        tags = nested[t.number].data.tags
        assert tags.get("sweep.baseline") == t.user_attrs.get("baseline")
        assert tags.get("sweep.rerun_of") == (str(t.user_attrs["rerun_of"]) if _role(t) == "rerun" else None)
        assert nested[t.number].info.status == "FINISHED"
    # the runs table says what each run is in the race, and which one won
    champion = done.first.selected_trial
    for t in trials:
        a = t.user_attrs
        words = (
            [f"re-run of {a['rerun_of']}, seed {a['seed_index']}"]
            if "rerun_of" in a
            else [a["baseline"].replace("_", " ")]
            if a.get("baseline")
            else []
        ) + (["champion"] if t.number == champion else [])
        expected = f"trial-{t.number}" + (f" ({', '.join(words)})" if words else "")
        assert nested[t.number].info.run_name == expected
        assert nested[t.number].data.tags.get("sweep.champion") == ("true" if t.number == champion else None)
    assert nested[trials[0].number].info.run_name.startswith("trial-0 (seed recipe")
    # `sweep status` and the report name every trial's run, the probe's too (made after its trial ended)
    frame = trials_frame(done.study, done.cfg)
    assert dict(zip(frame["number"], frame["mlflow_run_id"], strict=True)) == {
        n: r.info.run_id for n, r in nested.items()
    }
    version = client.get_model_version_by_alias(done.cfg.registry.model_name, "champion")
    assert version.tags["sweep.trial_run_id"] == nested[done.first.selected_trial].info.run_id


def test_test_split_read_once_and_refit_on_train_and_val(done):
    test = sorted(done.splits.test)
    union = sorted(refit_samples(done.splits))
    assert union == sorted([*done.splits.train, *done.splits.val]) and not set(union) & set(test)
    reads = [s for s in done.loads if sorted(s) == test]
    assert len(reads) == 1 and sorted(done.first_loads[-1]) == test  # the first report, last
    assert not any(set(s) & set(test) for s in done.loads if sorted(s) != test)
    assert any(sorted(s) == union for s in done.first_loads)  # the refit trained on train + val
    assert done.first.evaluated_now and not done.second.evaluated_now
    assert len(done.loads) == len(done.first_loads)  # the second report neither refits nor tests
    tested = done.study.user_attrs[TESTED_ATTR]
    assert tested["refit"] is True and tested["trial"] == done.first.selected_trial
    assert tested["checkpoint"].endswith(f"refit-trial-{done.first.selected_trial}.pt")
    # the console says what was tested: the champion's role, and that its refit is the model
    first = done.first.summary().splitlines()[0]
    assert first.startswith(f"selected trial {done.first.selected_trial}")
    assert first.endswith("; its configuration refitted on train + val is what was tested and registered")
    assert done.first.role == TrialRecord.from_frozen(done.study.trials[done.first.selected_trial]).role_words
    evals = [k for k in done.study.user_attrs if k.startswith("sweep_test_eval")]
    assert evals == [f"sweep_test_eval:{tested['trial']}:{tested['sha256']}"]


def test_honest_figures_in_report_and_metadata(done):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(done.cfg))
    meta = mlflow.models.get_model_info(f"models:/{done.cfg.registry.model_name}@champion").metadata
    test, sel = meta["test"], meta["selection"]
    n = done.first.test.n_images
    assert test["total"] == n == len(done.splits.test)
    assert test["accuracy"] == pytest.approx(done.first.test.accuracy)
    assert test["low"] <= test["accuracy"] <= test["high"] and test["method"] == "wilson"
    assert test["gap"] == pytest.approx(sel["val_mean"] - test["accuracy"])
    assert sel["champion"] == done.first.selected_trial and sel["refit"] is True
    assert [c["number"] for c in sel["candidates"]][0] == sel["champion"]
    assert all("test" not in key for c in sel["candidates"] for key in c)
    md = (done.tmp / "report" / "report.md").read_text()
    assert "## Candidates and champion" in md and "95% wilson interval" in md and "val → test gap" in md


def _trial(number: int, value: float):
    return create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={"lr": 0.01 * (number + 1)},
        distributions={"lr": FloatDistribution(1e-4, 1.0)},
    )


@pytest.mark.parametrize("seed", range(5))
def test_reruns_off_and_no_baselines_select_as_before(tmp_path, seed):
    rng = random.Random(seed)
    values = [rng.choice([0.5, 0.75, 0.8, 0.9]) for _ in range(7)]
    trials = [_trial(i, v) for i, v in enumerate(values)]
    for i, t in enumerate(trials):
        t.number = i  # create_trial leaves the number to the storage
    tree = study_dict(tmp_path, selection={"baselines": {"linear_probe": False, "seed_recipe": False}, "reruns": 0})
    cfg = load_study(write_study(tmp_path / "s.yaml", tree))
    assert choose(trials, cfg).selected.number == ranked_complete(trials, "maximize")[0].number


def test_head_lr_mult_gives_the_head_its_own_group(tmp_path):
    tree = study_dict(
        tmp_path,
        training={"lr": 0.01, "head_lr_mult": 10.0},
        search_space={"head_lr_mult": {"type": "float", "low": 1.0, "high": 100.0, "log": True}},
    )
    cfg = load_study(write_study(tmp_path / "s.yaml", tree))
    model, _ = M.build_model(M.WeightsSpec("resnet18", "none", "none"), 2)
    M.freeze(model, "resnet18", 2)
    opt, _ = build_training(model, cfg.training, head=M.head_names(model, 2))
    body, head = opt.param_groups
    assert body["lr"] == pytest.approx(0.01) and head["lr"] == pytest.approx(0.1)
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(body["params"]) + len(head["params"]) == len(trainable)
    assert cfg.with_params({"head_lr_mult": 3.0}).training.head_lr_mult == 3.0
    opt1, _ = build_training(model, cfg.with_params({"head_lr_mult": 1.0}).training, head=M.head_names(model, 2))
    assert len(opt1.param_groups) == 1
    assert isinstance(opt1.param_groups[0]["params"][0], torch.nn.Parameter)
