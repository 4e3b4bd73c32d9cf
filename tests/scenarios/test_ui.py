"""What a user sees, in a real browser: the MLflow UI (`mlflow ui`, as `make ui` starts it) and
optuna-dashboard on a tiny study's stores, in Debian's headless Chromium driven by Playwright.

One real trial (ResNet-18 from scratch, 32 px, 2 epochs, only the head trains) is run and
reported; a PRUNED and a FAIL trial are added through Optuna's API before the report, so the
report's reconciliation gives them their runs and every state shows in the runs table.
Playwright only drives /usr/bin/chromium (`.ci/run` installs Debian's `chromium`); it never
downloads a browser.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial

from pipeline.champion._evaluation import sealed_splits
from pipeline.config import artifact_root, load_study, storage_url, tracking_uri
from pipeline.stages import run_report, run_study
from pipeline.tracking import PARENT_ATTR
from pipeline.tracking import _links as links
from pipeline.tracking._datasets import split_digest

from conftest import make_folder, study_dict, write_study

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1600, "height": 1000}
EPOCHS = 2
pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser check needs playwright (the test extra)")
expect = sync_api.expect
expect.set_options(timeout=30_000)  # a page of the UI can take seconds on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{url}: the server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds:.0f} s")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The tiny study, run and reported: trial 0 COMPLETE (the champion), 1 PRUNED, 2 FAIL,
    3 a linear probe (val 0)."""
    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SWEEP_HOME", str(tmp / "mlruns"))
        mp.setenv("SWEEP_REPORTS", str(tmp / "reports"))
        images = make_folder(tmp / "images")
        tree = study_dict(
            images,
            study={"n_trials": 1, "pruner": {"type": "none"}},
            data={"batch_size": 4},
            training={"epochs": EPOCHS, "freeze_depth": 5, "aug_strength": 0.0},
        )
        # Only the head trains (the 5 ResNet stages are frozen): the fastest real trial.
        tree["search_space"] = {"lr": {"type": "float", "low": 0.05, "high": 0.3, "log": True}}
        cfg = load_study(write_study(tmp / "study.yaml", tree))
        outcome = run_study(cfg)
        stored = optuna.load_study(study_name=cfg.study.name, storage=storage_url(cfg))
        done = stored.trials[0]
        epoch = {"train_loss": 0.7, "train_acc": 0.5, "val_loss": 0.69, "val_acc": 0.5, "lr": 0.1, "seconds": 1.0}
        stored.add_trial(
            create_trial(
                state=TrialState.PRUNED,
                value=0.5,
                params=done.params,
                distributions=done.distributions,
                intermediate_values={0: 0.5},
                user_attrs={"epoch_00": epoch, "epochs_run": 1},
            )
        )
        stored.add_trial(
            create_trial(
                state=TrialState.FAIL,
                params=done.params,
                distributions=done.distributions,
                user_attrs={"epochs_run": 0, "fail_reason": "non-finite loss: training loss became nan"},
            )
        )
        # a baseline that loses, so its run is made by the report's reconcile and named by its role
        stored.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0, user_attrs={"baseline": "linear_probe"}))
        result = run_report(cfg)
        from mlflow.tracking import MlflowClient

        train_losses = MlflowClient(tracking_uri(cfg)).get_metric_history(
            done.user_attrs["mlflow_run_id"], "train_loss"
        )
        yield SimpleNamespace(
            cfg=cfg,
            outcome=outcome,
            result=result,
            tracking=tracking_uri(cfg),
            storage=storage_url(cfg),
            parent=stored.user_attrs[PARENT_ATTR],
            best_epoch_train_loss=next(m.value for m in train_losses if m.step == result.best_epoch),
            test_digest=split_digest(sealed_splits(cfg), "test"),
            train_digest=split_digest(sealed_splits(cfg), "train"),
        )


@pytest.fixture(scope="module")
def mlflow_ui(study) -> Iterator[str]:
    """`mlflow ui` on the study's stores, as `make ui` starts it; yields its base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", study.tracking]
    cmd += ["--default-artifact-root", str(artifact_root().resolve()), "--host", "127.0.0.1", "--port", str(port)]
    # One server process and no GenAI job runner: the same pages, a faster start on 2 cores.
    cmd += ["--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its own process group: `mlflow ui` runs uvicorn in a child process, stopped with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", 90, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a store left as the test wrote it: nothing to shut down cleanly
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dashboard(study) -> Iterator[str]:
    """optuna-dashboard's WSGI app on the study's storage, served from a thread; yields its URL."""
    from optuna_dashboard import wsgi

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: object) -> None:  # no access log in the test output
            pass

    server = make_server("127.0.0.1", _free_port(), wsgi(study.storage), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh browser tab (no UI settings remembered from another test). Its last view is saved as
    a PNG in `$SWEEP_UI_SCREENSHOTS` (else the test's tmp folder), to look at what the user saw."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    yield page
    folder = Path(os.environ.get("SWEEP_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{request.node.name}.png"), full_page=True)
    context.close()


def _run_ids(study) -> dict[str, str]:
    client = MlflowClient(study.tracking)
    experiment = client.get_experiment_by_name(study.cfg.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_name: r.info.run_id for r in runs} | {"experiment": experiment.experiment_id}


def _js(value: float) -> str:
    """How the MLflow UI prints a metric value (JavaScript's shortest round-trip form)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _row(page, first_cell: str):
    """The table row (params, metrics) whose first cell reads `first_cell`."""
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=first_cell, exact=True))


def test_runs_table_shows_the_study_with_its_trials_nested_and_pruned_apart(study, mlflow_ui, page):
    ids = _run_ids(study)
    page.goto(links.runs_table_url(mlflow_ui, ids["experiment"], study.cfg.study.name))
    run_links = page.locator(".ag-row a[href*='/runs/']")
    expect(run_links).to_have_text(["tiny"])  # the trials are nested under the parent run, collapsed
    # the link opens the runs table in model-training mode, not the GenAI overview
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    assert "/runs" in page.url and "overview" not in page.url
    parent_row = page.locator(".ag-row").filter(has=page.get_by_role("link", name="tiny", exact=True))
    parent_row.get_by_role("button").first.click()  # expand the parent run
    # a pruned trial reads apart from a failed one and from a finished one; roles and the champion are named
    expect(run_links).to_have_text(
        ["tiny", "trial-3 (linear probe)", "trial-2 (failed)", "trial-1 (pruned)", "trial-0 (champion)"]
    )
    # which data each run saw: the Dataset column names the splits with their digests
    expect(page.locator(".ag-center-cols-container")).to_contain_text(f"images/train ({study.train_digest})")


def test_the_ui_links_runs_table_shows_the_val_metrics_best_first(study, mlflow_ui, page):
    """A user's report: the runs table showed no metric column, so the winner was not visible."""
    (line, _) = links.study_links(study.cfg, mlflow_ui)
    page.goto(line.split(": ", 1)[1])
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    for metric in ("best_val_accuracy", "val_accuracy"):
        expect(page.locator(f"[role=columnheader][col-id='metrics.`{metric}`']")).to_be_visible()
    # sorted by best_val_accuracy, best first: the champion's run heads the (flat) list
    expect(page.locator(".ag-row a[href*='/runs/']").first).to_have_text("trial-0 (champion)")


def test_report_links_each_trial_to_its_run_in_the_training_view(study, mlflow_ui, page):
    ids = _run_ids(study)
    report = (study.result.folder / "report.md").read_text()
    base = links.ui_base(study.tracking)
    for name in ("trial-0 (champion)", "trial-3 (linear probe)"):
        number = name.split()[0].removeprefix("trial-")
        url = links.run_url(base, ids["experiment"], ids[name])
        assert f"[{number}]({url})" in report  # the trials table's number cell
        page.goto(url.replace(base, mlflow_ui))
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
        assert "evaluations" not in page.url and "traces" not in page.url


def test_a_trials_val_accuracy_chart_has_one_point_per_epoch(study, mlflow_ui, page):
    ids = _run_ids(study)
    page.goto(links.run_url(mlflow_ui, ids["experiment"], ids["trial-0 (champion)"], "model-metrics"))
    page.get_by_placeholder("Search metric charts").fill("val_accuracy")
    title = page.get_by_text("val_accuracy", exact=True)
    expect(title).to_be_visible()
    chart = title.locator("xpath=ancestor::*[.//*[contains(@class, 'scatterlayer')]][1]")
    points = chart.locator(".scatterlayer .trace").first.locator("path.point")
    expect(points).to_have_count(EPOCHS)
    steps = chart.locator(".xtick text").evaluate_all("ticks => ticks.map(t => t.textContent)")
    assert [float(s) for s in steps if float(s).is_integer()] == [float(e) for e in range(EPOCHS)], steps
    # the per-epoch learning rate is its own metric, not a second `lr` beside the param
    page.get_by_placeholder("Search metric charts").fill("lr")
    expect(page.get_by_text("epoch_lr", exact=True)).to_be_visible()
    assert page.get_by_text("lr", exact=True).count() == 0


def test_parent_run_says_what_the_study_found(study, mlflow_ui, page):
    ids = _run_ids(study)
    page.goto(links.run_url(mlflow_ui, ids["experiment"], study.parent))
    expect(page.get_by_text("Selected trial 0", exact=False)).to_be_visible()
    body = page.locator("body")
    expect(body).to_contain_text("Study tiny: 4 trials (2 complete, 1 pruned, 1 failed).")
    expect(body).to_contain_text(f"Sealed test split: test accuracy {study.result.test.accuracy:.3f}")
    expect(body).to_contain_text("Registered model: models:/tiny-classifier@champion (version 1).")
    for param, value in (("arch", "resnet18"), ("sampler", "random (seed=0)"), ("space.lr", "float [0.05, 0.3] log")):
        expect(_row(page, param)).to_contain_text(value)
    expect(_row(page, "selected_val_accuracy").get_by_role("cell")).to_have_text(
        ["selected_val_accuracy", _js(study.result.val_value)]
    )
    # the HTML report renders in the artifact viewer with its plots embedded
    page.goto(links.run_url(mlflow_ui, ids["experiment"], study.parent, "artifacts/report/report.html"))
    frame = page.frame_locator("iframe").first
    expect(frame.get_by_role("heading", name="Study report: tiny")).to_be_visible()
    images = frame.locator("img")
    expect(images).to_have_count(len([p for p in study.result.files if p.suffix == ".png"]))
    widths = images.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert min(widths) > 100, widths


def test_registered_model_shows_its_alias_and_test_figure(study, mlflow_ui, page):
    page.goto(links.model_url(mlflow_ui, "tiny-classifier"))
    version_row = page.get_by_role("row").filter(has_text="Version 1")
    expect(version_row).to_contain_text("champion")
    page.goto(f"{mlflow_ui}/#/models/tiny-classifier/versions/1")
    expect(page.locator("body")).to_contain_text(f"test accuracy {study.result.test.accuracy:.3f}")
    page.get_by_role("link", name="model", exact=True).click()  # the logged model behind the version
    test_row = _row(page, "test_accuracy")
    expect(test_row).to_contain_text(f"images/test (#{study.test_digest})")
    expect(test_row).to_contain_text("trial-0")
    # logged at its best epoch: the figures beside the test ones are that epoch's, not epoch 0's
    expect(_row(page, "val_accuracy")).to_contain_text(_js(study.result.val_value))
    expect(_row(page, "train_loss")).to_contain_text(_js(study.best_epoch_train_loss))


def test_optuna_dashboard_names_the_metric_and_keeps_trial_pages_narrow(study, dashboard, page):
    page.goto(f"{dashboard}/dashboard/studies/1")
    expect(page.locator(".g-ytitle").first).to_have_text("val_accuracy")
    assert page.get_by_text("Objective 0").count() == 0
    page.goto(f"{dashboard}/dashboard/studies/1/trials?numbers=0")
    attrs = page.get_by_text(re.compile(r"^epoch_0[01] \{"))
    expect(attrs).to_have_count(EPOCHS)
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= VIEWPORT["width"], f"trial page {width} px wide"
    assert page.get_by_text(re.compile(r"^checkpoint ")).count() == 0  # no pointer to a deleted file
