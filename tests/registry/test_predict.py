"""`sweep predict` on a tiny registered model: the same input checks as training, what happens to
the other images of a batch, JSON that strict parsers accept, library warnings as one line, and
MLflow's own environment variables."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from rich.console import Console
from torch import nn

from pipeline.cli._display import render_predictions
from pipeline.config import resolve_tracking
from pipeline.config._stores import default_tracking_uri
from pipeline.core import DataError, RegistryError
from pipeline.data import _imagefiles as IMG
from pipeline.data import _splits as D
from pipeline.data import _transforms as TX
from pipeline.registry import _predict as P
from pipeline.registry import _versions as G

from conftest import COLOURS, write_image

PP = {
    "resize": 37,
    "crop": 32,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
}
MODEL_PP = {**PP, "resize": 8, "crop": 8}
URI = "models:/tiny@champion"
BOMB_REASON = (
    "cannot be decoded (Image size (179560000 pixels) exceeds limit of 178956970 pixels, "
    "could be decompression bomb DOS attack.)"
)


def bomb_png(path: Path) -> Path:
    """A 13400 x 13400 RGB PNG header (over Pillow's decompression-bomb limit) in ~60 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 13400, 13400, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def corrupt_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block announces two IFD entries but holds one (Pillow: "Corrupt EXIF data")."""
    tiff = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 2) + struct.pack("<HHI4s", 0x0112, 3, 1, b"\1\0\0\0")
    Image.new("RGB", (32, 32), COLOURS["ants"]).save(path, exif=b"Exif\0\0" + tiff)
    return path


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), COLOURS["ants"]).save(buffer, format="JPEG")
    return buffer.getvalue()


def register_in(folder: Path, export: G.Export, uri: str, experiment_id: str, name: str, sha256: str) -> None:
    """Register `export` as `name@champion` with `folder` as the working directory, so anything
    MLflow would put in ./mlruns stays there."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        G.register(
            lambda: export,
            study="s",
            sha256=sha256,
            tracking=uri,
            experiment_id=experiment_id,
            run_id=None,
            name=name,
            alias="champion",
            serialization_format="pickle",
        )
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, nn.Module]:
    """A sqlite MLflow store holding `tiny` (8 px input, classes ants/bees) at alias champion;
    returns (tracking URI, the registered module)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("e", artifact_location=(folder / "artifacts").as_uri())
    torch.manual_seed(0)
    module = G.export_module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)))
    export = G.Export(
        module,
        np.zeros((1, 3, 8, 8), np.float32),
        _jpeg(),
        {"classes": ["ants", "bees"], "arch": "resnet18", "preprocess": MODEL_PP},
        {G.STUDY_TAG: "s", G.SHA_TAG: "aaa", G.TRIAL_TAG: "0"},
        "tiny",
    )
    register_in(folder, export, uri, exp, "tiny", "aaa")
    return uri, module


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No MLflow URI in the environment; the embedded store folder is empty."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path / "empty-home"))


def expected(module: nn.Module, files: list[Path]) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(P.preprocess_images(files, MODEL_PP))).numpy()


# ---- inputs: the training scan's rules -----------------------------------------------------------


def test_image_files_scans_folders_like_training(tmp_path):
    write_image(tmp_path / "d" / "a.png", COLOURS["ants"])
    write_image(tmp_path / "d" / "sub" / "b.JPG", COLOURS["bees"], fmt="JPEG")
    write_image(tmp_path / "d" / "c.jfif", COLOURS["bees"], fmt="JPEG")
    write_image(tmp_path / "d" / ".hidden" / "c.png", COLOURS["bees"])
    (tmp_path / "d" / "notes.txt").write_text("x")
    single = write_image(tmp_path / "single.png", COLOURS["bees"])
    warned: list[str] = []
    found = P.image_files([tmp_path / "d", single], warned.append)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["d/a.png", "d/c.jfif", "d/sub/b.JPG", "single.png"]
    assert warned == [
        IMG.ignored_files_message(tmp_path / "d", [tmp_path / "d" / ".hidden" / "c.png", tmp_path / "d" / "notes.txt"])
    ]
    assert warned[0].startswith(
        f"{tmp_path / 'd'}: 2 file(s) not used as images (hidden: 1, .txt: 1): .hidden/c.png, notes.txt;"
    )


def test_image_files_names_bad_paths_and_refuses_only_when_none_gives_an_image(tmp_path):
    with pytest.raises(DataError) as info:
        P.image_files([tmp_path / "missing.png"])
    assert str(info.value) == (
        f"{tmp_path / 'missing.png'}: no such file or folder; give image files or folders of images"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        P.image_files([tmp_path / "empty"])
    assert str(info.value) == (
        f"{tmp_path / 'empty'}: no image files in this folder (only other files: .txt: 1); give image "
        "files (extensions Pillow opens, e.g. .jpg, .png, .webp) or a folder of them"
    )
    good = write_image(tmp_path / "good.png", COLOURS["ants"])
    assert P.image_files([tmp_path / "missing.png", good, tmp_path / "empty"]) == [
        P.BadPath(tmp_path / "missing.png", "no such file or folder"),
        good,
        P.BadPath(tmp_path / "empty", "no image files in this folder (only other files: .txt: 1)"),
    ]


def test_preprocess_images_matches_the_eval_transform_and_names_every_bad_file(tmp_path):
    good = write_image(tmp_path / "good.png", COLOURS["ants"], size=50)
    batch = P.preprocess_images([good, good], PP)
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == np.float32
    pp = TX.Preprocess(37, 32, tuple(PP["mean"]), tuple(PP["std"]), "bilinear")
    assert np.array_equal(batch[0], TX.eval_transform(pp)(IMG.load_rgb(good)).numpy())
    (tmp_path / "bad1.jpg").write_bytes(b"")
    (tmp_path / "bad2.png").write_bytes(b"garbage")
    with pytest.raises(DataError) as info:
        P.preprocess_images([good, tmp_path / "bad1.jpg", tmp_path / "bad2.png"], PP)
    assert str(info.value) == (
        f"2 unreadable image file(s): {tmp_path / 'bad1.jpg'}: empty file; {tmp_path / 'bad2.png'}: not an image file"
    )


# ---- a batch with bad files ----------------------------------------------------------------------


def test_bad_files_are_skipped_and_named_and_the_others_predicted(tmp_path, store, no_env):
    uri, module = store
    good = [write_image(tmp_path / f"g{i}.png", COLOURS["ants" if i % 2 else "bees"], seed=i) for i in range(3)]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bomb = bomb_png(tmp_path / "huge.png")
    files = [good[0], empty, good[1], bomb, good[2]]
    warned: list[str] = []
    predictions = P.predict_files(URI, files, uri, batch_size=2, warn=warned.append)
    assert [p.file for p in predictions] == [str(f) for f in files]  # input order, skipped ones included
    assert [p.error for p in predictions] == [None, "empty file", None, BOMB_REASON, None]
    assert [p.label for p in predictions if p.error] == [None, None]
    probs = expected(module, good)
    got = np.array([[p.probabilities["ants"], p.probabilities["bees"]] for p in predictions if not p.error])
    np.testing.assert_allclose(got, probs, rtol=1e-5)
    assert [p.label for p in predictions if not p.error] == [["ants", "bees"][i] for i in probs.argmax(1)]
    assert warned == [
        (
            f"skipped 2 of 5 image files that cannot be read (the others are predicted): "
            f"{empty}: empty file; {bomb}: {BOMB_REASON}"
        )
    ]
    assert json.loads(predictions[3].to_json()) == {"file": str(bomb), "error": BOMB_REASON}


def test_a_missing_path_among_the_arguments_is_skipped_and_named(tmp_path, store, no_env):
    """A user's report: one mistyped path among predict's arguments aborted the whole call."""
    uri, module = store
    good = [write_image(tmp_path / f"g{i}.png", COLOURS["ants"], seed=i) for i in range(2)]
    typo = tmp_path / "g9.png"
    warned: list[str] = []
    predictions = P.predict_files(URI, [good[0], typo, good[1]], uri, warn=warned.append)
    assert [(p.file, p.error) for p in predictions] == [
        (str(good[0]), None),
        (str(typo), "no such file or folder"),
        (str(good[1]), None),
    ]
    np.testing.assert_allclose(
        [[p.probabilities["ants"], p.probabilities["bees"]] for p in predictions if not p.error],
        expected(module, good),
        rtol=1e-5,
    )
    assert warned == [
        f"skipped 1 of 3 inputs that give no image (the others are predicted): {typo}: no such file or folder"
    ]


def test_a_decompression_bomb_gets_the_training_message(tmp_path, store, no_env):
    bomb = bomb_png(tmp_path / "huge.png")
    with pytest.raises(DataError) as info:
        P.predict_files(URI, [bomb], store[0])
    assert str(info.value) == f"{bomb}: {BOMB_REASON}"
    # the same line the pre-flight scan gives the same file in training
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            write_image(root / split / cls / "a.png", COLOURS[cls])
    bomb_png(root / "train" / "ants" / "huge.png")
    with pytest.raises(DataError) as scan:
        D.scan_images(D.build_splits(root, test="val"))
    assert f"\n  {root / 'train' / 'ants' / 'huge.png'}: {BOMB_REASON}\n" in str(scan.value)


def test_several_unreadable_files_and_nothing_else(tmp_path, store, no_env):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError) as info:
        P.predict_files(URI, [tmp_path], store[0])
    assert str(info.value) == (
        f"none of the 2 image files can be read: {tmp_path / 'a.png'}: not an "
        f"image file; {tmp_path / 'b.jpg'}: empty file"
    )


def test_other_formats_and_pillow_warnings_become_one_line_each(tmp_path, store, no_env):
    webp = write_image(tmp_path / "scraped.jpg", COLOURS["bees"], fmt="WEBP")
    exif = corrupt_exif_jpeg(tmp_path / "exif.jpg")
    warned: list[str] = []
    predictions = P.predict_files(URI, [webp, exif], store[0], warn=warned.append)
    assert [p.error for p in predictions] == [None, None]
    assert warned == [
        (
            f"predict: 1 image(s) hold another format than their extension says and are used as decoded: "
            f"{webp} is WEBP; rename them to their format's extension to silence this"
        ),
        (
            f'predict: while decoding 1 image(s) Pillow warned "Corrupt EXIF data. Expecting to read 12 '
            f'bytes but only got 0.": {exif}; the decoded images are used'
        ),
    ]


# ---- output other tools can read ----------------------------------------------------------------


def test_json_is_valid_utf8_for_a_file_name_that_is_not(tmp_path, store, no_env):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    write_image(Path(os.fsdecode(raw)), COLOURS["ants"])
    (prediction,) = P.predict_files(URI, [tmp_path], store[0])
    text = render_predictions([prediction], as_json=True)
    record = json.loads(text.encode("ascii"))  # ASCII: valid UTF-8 whatever the name
    assert record["file"] == os.fsdecode(tmp_path) + "/caf\ufffd.png"
    for value in (record["file"], *record["probabilities"]):
        value.encode("utf-8")  # no lone surrogates (strict parsers refuse their escapes)
    assert base64.b64decode(record["file_bytes_b64"]) == raw
    assert Path(os.fsdecode(base64.b64decode(record["file_bytes_b64"]))).is_file()
    assert set(record) == {"file", "file_bytes_b64", "label", "probability", "probabilities"}
    console = Console(file=io.StringIO(), width=200)
    console.print(render_predictions([prediction]))
    assert "caf\ufffd.png" in console.file.getvalue()
    assert "file_bytes_b64" not in P.Prediction("plain.png", "ants", 1.0, {"ants": 1.0}).to_json()


# ---- MLflow's environment variables ------------------------------------------------------------


def test_resolve_tracking_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking("http://flag:1", "http://file:2") == "http://flag:1"
    assert resolve_tracking(None, "http://file:2") == "http://file:2"
    assert resolve_tracking(None, None) == "http://env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert resolve_tracking(None, None) == default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_mlflow_tracking_uri_is_honoured(tmp_path, store, no_env, monkeypatch):
    image = write_image(tmp_path / "a.png", COLOURS["ants"])
    with pytest.raises(
        RegistryError,
        match=r"^no MLflow store at .*empty-home/mlflow\.db: pass --tracking-uri, "
        r"or set MLFLOW_TRACKING_URI",
    ):
        P.predict_files(URI, [image])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    (prediction,) = P.predict_files(URI, [image])
    assert prediction.label in ("ants", "bees") and sum(prediction.probabilities.values()) == pytest.approx(1)
    # the flag still wins over the environment
    elsewhere = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    with pytest.raises(RegistryError, match=r"^no MLflow store at .*other/mlflow\.db"):
        P.predict_files(URI, [image], elsewhere)


def test_mlflow_registry_uri_is_honoured(tmp_path, store, no_env, monkeypatch):
    image = write_image(tmp_path / "a.png", COLOURS["bees"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", store[0])
    (prediction,) = P.predict_files(URI, [image])
    assert prediction.error is None and prediction.label in ("ants", "bees")
    assert not (tmp_path / "empty-home").exists()  # no empty embedded store left behind


def test_cli_predict_json_and_exit_codes(tmp_path, store, no_env, monkeypatch):
    # The command itself: valid JSON lines on stdout, one warning line, no traceback; the bomb
    # alone exits 3 (DataError) with the training message.
    from typer.testing import CliRunner

    from pipeline.cli._commands import app

    folder = tmp_path / "imgs"
    write_image(folder / "a.png", COLOURS["ants"])
    write_image(Path(os.fsdecode(os.fsencode(folder) + b"/b\xff.png")), COLOURS["bees"])
    bomb = bomb_png(folder / "huge.png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    runner = CliRunner()
    result = runner.invoke(app, ["predict", URI, str(folder), "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout_bytes.decode("utf-8").splitlines()]
    assert [r["file"] for r in records] == [f"{folder}/a.png", f"{folder}/b\ufffd.png", str(bomb)]
    assert records[2] == {"file": str(bomb), "error": BOMB_REASON}
    assert result.stderr.splitlines() == [
        (f"warning: skipped 1 of 3 image files that cannot be read (the others are predicted): {bomb}: {BOMB_REASON}")
    ]
    alone = runner.invoke(app, ["predict", URI, str(bomb)])
    assert alone.exit_code == 3
    assert alone.stderr.strip() == f"error: {bomb}: {BOMB_REASON}" and "Traceback" not in alone.output


def test_a_bare_model_name_is_told_the_uri_forms(tmp_path, store, no_env):
    """A user's report: `sweep predict my-classifier img.jpg` blamed a missing artifact."""
    uri, _ = store
    image = write_image(tmp_path / "a.png", COLOURS["ants"])
    with pytest.raises(RegistryError) as info:
        P.predict_files("tiny", [image], uri)
    assert str(info.value) == (
        "tiny: not a model URI or a model folder; give models:/NAME@ALIAS (e.g. models:/tiny@champion), "
        "models:/NAME/VERSION, runs:/RUN_ID/model or the folder of a saved MLflow model"
    )
