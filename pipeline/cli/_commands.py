"""`sweep` command line: each command parses, wires, calls one function and prints.

Errors of the `SweepError` family become one message on stderr and their exit code (config 2,
data 3, model 4, tracking 5 (also: a database, gRPC proxy or tracking server that does not answer),
study state 6, registry 7); any other exception is a bug: one line naming it, exit 1.
`sweep --debug ...` (or `SWEEP_DEBUG=1`) prints the full traceback first. Ctrl-C exits 130 and
SIGTERM 143 after the study is left consistent (re-run the same command to resume). Passwords in
URLs are masked (`***`) in every message. `sweep run --workers N` exits with the first failing
worker's code.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from rich.markup import escape

from pipeline.cli._console import PipeSafeConsole
from pipeline.core import SweepError, first_line, mask_text, urls_in

if TYPE_CHECKING:
    from pipeline.config import StudyConfig
    from pipeline.stages import StudyOutcome

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optuna sweeps over fine-tuning pretrained image classifiers, tracked in MLflow.",
)
err_console = PipeSafeConsole(stderr=True, highlight=False, soft_wrap=True)
out = PipeSafeConsole(highlight=False, soft_wrap=True)
settings = {"debug": False}  # set by the `--debug` option of the `sweep` callback
F = TypeVar("F", bound=Callable[..., Any])

StudyFile = Annotated[Path, typer.Argument(help="study YAML file", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: KEY.PATH=VALUE (repeatable)")]
StorageOpt = Annotated[Optional[str], typer.Option(help="Optuna storage URL (default sqlite under mlruns/)")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI")]


@app.callback()
def sweep(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="SWEEP_DEBUG", help="print the full traceback of an error")
    ] = False,
) -> None:
    """Optuna sweeps over fine-tuning pretrained image classifiers, tracked in MLflow."""
    settings["debug"] = debug


def _quiet_libraries() -> None:
    from pipeline.tracking import quiet_mlflow

    quiet_mlflow()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def handled(fn: F) -> F:
    """Map the error family to one message + exit code; interrupts to 130/143; anything else
    (a bug) to one line and exit 1. With `--debug`, the traceback is printed first."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()  # the heavy imports: an interrupt here still exits at once (pipeline.cli)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_sigterm)
        urls = urls_in([*sys.argv, *args, *kwargs.values()])  # their secrets are masked in every message
        try:
            return fn(*args, **kwargs)
        except SweepError as err:
            _traceback(urls)
            err_console.print(f"[red]error:[/] {escape(mask_text(str(err), urls))}")
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:
            from pipeline.core import left_behind
            from pipeline.search import Interrupted

            _traceback(urls)
            sig = "SIGTERM" if isinstance(err, Interrupted) else "Ctrl-C"
            err_console.print(f"[yellow]interrupted ({sig}):[/] {escape(left_behind(fn.__name__, err))}")
            raise typer.Exit(143 if sig == "SIGTERM" else 130) from None
        except (typer.Exit, typer.Abort):  # a command's own exit code (e.g. a failing worker's) passes on
            raise
        except Exception as err:  # noqa: BLE001  (the last resort: a bug, never a bare traceback)
            _traceback(urls)
            hint = "" if settings["debug"] else "; rerun with `sweep --debug` (or SWEEP_DEBUG=1) for the traceback"
            shown = escape(mask_text(first_line(err), urls))
            err_console.print(f"[red]error:[/] unexpected {type(err).__name__}: {shown}{hint}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _raise_sigterm(signum: int, frame: object) -> None:
    from pipeline.search import Interrupted

    raise Interrupted("SIGTERM")


def _traceback(urls: list[str]) -> None:
    # --debug shows the whole traceback, but a password in a URL stays masked there too.
    if settings["debug"]:
        err_console.print(mask_text(traceback.format_exc(), urls), markup=False, highlight=False, end="")


def _load(study_file: Path, sets: list[str] | None, **extra: object) -> StudyConfig:
    from pipeline.config import load_study

    overrides = list(sets or [])
    overrides += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return load_study(study_file, overrides)


@app.command()
@handled
def run(
    study_file: StudyFile,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    n_trials: Annotated[Optional[int], typer.Option(help="finished trials the study should reach")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="stop starting trials after SECONDS")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    accept_changes: Annotated[bool, typer.Option(help="resume although the study file changed")] = False,
    report: Annotated[bool, typer.Option(help="run the report stage after the study")] = True,
    workers: Annotated[
        int, typer.Option(min=1, help="worker processes on this machine, sharing the study's storage")
    ] = 1,
) -> None:
    """Run (or resume) the study: pre-flight, trials with pruning, MLflow nested runs."""
    from optuna.trial import TrialState

    from pipeline.cli._display import ProgressDisplay
    from pipeline.distributed import apply_worker_threads, forwarded_args
    from pipeline.stages import run_study

    apply_worker_threads()
    cfg = _load(study_file, set_, **{"study.n_trials": n_trials, "study.timeout": timeout})
    if workers > 1:
        forwarded = forwarded_args(set_, storage, tracking_uri, n_trials, timeout, accept_changes)
        _run_workers(cfg, study_file, forwarded, workers, storage, tracking_uri, report)
        return
    with ProgressDisplay(cfg.study.n_trials, quiet=quiet) as display:
        outcome = run_study(
            cfg, storage=storage, tracking=tracking_uri, observers=[display], accept_changes=accept_changes
        )
    _print_summary(outcome)
    _print_cache(cfg)
    running = len(outcome.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if report and running:
        out.print(
            f"report left to the last worker: {running} trial(s) still running elsewhere "
            "(or run `sweep report` once they end)",
            markup=False,
        )
    elif report:
        _report_after_trials(cfg, storage, tracking_uri)


def _report_after_trials(cfg: StudyConfig, storage: str | None, tracking_uri: str | None) -> None:
    """`sweep run`'s report stage: an interrupt here says the trials had ended (`left_behind`)."""
    from pipeline.core import IN_REPORT

    try:
        _report(cfg, storage, tracking_uri)
    except KeyboardInterrupt as err:
        err.add_note(IN_REPORT)
        raise


def _run_workers(
    cfg: StudyConfig,
    study_file: Path,
    forwarded: list[str],
    count: int,
    storage: str | None,
    tracking_uri: str | None,
    report: bool,
) -> None:
    """`--workers N`: check the stores once, start N `sweep run --no-report --quiet` workers, wait,
    then (all succeeded) print the study's counts and run the report once."""
    from pipeline.config import storage_url
    from pipeline.distributed import check_storage_for_workers, exit_code, launch_workers
    from pipeline.search import load_existing
    from pipeline.stages import check_stores

    check_storage_for_workers(storage_url(cfg, storage), count)
    check_stores(cfg, storage, tracking_uri)
    command = [sys.executable, "-m", "pipeline", "run", str(study_file), "--no-report", "--quiet", *forwarded]
    codes = launch_workers(command, count)
    out.print(f"{count} workers ended with exit codes {', '.join(map(str, codes))}", markup=False)
    code = exit_code(codes)
    if code:
        raise typer.Exit(code)
    study = load_existing(cfg, storage)
    out.print(f"study '{study.study_name}' after {count} workers: {_counts(study)}", markup=False)
    if report:
        _report_after_trials(cfg, storage, tracking_uri)


def _counts(study: Any) -> str:
    """'3 complete, 2 pruned, 1 failed' for the study's trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    words = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    return ", ".join(f"{sum(t.state == s for t in trials)} {word}" for s, word in words.items())


def _print_summary(outcome: StudyOutcome) -> None:
    from optuna.trial import TrialState

    out.print(f"study '{outcome.study.study_name}': {_counts(outcome.study)} ({outcome.stop_reason})", markup=False)
    if outcome.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        from pipeline.search import role

        best = outcome.study.best_trial
        params = f" params {best.params}" if best.params else ""  # the linear probe samples none
        out.print(f"best trial {best.number} ({role(best)}): value {best.value:.4f}{params}", markup=False)
    out.print(f"MLflow parent run {outcome.parent_run_id}", markup=False)


def _print_cache(cfg: StudyConfig) -> None:
    from pipeline import data as D

    if cfg.cache.decoded_images and cfg.cache.max_disk_mb == 0:
        out.print("cache: cache.max_disk_mb 0: decoded images were kept in memory only", markup=False)
    elif cfg.cache.decoded_images and D.cache_folder().exists():
        out.print(D.cache_summary(D.cache_folder(), cfg.cache.max_disk_mb), markup=False)


def _report(cfg: StudyConfig, storage: str | None, tracking_uri: str | None, out_dir: Path | None = None) -> None:
    """The report stage under the study's report lock: never two at once for one study, on any
    machine; the second one finds the test evaluation and the model version already recorded."""
    from pipeline.cli._display import passes_shown
    from pipeline.stages import run_report

    with passes_shown():
        result = run_report(
            cfg, storage=storage, tracking=tracking_uri, out=out_dir, on_wait=lambda m: out.print(m, markup=False)
        )
    out.print(result.summary(), markup=False)


@app.command()
@handled
def report(
    study_file: StudyFile,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="report folder (default reports/<study>)")] = None,
) -> None:
    """Compare the trials, choose the champion (baselines and seed re-runs, see README), test it once on
    the sealed test split, register it and move the alias."""
    _report(_load(study_file, set_), storage, tracking_uri, out_dir)


@app.command("storage-proxy")
@handled
def storage_proxy(
    storage_url: Annotated[
        str, typer.Argument(help="the study database: postgresql://..., mysql://..., sqlite:///...", show_default=False)
    ],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on")] = 13000,
) -> None:
    """Serve the study database to many workers over gRPC (Optuna's storage proxy); workers use
    --storage grpc://HOST:PORT. Runs until stopped (Ctrl-C, SIGTERM)."""
    from pipeline.distributed import serve_storage_proxy

    try:
        serve_storage_proxy(storage_url, host, port, announce=lambda m: out.print(m, markup=False))
    except KeyboardInterrupt:
        out.print("storage proxy stopped", markup=False)


@app.command()
@handled
def status(study_file: StudyFile, set_: SetOpt = None, storage: StorageOpt = None) -> None:
    """Print the trials table so far (reads the Optuna storage only; changes nothing)."""
    from pipeline.champion import trials_frame
    from pipeline.search import load_existing

    cfg = _load(study_file, set_)
    frame = trials_frame(load_existing(cfg, storage), cfg)
    shown = frame.to_string(index=False, float_format="{:.4g}".format) if len(frame) else "no trials yet"
    out.print(shown, markup=False)


@app.command()
@handled
def predict(
    model_uri: Annotated[str, typer.Argument(help="e.g. models:/NAME@champion or models:/NAME/3", show_default=False)],
    images: Annotated[list[Path], typer.Argument(help="image files or folders", show_default=False)],
    tracking_uri: TrackingOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="JSON lines: file, label, probability, probabilities")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 32,
) -> None:
    """Predict the class of each image with a registered model (label and probability)."""
    from pipeline.cli._display import render_predictions
    from pipeline.registry import predict_files

    rendered = render_predictions(predict_files(model_uri, images, tracking_uri, batch_size), json_)
    if json_:
        typer.echo(rendered)  # plain stdout: rich would wrap long JSON lines
    else:
        out.print(rendered)


@app.command()
@handled
def cache(
    clear: Annotated[bool, typer.Option("--clear", help="delete every decoded image in the cache")] = False,
    unused_days: Annotated[
        Optional[float], typer.Option(min=0, help="delete only the entries not used for DAYS days")
    ] = None,
) -> None:
    """Show (or clear) the decoded-image cache under $SWEEP_HOME/cache/decoded; a run only decodes
    deleted entries again, nothing else is lost."""
    from pipeline import data as D

    folder = D.cache_folder()
    if clear or unused_days is not None:
        gone = D.clear_cache(folder, None if unused_days is None else unused_days * 86400)
        out.print(f"deleted {gone.entries} decoded image(s), {gone.bytes / 2**20:.1f} MiB", markup=False)
    out.print(D.cache_summary(folder), markup=False)


@app.command("ui-links")
@handled
def ui_links(
    study_file: StudyFile,
    set_: SetOpt = None,
    tracking_uri: TrackingOpt = None,
    base_url: Annotated[str, typer.Option(help="where `mlflow ui` serves")] = "http://127.0.0.1:5000",
) -> None:
    """Print the MLflow UI links of the study: its runs table and its registered model."""
    from pipeline.tracking import study_links

    out.print("\n".join(study_links(_load(study_file, set_), base_url, tracking_uri)), markup=False)


@app.command("check-weights")
@handled
def check_weights(study_file: StudyFile, set_: SetOpt = None) -> None:
    """Exit 0 when the study's pretrained weights are cached or downloadable, else say why."""
    from pipeline import models as M

    cfg = _load(study_file, set_)
    spec = M.resolve_weights(cfg.model.arch, cfg.model.weights)
    M.build_model(spec, 2)
    out.print(f"{spec.origin()} for {cfg.model.arch}: available")
