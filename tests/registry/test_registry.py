"""Registry building blocks without a study: export, signature, registration once, alias moves
(loading back and predicting: test_predict.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from pipeline.core import RegistryError
from pipeline.registry import _predict as P
from pipeline.registry import _versions as G

PP = {
    "resize": 37,
    "crop": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}


def test_exported_module_returns_class_probabilities():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    module = G.export_module(net)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        probs = module(x)
    assert probs.shape == (4, 3) and not module.training
    assert torch.allclose(probs.sum(1), torch.ones(4))
    assert module.net is net and torch.equal(probs.argmax(1), net(x).argmax(1))


def test_signature_is_one_image_per_row_to_labels_and_probabilities():
    sig = G.signature()
    (inp,) = sig.inputs.inputs
    assert (inp.name, inp.type.name) == (None, "binary")
    assert [(c.name, c.required) for c in sig.outputs.inputs] == [
        ("label", True),
        ("probability", True),
        ("probabilities", True),
        ("error", False),
    ]


def _jpeg(size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _export(sha: str) -> G.Export:
    torch.manual_seed(0)
    module = G.export_module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)))
    meta = {"classes": ["ants", "bees"], "arch": "resnet18", "preprocess": {**PP, "crop": 8}}
    tags = {G.STUDY_TAG: "s", G.SHA_TAG: sha, G.TRIAL_TAG: "0"}
    return G.Export(module, np.zeros((2, 3, 8, 8), np.float32), _jpeg(), meta, tags, "tiny")


def _store(tmp_path, monkeypatch) -> tuple[str, MlflowClient, dict]:
    """An empty SQLite tracking/registry store with one experiment, and `register` kwargs for it."""
    monkeypatch.chdir(tmp_path)  # a model logged to experiment 0 would appear in ./mlruns/0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    kwargs = {
        "study": "s",
        "tracking": uri,
        "experiment_id": exp,
        "run_id": None,
        "name": "m",
        "alias": "champion",
        "serialization_format": "pickle",
    }
    return uri, client, kwargs


def _fail_once(monkeypatch, method: str) -> list[str]:
    """Make `MlflowClient.<method>` fail once as a briefly unavailable store does; returns the
    record of the failures raised."""
    real = getattr(MlflowClient, method)
    raised: list[str] = []

    def flaky(self, *args, **kwargs):
        if not raised:
            raised.append(method)
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)
    return raised


def test_register_once_per_checkpoint_and_move_the_alias(tmp_path, monkeypatch):
    _, client, kwargs = _store(tmp_path, monkeypatch)
    first = G.register(lambda: _export("aaa"), sha256="aaa", **kwargs)
    assert (first.version, first.created, first.previous_alias_version) == ("1", True, None)

    def must_not_build():
        raise AssertionError("an existing version must not be logged again")

    again = G.register(must_not_build, sha256="aaa", **kwargs)
    assert (again.version, again.created, again.previous_alias_version) == ("1", False, "1")
    other = G.register(lambda: _export("bbb"), sha256="bbb", **kwargs)
    assert (other.version, other.created, other.previous_alias_version) == ("2", True, "1")
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert client.get_model_version("m", "1").tags[G.SHA_TAG] == "aaa"
    assert client.get_model_version("m", "2").description == "tiny"
    # the logged model lives in the study's experiment, under its artifact location
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert other.uri == "models:/m@champion"


def test_store_failure_while_finding_versions_never_registers_a_duplicate(tmp_path, monkeypatch):
    _, client, kwargs = _store(tmp_path, monkeypatch)
    assert G.register(lambda: _export("aaa"), sha256="aaa", **kwargs).version == "1"
    built = []

    def build():
        built.append(1)
        return _export("aaa")

    raised = _fail_once(monkeypatch, "search_model_versions")
    with pytest.raises(RegistryError) as err:
        G.register(build, sha256="aaa", **kwargs)
    assert raised == ["search_model_versions"] and built == []
    assert str(err.value) == (
        "looking up the versions of model 'm' failed: (sqlite3.OperationalError) database is "
        "locked; nothing was registered: run `sweep report` again once the store answers"
    )
    again = G.register(build, sha256="aaa", **kwargs)  # the store answers again
    assert (again.version, again.created, built) == ("1", False, [])
    assert [str(v.version) for v in client.search_model_versions("name='m'")] == ["1"]


def test_store_failure_while_reading_the_alias_is_a_registry_error_and_moves_nothing(tmp_path, monkeypatch):
    uri, client, kwargs = _store(tmp_path, monkeypatch)
    G.register(lambda: _export("aaa"), sha256="aaa", **kwargs)
    raised = _fail_once(monkeypatch, "get_registered_model")
    with pytest.raises(RegistryError) as err:
        G.register(lambda: _export("aaa"), sha256="aaa", **kwargs)
    assert raised == ["get_registered_model"]
    assert str(err.value) == (f"registering model 'm' in {uri} failed: (sqlite3.OperationalError) database is locked")
    other = G.register(lambda: _export("bbb"), sha256="bbb", **kwargs)
    assert (other.version, other.created, other.previous_alias_version) == ("2", True, "1")
    assert sorted(str(v.version) for v in client.search_model_versions("name='m'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"


def test_alias_and_versions_of_a_model_not_registered_yet(tmp_path, monkeypatch):
    _, client, _ = _store(tmp_path, monkeypatch)
    assert G.find_version(client, "nope", "s", "aaa") is None
    assert G.alias_version(client, "nope", "champion") is None
    client.create_registered_model("bare")
    assert G.alias_version(client, "bare", "champion") is None


def test_register_failure_is_one_registry_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RegistryError, match=r"^registering model 'm' in sqlite:///.* failed: "):
        G.register(
            lambda: _export("aaa"),
            study="s",
            sha256="aaa",
            tracking=uri,
            experiment_id="12345",
            run_id=None,
            name="m",
            alias="champion",
            serialization_format="pickle",
        )


def test_pt2_format_loads_back_with_a_dynamic_batch(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    G.register(
        lambda: _export("ccc"),
        study="s",
        sha256="ccc",
        tracking=uri,
        experiment_id=exp,
        run_id=None,
        name="m2",
        alias="champion",
        serialization_format="pt2",
    )
    model, meta = P.load_model("models:/m2@champion", uri)
    frame = model.predict([_jpeg(12), _jpeg(20), _jpeg(9)])  # one image per row, any batch size
    assert len(frame) == 3 and set(frame["label"]) <= {"ants", "bees"} and frame["error"].isna().all()
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in frame["probabilities"])
    assert meta["classes"] == ["ants", "bees"]
    classifier = model.unwrap_python_model()  # the tensor path
    probs = classifier.probabilities(np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert type(classifier.module).__name__.startswith("GraphModule")


def test_model_logged_at_its_best_epoch_carries_that_epochs_figures_and_its_test_figures(tmp_path, monkeypatch):
    import dataclasses

    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric

    _, client, kwargs = _store(tmp_path, monkeypatch)
    run_id = client.create_run(kwargs["experiment_id"], run_name="trial-0").info.run_id
    client.log_batch(run_id, metrics=[Metric("val_accuracy", 0.5 + 0.1 * s, 0, s) for s in range(4)])
    test = DatasetInput(
        Dataset(name="images/test", digest="e571cd1d", source_type="local", source='{"uri": "/d"}'),
        [InputTag("mlflow.data.context", "test")],
    )
    export = dataclasses.replace(
        _export("ddd"), step=2, model_metrics={"test_accuracy": 0.75, "test_loss": 0.4}, metrics_input=test
    )
    G.register(lambda: export, sha256="ddd", **{**kwargs, "run_id": run_id})
    (model,) = client.search_logged_models([kwargs["experiment_id"]])
    figures = {m.key: (m.value, m.step, m.dataset_name, m.dataset_digest) for m in model.metrics}
    assert figures == {
        "val_accuracy": (0.7, 2, None, None),  # epoch 2's, not epoch 0's
        "test_accuracy": (0.75, 2, "images/test", "e571cd1d"),
        "test_loss": (0.4, 2, "images/test", "e571cd1d"),
    }
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # attaching the model leaves the trial's run as it was
    assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("images/test", "e571cd1d")]
    assert run.data.metrics["test_accuracy"] == 0.75  # the champion's run shows its test figure too


def test_registering_prints_none_of_mlflows_banners(tmp_path, monkeypatch, capfd):
    """A user's report: "Successfully registered model" / "Created version" lines amid sweep's own."""
    _, _, kwargs = _store(tmp_path, monkeypatch)
    G.register(lambda: _export("eee"), sha256="eee", **kwargs)
    err = capfd.readouterr().err
    assert "Successfully registered model" not in err and "Created version" not in err, err
