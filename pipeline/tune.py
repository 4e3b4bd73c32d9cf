"""The Optuna side: search space, samplers and pruners by name, the objective, the study loop.

Semantics (../shared/DESIGN.md):
- A trial reports `val_accuracy` (or `val_loss`) once per epoch, `step = epoch` (0-based); the
  pruner decides right after each report.
- The trial's value is its best validation metric over the epochs it ran, and that epoch's
  weights are its checkpoint: the last epoch is often past the best one under a step LR.
- `n_trials` counts finished trials (COMPLETE + PRUNED); FAIL trials do not count, so a study
  resumed after a crash still reaches `n_trials`. `max_failed_trials` bounds a failing study.
- Storage is Optuna's RDB storage with heartbeats: a trial whose process died (kill -9) turns
  FAIL on the next start and `RetryFailedTrialCallback` re-queues its parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from pipeline import data as D
from pipeline import model as M
from pipeline.checkpoints import TrialCheckpoint
from pipeline.config import CategoricalParam, FloatParam, IntParam, StudyConfig
from pipeline.errors import ModelError, StudyStateError, TrackingError
from pipeline.stores import check_writable, default_tracking_uri, store_lock
from pipeline.track import PARENT_ATTR, REASON_TAG, Tracker, reconcile
from pipeline.train import NonFiniteLossError, build_training, fit, pick_device

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
FINGERPRINT_ATTR = "sweep_fingerprint"


# ---- names -> Optuna objects ---------------------------------------------------------------------

def suggest(trial: optuna.Trial, space: dict) -> dict[str, Any]:
    """Sample every search-space entry with the matching `trial.suggest_*` call."""
    params = {}
    for name, p in space.items():
        if isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            params[name] = trial.suggest_categorical(name, list(p.choices))
    return params


def grid(space: dict) -> dict[str, list]:
    """The full grid for `GridSampler`: int/stepped-float ranges enumerated, choices as given."""
    out = {}
    for name, p in space.items():
        if isinstance(p, CategoricalParam):
            out[name] = list(p.choices)
        elif isinstance(p, IntParam):
            out[name] = list(range(p.low, p.high + 1, p.step))
        else:
            n = int(math.floor((p.high - p.low) / p.step + 1e-9))
            out[name] = [round(p.low + i * p.step, 12) for i in range(n + 1)]
    return out


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """Sampler by name: tpe (default), random, grid, cmaes, qmc; seeded by `study.sampler.seed`."""
    s = cfg.study.sampler
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.type == "grid":
        return optuna.samplers.GridSampler(grid(cfg.search_space), seed=s.seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
    return optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruner by name: median (default), percentile, successive_halving, hyperband, none."""
    p, epochs = cfg.study.pruner, cfg.training.epochs
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.n_startup_trials,
                                               n_warmup_steps=p.n_warmup_steps)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


# ---- places on disk ------------------------------------------------------------------------------

def home() -> Path:
    """The embedded store folder: `$SWEEP_HOME` or `./mlruns`."""
    return Path(os.environ.get("SWEEP_HOME", "mlruns"))


def storage_url(cfg: StudyConfig, override: str | None = None) -> str:
    return override or cfg.study.storage or f"sqlite:///{(home() / 'optuna.db').resolve()}"


def tracking_uri(cfg: StudyConfig, override: str | None = None) -> str:
    return override or cfg.tracking.uri or default_tracking_uri(home())


def checkpoint_dir(study_name: str) -> Path:
    return home() / "checkpoints" / study_name


# ---- pre-flight ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """Everything checked once before the first trial."""

    splits: D.Splits
    spec: M.WeightsSpec
    state: dict | None  # preloaded pretrained state_dict (torchvision/local), shared by trials
    preprocess: D.Preprocess
    stage_names: tuple[str, ...]
    load_report: M.LoadReport


def prepare(cfg: StudyConfig, progress: Callable[[int, int], None] | None = None,
            warn: Callable[[str], None] = print) -> Prepared:
    """Pre-flight: scan data, resolve and load weights, check freeze depths fit the arch.

    Data warnings (a class missing from val/test) and skipped images go to `warn`, one line each.

    Raises:
        DataError, ModelError: with a message naming the folder, file or key.
    """
    import warnings

    d = cfg.data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = D.build_splits(d.root, d.train, d.val, d.test, d.test_fraction, d.seed)
    for w in caught:
        warn(f"warning: {w.message}")
    splits = D.scan_images(splits, d.bad_images, progress)
    if splits.skipped:
        warn(f"data.bad_images: skip: training without {len(splits.skipped)} unreadable image(s): "
             f"{', '.join(splits.skipped)} (listed in splits.json)")
    spec = M.resolve_weights(cfg.model.arch, cfg.model.weights)
    state = M.pretrained_state(spec)
    model, report = M.build_model(spec, len(splits.class_to_idx), state)
    base = M.weights_preprocess(spec, model)
    pp = M.resolve_preprocess(base, d.image_size, cfg.model.preprocess)
    deepest = _max_freeze_depth(cfg)
    names: tuple[str, ...] = ()
    if deepest > 0:
        names = tuple(n for n, _ in M.stages(model, cfg.model.arch))
        if deepest > len(names):
            raise ModelError(
                f"search_space.freeze_depth / training.freeze_depth: up to {deepest} but "
                f"{cfg.model.arch} has {len(names)} stages ({', '.join(names)}); lower the high bound"
            )
    return Prepared(splits, spec, state, pp, names, report)


def _max_freeze_depth(cfg: StudyConfig) -> int:
    p = cfg.search_space.get("freeze_depth")
    if isinstance(p, IntParam):
        return p.high
    if isinstance(p, CategoricalParam):
        return max(int(c) for c in p.choices)
    return cfg.training.freeze_depth


# ---- the study -----------------------------------------------------------------------------------

def fingerprint(cfg: StudyConfig) -> dict[str, Any]:
    """What must not change under a stored study: space, data, model, metric, direction."""
    dump = cfg.model_dump(mode="json")
    return {
        "search_space": dump["search_space"],
        "data": {k: dump["data"][k] for k in ("root", "train", "val", "test", "test_fraction", "seed", "image_size")},
        "model": dump["model"],
        "metric": dump["study"]["metric"],
        "direction": dump["study"]["direction"],
    }


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def open_study(cfg: StudyConfig, storage: str, accept_changes: bool = False) -> optuna.Study:
    """Create or resume the study in `storage` (heartbeat-enabled RDB storage).

    Raises:
        StudyStateError: the stored study was made from a different space/data/model/metric.
        TrackingError: the storage cannot be opened.
    """
    grace = cfg.study.grace_period or 2 * cfg.study.heartbeat_interval
    _check_local_paths(storage)
    try:
        with store_lock(storage):
            rdb = optuna.storages.RDBStorage(
                storage, heartbeat_interval=cfg.study.heartbeat_interval, grace_period=grace,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=cfg.study.max_retries),
                engine_kwargs={"connect_args": {"timeout": 30}} if storage.startswith("sqlite") else None,
            )
            study = optuna.create_study(storage=rdb, study_name=cfg.study.name, direction=cfg.study.direction,
                                        sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True)
    except Exception as err:
        raise TrackingError(f"Optuna storage {storage} cannot be opened: {str(err).splitlines()[0]}") from None
    new = fingerprint(cfg)
    old = study.user_attrs.get(FINGERPRINT_ATTR)
    if old is None:
        study.set_user_attr(FINGERPRINT_ATTR, new)
    elif old != new:
        if not accept_changes:
            changed = "\n  ".join(_changes(old, new))
            raise StudyStateError(
                f"study '{cfg.study.name}' in {storage} was created with different settings:\n  {changed}\n"
                f"Start a new study (--set study.name=NEW_NAME), or resume with these changes "
                f"(--accept-changes)"
            )
        study.set_user_attr(FINGERPRINT_ATTR, new)
    return study


def count(study: optuna.Study, states=FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


class Reporter:
    """Progress hooks; the CLI passes a rich implementation, tests a silent one."""

    def preflight(self, done: int, total: int) -> None: ...
    def trial_start(self, number: int, params: dict, epochs: int) -> None: ...
    def epoch(self, number: int, result) -> None: ...
    def trial_end(self, number: int, state: str, value: float | None, note: str = "") -> None: ...
    def message(self, text: str) -> None: ...


class Interrupted(KeyboardInterrupt):
    """SIGTERM received; raised inside the trial so it ends FAIL and the parent run KILLED."""


@dataclass
class Objective:
    """One call = one trial: sample, build, fine-tune, report per epoch, checkpoint, log."""

    cfg: StudyConfig
    prep: Prepared
    tracker: Tracker
    reporter: Reporter

    def __call__(self, trial: optuna.Trial) -> float:
        start = time.perf_counter()
        history: list[dict] = []
        run_id = None
        try:
            cfg = self.cfg.with_params(suggest(trial, self.cfg.search_space))
            run_id = self._start_run(cfg, trial)
            self.reporter.trial_start(trial.number, trial.params, cfg.training.epochs)

            def on_epoch(result) -> None:
                history.append(dataclasses.asdict(result))
                trial.set_user_attr("history", history)
                self.tracker.log_metrics(run_id, result.metrics(), step=result.epoch)
                self.reporter.epoch(trial.number, result)
                trial.report(getattr(result, cfg.study.metric), step=result.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {result.epoch}")

            torch.manual_seed(cfg.data.seed + trial.number)
            fitted = self._fit(cfg, trial.number, on_epoch)
        except optuna.TrialPruned:
            self._finish(trial, run_id, "PRUNED", start, history)
            raise
        except BaseException as err:
            reason = _reason(err)
            trial.set_user_attr("fail_reason", reason)
            interrupted = isinstance(err, KeyboardInterrupt)
            if interrupted:
                trial.set_user_attr("interrupted", True)
            self._finish(trial, run_id, "FAIL", start, history, {REASON_TAG: reason},
                         status="KILLED" if interrupted else None)
            raise
        path = self._save_checkpoint(cfg, trial, fitted)
        trial.set_user_attr("best_epoch", fitted.best_epoch)
        trial.set_user_attr("checkpoint", str(path))
        self.tracker.log_metrics(run_id, {f"best_{cfg.study.metric}": fitted.best_value,
                                          "best_epoch": fitted.best_epoch}, step=len(history) - 1)
        self._finish(trial, run_id, "COMPLETE", start, history, {"sweep.best_epoch": str(fitted.best_epoch)})
        return fitted.best_value

    def _start_run(self, cfg: StudyConfig, trial: optuna.Trial) -> str | None:
        params = {**trial.params, **_resolved_params(cfg)}
        run_id = self.tracker.start_trial(cfg.study.name, trial.number, params)
        trial.set_user_attr("mlflow_run_id", run_id)
        # Who runs this trial: a later start on this host fails it at once if the pid is gone.
        # A retried trial inherits the failed one's user attrs: reset what described that run.
        for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "history": [],
                           "fail_reason": None, "interrupted": False}.items():
            trial.set_user_attr(key, value)
        frozen = trial.study._storage.get_trial(trial._trial_id)
        retry_of = optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
            self.tracker.set_tags(run_id, {"sweep.retry_of": str(retry_of)})
        return run_id

    def _fit(self, cfg: StudyConfig, number: int, on_epoch):
        t, d, prep = cfg.training, cfg.data, self.prep
        model, _ = M.build_model(prep.spec, len(prep.splits.class_to_idx), prep.state)
        frozen = M.freeze(model, cfg.model.arch, t.freeze_depth)
        optimizer, scheduler = build_training(model, t)
        train_loader = D.make_loader(prep.splits.root, prep.splits.train,
                                     D.train_transform(prep.preprocess, t.aug_strength),
                                     d.batch_size, d.num_workers, shuffle=True, seed=d.seed + number)
        val_loader = D.make_loader(prep.splits.root, prep.splits.val, D.eval_transform(prep.preprocess),
                                   d.batch_size, d.num_workers, shuffle=False)
        return fit(model, train_loader, val_loader, epochs=t.epochs, optimizer=optimizer,
                   scheduler=scheduler, criterion=torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
                   device=pick_device(t.device), frozen=frozen, metric=cfg.study.metric, amp=t.amp,
                   channels_last=t.channels_last, on_epoch=on_epoch)

    def _save_checkpoint(self, cfg: StudyConfig, trial: optuna.Trial, fitted) -> Path:
        return TrialCheckpoint(
            state_dict=fitted.best_state, arch=cfg.model.arch, weights_origin=self.prep.spec.origin(),
            class_to_idx=self.prep.splits.class_to_idx, preprocess=self.prep.preprocess.to_dict(),
            trial_number=trial.number, best_epoch=fitted.best_epoch, metric=cfg.study.metric,
            value=fitted.best_value, params=trial.params,
        ).save(TrialCheckpoint.path_for(cfg.study.name, trial.number))

    def _finish(self, trial, run_id, state: str, start: float, history: list, tags=None,
                status: str | None = None) -> None:
        seconds = time.perf_counter() - start
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("epochs_run", len(history))
        self.tracker.end_trial(run_id, state, {"sweep.seconds": f"{seconds:.1f}", **(tags or {})}, status)
        best = None
        if history:
            values = [h[self.cfg.study.metric] for h in history]
            best = max(values) if self.cfg.study.direction == "maximize" else min(values)
        self.reporter.trial_end(trial.number, state, best, tags.get(REASON_TAG, "") if tags else "")


def _resolved_params(cfg: StudyConfig) -> dict[str, Any]:
    t = cfg.training
    return {"arch": cfg.model.arch, "weights": cfg.model.weights, "epochs": t.epochs, "optimizer": t.optimizer,
            "lr": t.lr, "momentum": t.momentum, "weight_decay": t.weight_decay, "nesterov": t.nesterov,
            "label_smoothing": t.label_smoothing, "freeze_depth": t.freeze_depth,
            "aug_strength": t.aug_strength, "batch_size": cfg.data.batch_size,
            "scheduler": t.scheduler.type, "step_size": t.scheduler.step_size, "gamma": t.scheduler.gamma}


def _reason(err: BaseException) -> str:
    if isinstance(err, Interrupted):
        return "interrupted (SIGTERM)"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(err, NonFiniteLossError):
        return f"non-finite loss: {err}"
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory: lower data.batch_size or data.image_size"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(err).__name__}: {text}{where}"[:1000]


@dataclass(frozen=True)
class StudyOutcome:
    study: optuna.Study
    parent_run_id: str | None
    stop_reason: str  # "n_trials reached" | "timeout" | "too many failed trials" | "grid exhausted"
    tracking_ok: bool


def run_study(cfg: StudyConfig, *, storage: str | None = None, tracking: str | None = None,
              reporter: Reporter | None = None, accept_changes: bool = False) -> StudyOutcome:
    """Pre-flight, then run trials until `n_trials` finished trials exist (or timeout / failures).

    Re-running with the same study file resumes: the Optuna study and its MLflow parent run are
    reused, stale trials of a killed process are failed and their parameters retried.

    Raises:
        ConfigError, DataError, ModelError, TrackingError, StudyStateError: before any trial.
        KeyboardInterrupt: after the current trial is recorded FAIL and the parent run KILLED.
    """
    reporter = reporter or Reporter()
    storage = storage_url(cfg, storage)
    tracking = tracking_uri(cfg, tracking)
    _check_local_paths(storage, tracking)
    if tracking.startswith("sqlite:///"):
        check_writable(home() / "artifacts")
    # Pre-flight first: a bad data folder or weights value must not leave a stored study behind
    # whose fingerprint would then refuse the corrected study file.
    prep = prepare(cfg, reporter.preflight, reporter.message)
    study = open_study(cfg, storage, accept_changes)
    tracker = Tracker(tracking, cfg.experiment_name, home() / "artifacts", warn=reporter.message)
    parent = tracker.open_parent(cfg.study.name, study.user_attrs.get(PARENT_ATTR),
                                 {"sweep.storage": storage, "sweep.arch": cfg.model.arch})
    study.set_user_attr(PARENT_ATTR, parent)
    tracker.log_text(parent, cfg.to_yaml(), "study.yaml")
    tracker.log_text(parent, prep.splits.to_json(), "splits.json")
    tracker.set_tags(parent, {"sweep.load_report": prep.load_report.describe(),
                              "sweep.preprocess": json.dumps(prep.preprocess.to_dict())})
    recover(study, cfg.study.max_retries)
    synced = reconcile(tracker, study.get_trials(deepcopy=False), cfg.study.name)
    if synced:
        reporter.message(f"MLflow: created the missing runs of trial(s) {', '.join(map(str, synced))} from Optuna's record")
    objective = Objective(cfg, prep, tracker, reporter)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    status = "FAILED"
    try:
        reason = _loop(study, objective, cfg, reporter)
        status = "FINISHED"
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        # With several workers, the last one to finish closes the parent run.
        if status != "FINISHED" or not count(study, (TrialState.RUNNING,)):
            tracker.close_parent(status)
    return StudyOutcome(study, parent, reason, tracker.healthy)


def _raise_interrupted(signum, frame):
    raise Interrupted("SIGTERM")


def _loop(study: optuna.Study, objective: Objective, cfg: StudyConfig, reporter: Reporter) -> str:
    deadline = time.monotonic() + cfg.study.timeout if cfg.study.timeout else None
    failed_at_start = count(study, (TrialState.FAIL,))
    grid_size = math.prod(len(v) for v in grid(cfg.search_space).values()) if cfg.study.sampler.type == "grid" else None
    while True:
        if count(study) >= cfg.study.n_trials:
            return "n_trials reached"
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        if count(study, (TrialState.FAIL,)) - failed_at_start >= cfg.study.max_failed_trials:
            reporter.message(f"stopping: {cfg.study.max_failed_trials} trials failed in this run "
                             "(see sweep.fail_reason on their MLflow runs)")
            return "too many failed trials"
        if grid_size is not None and count(study) >= grid_size:
            return "grid exhausted"
        reseed(study, cfg.study.sampler.seed)
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def reseed(study: optuna.Study, seed: int | None) -> None:
    """Seed the sampler from the number of trials so far, before each trial.

    A sampler seeded once per process replays the same draws in every process: each resume
    would re-try trial 0's parameters and two workers would duplicate each other. Seeding with
    `seed + len(trials)` keeps one worker's study reproducible and gives concurrent workers
    different draws (another worker's running trial shifts the seed by this process's pid).
    QMC samplers index their sequence by trial number already and are left alone.
    """
    if seed is None:
        return
    from optuna.samplers._lazy_random_state import LazyRandomState

    trials = study.get_trials(deepcopy=False)
    busy = any(t.state == TrialState.RUNNING for t in trials)
    value = (seed + len(trials)) % (2**32)
    if busy:  # mix, not add: pids and counts both step by one, and sums of them collide
        value = zlib.crc32(f"{seed}:{len(trials)}:{os.getpid()}".encode())
    sampler = study.sampler
    for owner in (sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None)):
        for attr in ("_rng", "_cma_rng"):
            if owner is not None and isinstance(getattr(owner, attr, None), LazyRandomState):
                setattr(owner, attr, LazyRandomState(value))


RETRIED_ATTR = "retried_trials"


def recover(study: optuna.Study, max_retries: int) -> list[int]:
    """Fail trials whose process died and re-queue the parameters of died or interrupted trials.

    A RUNNING trial is dead when its heartbeat is older than the grace period (any machine) or
    when it was started on this host by a process that no longer exists (no need to wait for the
    grace period after a `kill -9`). Trials that were FAIL because of Ctrl-C/SIGTERM or a dead
    process are re-queued once each, up to `max_retries` deep, via `RetryFailedTrialCallback`.

    Returns:
        Numbers of the trials whose parameters were re-queued.
    """
    optuna.storages.fail_stale_trials(study)
    storage, host = study._storage, socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid and not _alive(pid):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    done = set(study.user_attrs.get(RETRIED_ATTR, []))
    retry = optuna.storages.RetryFailedTrialCallback(max_retry=max_retries)
    queued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        died = not t.user_attrs.get("fail_reason") or t.user_attrs.get("interrupted")
        if died and t.number not in done and not _already_retried(study, t.number):
            retry(study, t)
            queued.append(t.number)
    if queued:
        study.set_user_attr(RETRIED_ATTR, sorted(done | set(queued)))
    return queued


def _already_retried(study: optuna.Study, number: int) -> bool:
    """True when some trial's retry history names `number` (e.g. queued by the heartbeat check)."""
    return any(number in t.system_attrs.get("retry_history", []) for t in study.get_trials(deepcopy=False))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_local_paths(*uris: str) -> None:
    """Fail early, naming the folder, when an embedded store cannot be written."""
    for uri in uris:
        if uri.startswith("sqlite:///"):
            check_writable(Path(uri.removeprefix("sqlite:///")).parent)


def load_existing(cfg: StudyConfig, storage: str | None = None) -> optuna.Study:
    """Open a stored study read-only in spirit: no heartbeat, no fingerprint write.

    Raises:
        StudyStateError: no study of that name in the storage.
    """
    url = storage_url(cfg, storage)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise StudyStateError(f"no Optuna storage at {url}: run `sweep run` with this study file first")
    try:
        return optuna.load_study(study_name=cfg.study.name, storage=url)
    except KeyError:
        raise StudyStateError(
            f"no study named '{cfg.study.name}' in {url}: run `sweep run` with this study file first"
        ) from None
