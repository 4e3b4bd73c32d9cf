"""The registered model carries its own preprocessing: it loads in a virtual environment where
`pipeline` cannot be imported, takes paths, bytes and pixels, and `mlflow models serve` answers
an HTTP request with an image. Real processes: a fresh venv's python and the MLflow server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from PIL import Image
from test_predict import register_in

from pipeline.data import _imagefiles as IMG
from pipeline.data import _transforms as TX
from pipeline.data import portable
from pipeline.registry import _predict as P
from pipeline.registry import _versions as G

from conftest import COLOURS, free_port, write_image

PP = {
    "resize": 36,
    "crop": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}
CLASSES = ["ants", "bees", "wasps"]
URI = "models:/portable@champion"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """A sqlite store holding `portable`: a torchvision MobileNetV3-Small (3 classes, 32 px),
    pickled, so loading it needs torchvision's classes and nothing of `pipeline`."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("e", artifact_location=(folder / "artifacts").as_uri())
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=len(CLASSES)).eval()
    export = G.Export(
        G.export_module(net),
        np.zeros((1, 3, 32, 32), np.float32),
        _jpeg(Image.new("RGB", (40, 36), COLOURS["ants"])),
        {"classes": CLASSES, "arch": "mobilenet_v3_small", "preprocess": PP},
        {G.STUDY_TAG: "s", G.SHA_TAG: "p1", G.TRIAL_TAG: "0"},
        "portable",
    )
    register_in(folder, export, uri, exp, "portable", "p1")
    return uri, folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    return [
        write_image(folder / f"img{i}.png", list(COLOURS.values())[i % 2], size=48 + 8 * i, seed=i) for i in range(3)
    ]


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment that sees this environment's installed libraries (mlflow,
    torch, torchvision and their dependencies) through a .pth line, but not `pipeline`: the
    editable install's finder is a .pth *file* in site-packages, which a .pth line does not run."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the console script `pip install mlflow` would put there: `mlflow models serve` runs `uvicorn`
    uvicorn = venv / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return venv


def _in_bare_venv(venv: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_portable_preprocessing_imports_nothing_of_pipeline():
    source = Path(portable.__file__).read_text()
    assert "pipeline" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


def test_training_decodes_and_transforms_through_the_portable_functions(tmp_path):
    """One recipe: the registered model's preprocessing is the study's, bit for bit."""
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(rgba)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).save(gray16)
    pp = TX.Preprocess(PP["resize"], PP["crop"], tuple(PP["mean"]), tuple(PP["std"]))
    for path in (rgba, gray16):
        study = TX.eval_transform(pp)(IMG.load_rgb(path))
        served = portable.eval_transform(**PP)(portable.open_item(path.read_bytes()))
        assert torch.equal(study, served)


def test_predict_takes_paths_bytes_base64_and_pixels_and_names_a_bad_item(store, images):
    import mlflow
    import pandas as pd

    uri, _ = store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(URI)
    by_path = model.predict([str(p) for p in images])
    assert list(by_path.columns) == ["label", "probability", "probabilities", "error"]
    assert by_path["error"].isna().all() and set(by_path["label"]) <= set(CLASSES)
    probs = np.array([[row[c] for c in CLASSES] for row in by_path["probabilities"]])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    assert list(by_path["label"]) == [CLASSES[i] for i in probs.argmax(1)]
    pixels = [np.asarray(IMG.load_rgb(p)) for p in images]
    for same in (
        model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]})),
        model.predict([base64.b64encode(p.read_bytes()).decode() for p in images]),
        model.predict(pd.DataFrame({"image": pixels})),
    ):
        assert list(same["label"]) == list(by_path["label"])
        np.testing.assert_allclose([[r[c] for c in CLASSES] for r in same["probabilities"]], probs, rtol=1e-5)
    batch = model.unwrap_python_model().predict_arrays(np.stack([pixels[0], pixels[0]]))  # uint8 (N, H, W, 3)
    assert list(batch["label"]) == [by_path["label"][0]] * 2
    frame = model.predict([str(images[0]), b"not an image", "missing.jpg", str(images[1])])
    assert list(frame["error"].isna()) == [True, False, False, True]
    assert frame["error"][1] == "<12 bytes>: not an image file"
    assert frame["error"][0] is None and frame["error"][3] is None  # None, not NaN, for the predicted rows
    assert frame["error"][2] == "missing.jpg: no such file, and not base64 image bytes"
    assert list(frame["label"][[0, 3]]) == list(by_path["label"][:2])


def test_the_registered_model_loads_where_pipeline_is_not_installed(store, images, bare_venv, tmp_path):
    uri, _ = store
    code = f"""
import importlib.util, json, mlflow
assert importlib.util.find_spec("pipeline") is None, "pipeline is importable"
model = mlflow.pyfunc.load_model({URI!r})
frame = model.predict({[str(p) for p in images]!r})
print(json.dumps({{"labels": list(frame["label"]), "probabilities": list(frame["probabilities"])}}))
"""
    done = _in_bare_venv(bare_venv, code, tmp_path, MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 0, done.stderr[-2000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    here = P.predict_files(URI, images, uri, warn=lambda m: None)
    assert there["labels"] == [p.label for p in here]
    for theirs, ours in zip(there["probabilities"], here, strict=True):
        assert theirs.keys() == ours.probabilities.keys()
        np.testing.assert_allclose([theirs[c] for c in CLASSES], [ours.probabilities[c] for c in CLASSES], rtol=1e-5)


def test_mlflow_models_serve_answers_an_http_request_with_an_image(store, images, bare_venv, tmp_path):
    uri, _ = store
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(
        [
            str(bare_venv / "bin" / "python"),
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            URI,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env={**clean, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bare_venv / 'bin'}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None, server.stdout.read()[-3000:] if server.stdout else ""
            assert time.monotonic() < deadline, "the model server did not answer /ping within 120 s"
            time.sleep(1)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = answer["predictions"]
    here = P.predict_files(URI, images, uri, warn=lambda m: None)
    assert [r["label"] for r in rows] == [p.label for p in here]
    assert all(r["error"] is None for r in rows)
    np.testing.assert_allclose(
        [[r["probabilities"][c] for c in CLASSES] for r in rows],
        [[p.probabilities[c] for c in CLASSES] for p in here],
        rtol=1e-5,
    )
