"""`sweep run --workers N` on one machine: N processes of the same worker command on one study.

Each worker is an ordinary `sweep run ... --no-report` process joining the study through its storage
(Optuna hands every process its own trials), so the launcher only shares out the machine:

- CPU threads: the CPUs this process may use are split between the workers (the first
  `cpus % N` workers get one more). Each child gets `SWEEP_THREADS`, `OMP_NUM_THREADS` and
  `MKL_NUM_THREADS`; the child calls `apply_worker_threads()` early, which passes `SWEEP_THREADS` to
  `torch.set_num_threads`, so N workers do not oversubscribe the cores N-fold.
- GPUs: with several visible GPUs, worker i sees only GPU `i mod gpus` (`CUDA_VISIBLE_DEVICES`,
  taken from the inherited list when one is set); with one GPU or none, nothing is pinned.
- Signals: SIGINT and SIGTERM sent to the launcher are forwarded once to every live worker, which
  then ends its running trial as it would alone. The workers run in their own process group, so a
  Ctrl-C in the terminal reaches them only through the launcher, exactly once.

A plain SQLite file is refused for N > 1 (`check_storage_for_workers`): it allows one writer at a
time and Optuna advises against it for parallel workers; a journal file or a database server is the
tool for that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from pipeline.config import sqlite_path
from pipeline.core import ConfigError, SweepError, TrackingError, mask_url

THREADS_ENV = "SWEEP_THREADS"
INDEX_ENV = "SWEEP_WORKER_INDEX"  # 0-based index of this worker among the launched ones
COUNT_ENV = "SWEEP_WORKERS"  # how many workers the launcher started
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def visible_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which honours `taskset` and cpusets), >= 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus() -> int:
    """CUDA devices torch can see (0 without CUDA); already limited by `CUDA_VISIBLE_DEVICES`."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_storage_for_workers(storage: str, count: int) -> None:
    """Refuse a worker count the storage cannot serve.

    Args:
        storage: Optuna storage URL the workers will share.
        count: number of worker processes, >= 1.

    Raises:
        ConfigError: `count` < 1.
        TrackingError: `count` > 1 on a plain SQLite file; names journal storage and a server instead.
    """
    if count < 1:
        raise ConfigError(f"--workers {count}: give at least 1 worker process")
    path = sqlite_path(storage)
    if count > 1 and storage.startswith("sqlite:"):
        # journal:/// + an absolute path gives the four slashes of an absolute journal URL.
        journal = f"journal:///{path.with_suffix('.journal')}" if path is not None else "journal:///FILE.journal"
        raise TrackingError(
            f"--workers {count} cannot share the SQLite storage {mask_url(storage)}: SQLite takes one writer at "
            f"a time and Optuna advises against it for parallel workers; use a journal file "
            f"(--storage {journal}) or a database server (--storage postgresql://USER@HOST/DB)"
        )


def worker_env(
    index: int, count: int, cpu_count: int, gpu_count: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of worker `index` (0-based) of `count`: `base` (default: this process's
    environment) plus its share of the CPU threads and, with several GPUs, its GPU.

    Args:
        index: the worker's index, 0 <= index < count.
        count: number of workers started together.
        cpu_count: CPUs to share out (`visible_cpus()`).
        gpu_count: visible GPUs (`visible_gpus()`); > 1 pins one GPU per worker, round-robin when
            there are more workers than GPUs.
        base: the environment to start from.

    Raises:
        ValueError: `index` outside `0..count-1`, or `count` / `cpu_count` < 1.
    """
    if count < 1 or cpu_count < 1 or not 0 <= index < count:
        raise ValueError(f"worker {index} of {count} on {cpu_count} CPUs: need 0 <= index < count and counts >= 1")
    env = dict(os.environ if base is None else base)
    threads = max(1, cpu_count // count + (1 if index < cpu_count % count else 0))
    env.update(
        {
            THREADS_ENV: str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            INDEX_ENV: str(index),
            COUNT_ENV: str(count),
        }
    )
    if gpu_count > 1:
        inherited = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        devices = inherited[:gpu_count] if len(inherited) >= gpu_count else [str(i) for i in range(gpu_count)]
        env["CUDA_VISIBLE_DEVICES"] = devices[index % gpu_count]
    return env


def worker_threads(env: Mapping[str, str] | None = None) -> int | None:
    """The thread count a launcher gave this worker (`SWEEP_THREADS`), None when not launched by one.

    Raises:
        ConfigError: `SWEEP_THREADS` is set but not a positive integer.
    """
    raw = (os.environ if env is None else env).get(THREADS_ENV)
    if raw is None or raw == "":
        return None
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"{THREADS_ENV}={raw!r}: not a positive number of threads; unset it or give one like 4")
    return threads


def apply_worker_threads() -> int | None:
    """In a worker: apply `SWEEP_THREADS` with `torch.set_num_threads`; returns it (None: unchanged).

    Raises:
        ConfigError: from `worker_threads`.
    """
    threads = worker_threads()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return threads


def exit_code(codes: Sequence[int]) -> int:
    """One exit code for the launcher: 0 when every worker succeeded, else the first failing
    worker's code (a worker ended by signal S counts as 128 + S, as a shell reports it)."""
    for code in codes:
        if code != 0:
            return code if code > 0 else 128 - code
    return 0


def launch_workers(
    command: Sequence[str],
    count: int,
    *,
    cpu_count: int | None = None,
    gpu_count: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> list[int]:
    """Start `count` processes of `command` (e.g. `[python, -m, pipeline.cli, run, study.yaml,
    --no-report]`), each with `worker_env`, wait for all of them and return their exit codes in
    start order (negative: ended by that signal, as `subprocess` reports it). A stop signal that
    comes while workers are being started reaches the started ones and no more are started, so
    the list is then shorter than `count`.

    Workers inherit stdout/stderr. While waiting, SIGINT/SIGTERM to this process are forwarded to
    the live workers (only when called from the main thread, where Python delivers signals).
    If this process is killed outright (SIGKILL), the workers keep running their trials.

    Args:
        command: program and arguments of one worker.
        count: number of workers, >= 1.
        cpu_count: CPUs to share out; default `visible_cpus()`.
        gpu_count: visible GPUs; default `visible_gpus()` (imports torch).
        env: base environment of the workers; default this process's.
        cwd: working directory of the workers; default this process's.

    Raises:
        ConfigError: `count` < 1.
        SweepError: a worker could not be started (the ones already started are stopped first).
    """
    if count < 1:
        raise ConfigError(f"--workers {count}: give at least 1 worker process")
    cpus = visible_cpus() if cpu_count is None else cpu_count
    gpus = visible_gpus() if gpu_count is None else gpu_count
    procs: list[subprocess.Popen[bytes]] = []
    stops: list[tuple[int, int]] = []  # (signal, workers started when it came)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stops.append((signum, len(procs)))
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED} if in_main else {}
    try:
        for index in range(count):
            if stops:  # asked to stop while starting: start no more
                break
            try:
                procs.append(
                    subprocess.Popen(
                        list(command), env=worker_env(index, count, cpus, gpus, env), cwd=cwd, process_group=0
                    )
                )
            except OSError as err:
                forward(signal.SIGTERM, None)
                for proc in procs:
                    proc.wait()
                raise SweepError(
                    f"worker {index} of {count} could not be started: {command[0]}: {err.strerror or err}"
                ) from None
            if stops and stops[-1][1] < len(procs):  # the signal came while this worker was being started
                procs[-1].send_signal(stops[-1][0])
        return [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forwarded_args(
    sets: list[str] | None,
    storage: str | None,
    tracking_uri: str | None,
    n_trials: int | None,
    timeout: float | None,
    accept_changes: bool,
) -> list[str]:
    """The options of `sweep run` that every worker of `--workers N` gets as given, as command-line
    arguments (`--set` once per value; options left unset are not passed)."""
    args = [a for s in sets or [] for a in ("--set", s)]
    for flag, value in (
        ("--storage", storage),
        ("--tracking-uri", tracking_uri),
        ("--n-trials", n_trials),
        ("--timeout", timeout),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args + (["--accept-changes"] if accept_changes else [])
