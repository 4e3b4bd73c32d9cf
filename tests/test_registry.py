"""Registry building blocks without a study: export, signature, registration once, alias moves,
and the image handling of `sweep predict`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import COLOURS, write_image
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline import registry as G
from pipeline.data import Preprocess, eval_transform, load_rgb
from pipeline.errors import DataError, RegistryError

PP = {"resize": 37, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
      "interpolation": "bilinear"}


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


def test_signature_is_float32_batch_of_images_to_class_scores():
    sig = G.signature(224, 5)
    (inp,), (out,) = sig.inputs.inputs, sig.outputs.inputs
    assert (inp.type, inp.shape) == (np.dtype(np.float32), (-1, 3, 224, 224))
    assert (out.type, out.shape) == (np.dtype(np.float32), (-1, 5))


def test_image_files_scans_folders_and_names_bad_paths(tmp_path):
    write_image(tmp_path / "d" / "a.png", COLOURS["ants"])
    write_image(tmp_path / "d" / "sub" / "b.JPG", COLOURS["bees"], fmt="JPEG")
    write_image(tmp_path / "d" / ".hidden" / "c.png", COLOURS["bees"])
    (tmp_path / "d" / "notes.txt").write_text("x")
    single = write_image(tmp_path / "single.png", COLOURS["bees"])
    found = G.image_files([tmp_path / "d", single])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/a.png", "d/sub/b.JPG", "single.png"]
    with pytest.raises(DataError, match=r"missing\.png: no such file or folder; give image files"):
        G.image_files([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files in this folder"):
        G.image_files([tmp_path / "empty"])


def test_preprocess_images_matches_the_eval_transform_and_names_every_bad_file(tmp_path):
    good = write_image(tmp_path / "good.png", COLOURS["ants"], size=50)
    batch = G.preprocess_images([good, good], PP)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    pp = Preprocess(37, 32, tuple(PP["mean"]), tuple(PP["std"]), "bilinear")
    assert np.array_equal(batch[0], eval_transform(pp)(load_rgb(good)).numpy())
    (tmp_path / "bad1.jpg").write_bytes(b"")
    (tmp_path / "bad2.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        G.preprocess_images([good, tmp_path / "bad1.jpg", tmp_path / "bad2.png"], PP)
    message = str(err.value)
    assert message.startswith("cannot read 2 image file(s): ") and "\n" not in message
    assert f"{tmp_path / 'bad1.jpg'} (" in message and f"{tmp_path / 'bad2.png'} (" in message


def _export(sha: str) -> G.Export:
    torch.manual_seed(0)
    module = G.export_module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)))
    meta = {"classes": ["ants", "bees"], "arch": "resnet18", "preprocess": {**PP, "crop": 8}}
    tags = {G.STUDY_TAG: "s", G.SHA_TAG: sha, G.TRIAL_TAG: "0"}
    return G.Export(module, np.zeros((2, 3, 8, 8), np.float32), meta, tags, "tiny")


def _store(tmp_path, monkeypatch) -> tuple[str, MlflowClient, dict]:
    """An empty SQLite tracking/registry store with one experiment, and `register` kwargs for it."""
    monkeypatch.chdir(tmp_path)  # a model logged to experiment 0 would appear in ./mlruns/0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    kwargs = {"study": "s", "tracking": uri, "experiment_id": exp, "run_id": None, "name": "m", "alias": "champion",
              "serialization_format": "pickle"}
    return uri, client, kwargs


def _fail_once(monkeypatch, method: str) -> list[str]:
    """Make `MlflowClient.<method>` fail once as a briefly unavailable store does; returns the
    record of the failures raised."""
    real = getattr(MlflowClient, method)
    raised: list[str] = []

    def flaky(self, *args, **kwargs):
        if not raised:
            raised.append(method)
            raise MlflowException("(sqlite3.OperationalError) database is locked",
                                  error_code=TEMPORARILY_UNAVAILABLE)
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
    assert str(err.value) == ("looking up the versions of model 'm' failed: (sqlite3.OperationalError) database is "
                              "locked; nothing was registered: run `sweep report` again once the store answers")
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
    assert str(err.value) == (f"registering model 'm' in {uri} failed: (sqlite3.OperationalError) database is "
                              "locked")
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
        G.register(lambda: _export("aaa"), study="s", sha256="aaa", tracking=uri, experiment_id="12345",
                   run_id=None, name="m", alias="champion", serialization_format="pickle")


def test_pt2_format_loads_back_with_a_dynamic_batch(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    G.register(lambda: _export("ccc"), study="s", sha256="ccc", tracking=uri, experiment_id=exp, run_id=None,
               name="m2", alias="champion", serialization_format="pt2")
    model, meta = G.load_model("models:/m2@champion", uri)
    probs = model.predict(np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert meta["classes"] == ["ants", "bees"]
    assert type(mlflow.pytorch.load_model("models:/m2@champion")).__name__.startswith("GraphModule")


def test_missing_store_is_named_and_not_created(tmp_path):
    store = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(RegistryError, match=r"^no MLflow store at .*nowhere/mlflow\.db: pass --tracking-uri"):
        G.load_model("models:/m@champion", f"sqlite:///{store}")
    assert not store.parent.exists()
