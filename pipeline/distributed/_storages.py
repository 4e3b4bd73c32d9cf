"""One storage URL -> one Optuna storage, for every kind of storage a sweep can share.

Accepted URLs (`open_storage`):

| URL | storage | for |
|---|---|---|
| `sqlite:///FILE` | `RDBStorage` | one process (the embedded default) |
| `postgresql://...`, `postgresql+psycopg://...` | `RDBStorage` | many workers, many machines |
| `mysql://...`, `mysql+pymysql://...` | `RDBStorage` | many workers, many machines |
| `grpc://HOST:PORT` | `GrpcStorageProxy` | many nodes behind one `sweep storage-proxy` |
| `journal:///FILE`, or a path ending in `.journal` / `.log` | `JournalStorage` | processes on one machine or NFS |

`journal:///FILE` follows SQLAlchemy's SQLite convention: what follows the third slash is the path, so
`journal:///runs/x.journal` is relative to the working directory and `journal:////abs/x.journal` is
absolute. The file is locked with Optuna's default symlink lock, which also works on NFS.

Heartbeats (`heartbeat_interval`, `grace_period`, `stale_trial_callback`) only exist for RDB storages:
in Optuna 5.0 neither `GrpcStorageProxy` nor `JournalStorage` implements `BaseHeartbeat`, and the gRPC
protocol has no heartbeat call, so a worker killed while it holds a trial would leave that trial
RUNNING there: trials on those storages keep their own heartbeat (`pipeline.distributed.TrialHeartbeat`).
`heartbeat_supported` tells which is which.

Concurrent first opens: `RDBStorage.__init__` runs `metadata.create_all` and then stamps the alembic
version, each in its own transaction and without any lock. On a fresh PostgreSQL database, four
processes opening it at once lost that race 3 times out of 4 (`UniqueViolation` on
`pg_type_typname_nsp_index`, `DuplicateObject: type "studydirection" already exists`,
`DuplicateTable`). `open_storage` therefore creates the schema under `creation_lock`: a transaction-
level advisory lock inside the database itself (PostgreSQL `pg_advisory_xact_lock`, MySQL `GET_LOCK`),
so it serialises workers on every machine; for SQLite a lock file beside the database. Dialects
without a lock retry on the errors a lost race raises, with backoff.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage

from pipeline.config import check_writable, sqlite_path, store_lock
from pipeline.core import TrackingError, deferred_interrupts, first_line, mask_text, mask_url

JOURNAL_PREFIX = "journal:///"
JOURNAL_SUFFIXES = (".journal", ".log")
GRPC_DEFAULT_PORT = 13000  # Optuna's own default for run_grpc_proxy_server / GrpcStorageProxy
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
# PostgreSQL errors of a lost schema-creation race: unique_violation (pg_type), duplicate_table,
# duplicate_object (enum types).
RACE_SQLSTATES = frozenset({"23505", "42P07", "42710"})
StaleTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def storage_kind(url: str) -> str:
    """`"rdb"`, `"grpc"` or `"journal"` for a storage URL (see the module table).

    Raises:
        TrackingError: naming the (masked) URL when it is none of the accepted forms.
    """
    scheme = url.partition("://")[0].partition("+")[0].lower() if "://" in url else ""
    if scheme in RDB_SCHEMES:
        return "rdb"
    if scheme == "grpc":
        return "grpc"
    if scheme == "journal" or (not scheme and url.endswith(JOURNAL_SUFFIXES)):
        return "journal"
    raise TrackingError(
        f"Optuna storage {mask_url(url)}: not a storage URL; use sqlite:///FILE, postgresql://USER@HOST/DB, "
        "mysql://USER@HOST/DB, grpc://HOST:PORT (a running `sweep storage-proxy`) or journal:///FILE.journal"
    )


def heartbeat_supported(url: str) -> bool:
    """True when the storage of `url` records trial heartbeats (RDB storages only, see module doc)."""
    return storage_kind(url) == "rdb"


def journal_path(url: str) -> Path:
    """The log file of a journal storage URL (`journal:///FILE` or a bare `*.journal` / `*.log` path)."""
    return Path(url.removeprefix(JOURNAL_PREFIX)) if url.startswith(JOURNAL_PREFIX) else Path(url)


def grpc_address(url: str) -> tuple[str, int]:
    """`(host, port)` of `grpc://HOST[:PORT]`; port 13000 when omitted; IPv6 hosts keep their brackets.

    Raises:
        TrackingError: the URL has no host or a port that is not a number.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or GRPC_DEFAULT_PORT
    except ValueError as err:
        raise TrackingError(
            f"Optuna storage {mask_url(url)}: bad gRPC proxy address ({err}); write it as grpc://HOST:PORT"
        ) from None
    if not host:
        raise TrackingError(f"Optuna storage {mask_url(url)}: no host; write it as grpc://HOST:PORT")
    return (f"[{host}]" if ":" in host else host), port


def _lock_key(name: str) -> int:
    # A stable key per lock name, the same in every process (unlike hash()); fits PostgreSQL's bigint.
    return zlib.crc32(f"sweep:{name}".encode())


@contextlib.contextmanager
def creation_lock(
    url: str, name: str = "optuna-schema", timeout: float = 120.0, connect_timeout: float = 10.0
) -> Iterator[None]:
    """Hold a lock named `name` in the database of `url` while a schema is created there.

    PostgreSQL: `pg_advisory_xact_lock` in a transaction of its own (released when the block ends, or
    by the server when the process dies); MySQL: `GET_LOCK`; SQLite: `<file>.lock` beside the database;
    other dialects: no lock (callers retry). Usable for any store sharing the database, e.g. MLflow's
    tracking store with `name="mlflow-schema"`.

    Args:
        url: SQLAlchemy database URL.
        name: what is being created; different names do not block each other.
        timeout: seconds to wait for the lock.
        connect_timeout: seconds to wait for the database server to answer.

    Raises:
        sqlalchemy.exc.OperationalError: the database cannot be reached, or the lock was not granted
            within `timeout` (PostgreSQL `lock_timeout`); `open_storage` turns these into TrackingError.
        TrackingError: the SQLite lock file stayed held for `timeout` seconds.
    """
    import sqlalchemy

    path = sqlite_path(url)
    if path is not None:
        with store_lock(url, timeout=timeout) if str(path) != ":memory:" else contextlib.nullcontext():
            yield
        return
    dialect = sqlalchemy.engine.make_url(url).get_backend_name()
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    engine = sqlalchemy.create_engine(
        url, connect_args=_connect_args(url, connect_timeout), poolclass=sqlalchemy.pool.NullPool
    )
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                with conn.begin():
                    conn.execute(sqlalchemy.text(f"SET LOCAL lock_timeout = '{int(timeout * 1000)}ms'"))
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key(name)})
                    yield
            else:
                got = conn.execute(
                    sqlalchemy.text("SELECT GET_LOCK(:n, :t)"), {"n": f"sweep:{name}", "t": int(timeout)}
                ).scalar()
                if got != 1:
                    raise TrackingError(
                        f"database {mask_url(url)}: lock sweep:{name} not granted within "
                        f"{timeout:.0f} s; is another worker stuck creating the schema?"
                    )
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": f"sweep:{name}"})
    finally:
        engine.dispose()


def _connect_args(url: str, connect_timeout: float = 10.0) -> dict[str, Any]:
    # Without a connect timeout, an address that drops packets hangs a worker for minutes.
    backend = url.partition("://")[0].partition("+")[0].lower()
    if backend == "sqlite":
        return {"timeout": 30}  # seconds a writer waits on SQLite's file lock before "database is locked"
    if backend in ("postgresql", "mysql") and "connect_timeout" not in url:
        return {"connect_timeout": max(1, round(connect_timeout))}
    return {}


def _driver_hint(url: str) -> str:
    backend = url.partition("://")[0].partition("+")[0].lower()
    return {
        "postgresql": "pip install 'psycopg[binary]' (the sweep[postgres] extra)",
        "mysql": "pip install pymysql and write mysql+pymysql://...",
    }.get(backend, "install its driver")


def _schema_error(err: Exception, url: str, last: bool) -> TrackingError | None:
    """The error to raise for a failed schema creation, or None when it was a race with another
    worker creating the same table or type (retried, unless this was the `last` attempt)."""
    shown, reason = mask_url(url), mask_text(first_line(err), [url])
    state = getattr(getattr(err, "orig", None), "sqlstate", None)
    if state is not None and state not in RACE_SQLSTATES:
        return TrackingError(
            f"Optuna storage {shown}: cannot create its tables ({reason}); give the user the right to "
            "create tables in that database, or create the schema once as its owner"
        )
    if last:
        return TrackingError(
            f"Optuna storage {shown}: schema creation kept colliding with other workers ({reason}); "
            "start one worker first, then the others"
        )
    return None


def _open_rdb(
    url: str,
    *,
    heartbeat_interval: int | None,
    grace_period: int | None,
    stale_trial_callback: StaleTrialCallback | None,
    connect_timeout: float,
    lock_timeout: float,
    attempts: int = 5,
    lock: bool = True,
) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    shown = mask_url(url)
    path = sqlite_path(url)
    if path is not None and str(path) != ":memory:":
        check_writable(path.parent)
    for attempt in range(attempts):
        try:
            locked = creation_lock(url, timeout=lock_timeout, connect_timeout=connect_timeout)
            # Waiting for the lock stays interruptible; creating the schema under it does not.
            with locked if lock else contextlib.nullcontext(), deferred_interrupts("the Optuna storage"):
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": _connect_args(url, connect_timeout)},
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=stale_trial_callback,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            # Another process created the same table or type first (a dialect without a lock, or the
            # lock disabled): the next attempt finds it and skips it. Other errors are no race.
            refused = _schema_error(err, url, last=attempt == attempts - 1)
            if refused is not None:
                raise refused from None
            time.sleep(random.uniform(0.05, 0.2) * 2**attempt)
        except sqlalchemy.exc.OperationalError as err:
            if getattr(err.orig, "sqlstate", None) == "55P03":  # lock_not_available: lock_timeout ran out
                raise TrackingError(
                    f"Optuna storage {shown}: another worker held the schema lock for over "
                    f"{lock_timeout:.0f} s; is one stuck creating the schema?"
                ) from None
            raise TrackingError(
                f"Optuna storage {shown}: cannot connect ({mask_text(first_line(err), [url])}); "
                "start the database server, or fix the host, user or password in --storage / "
                "study.storage"
            ) from None
        except ImportError:
            raise TrackingError(
                f"Optuna storage {shown}: the database driver is not installed; {_driver_hint(url)}"
            ) from None
        except RuntimeError as err:  # Optuna's schema version check
            raise TrackingError(
                f"Optuna storage {shown}: {mask_text(first_line(err), [url])}; upgrade it with "
                f"`optuna storage upgrade --storage URL`"
            ) from None
    raise AssertionError("unreachable: the loop returns or raises")


def check_grpc_installed(what: str) -> None:
    """Fail with one message when grpcio (an optional dependency: the `grpc` extra) is missing.

    Raises:
        TrackingError: `what` needs grpcio; says how to install it.
    """
    if importlib.util.find_spec("grpc") is None:
        raise TrackingError(f"{what} needs grpcio: pip install grpcio (or the sweep[grpc] extra)")


def _open_grpc(url: str, connect_timeout: float) -> BaseStorage:
    check_grpc_installed(f"Optuna storage {mask_url(url)}")
    host, port = grpc_address(url)
    proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=connect_timeout)
    except ConnectionError:
        proxy.close()
        raise TrackingError(
            f"Optuna gRPC storage proxy {mask_url(url)}: no answer within {connect_timeout:.0f} s; start "
            f"`sweep storage-proxy DATABASE_URL --host {host} --port {port}` there, or fix --storage / study.storage"
        ) from None
    return proxy


def _open_journal(url: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    check_writable(path.parent)
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise TrackingError(
            f"Optuna journal storage {path}: cannot be opened ({err.strerror or err}); fix the path or its permissions"
        ) from None


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_trial_callback: StaleTrialCallback | None = None,
    connect_timeout: float = 10.0,
    lock_timeout: float = 120.0,
    schema_lock: bool = True,
) -> BaseStorage:
    """Open (creating its schema or file when new) the Optuna storage behind `url`.

    Args:
        url: a storage URL of the module table.
        heartbeat_interval: seconds between a running trial's heartbeats (RDB only; None = off).
        grace_period: seconds without a heartbeat after which a RUNNING trial is failed (RDB only;
            Optuna's default is 2 x heartbeat_interval).
        stale_trial_callback: called for each trial failed that way, e.g.
            `optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)` to enqueue its parameters
            again (the non-deprecated name of `RetryFailedTrialCallback`).
        connect_timeout: seconds to wait for a database server or a gRPC proxy to answer.
        lock_timeout: seconds to wait for another worker creating the schema (`creation_lock`).
        schema_lock: False skips `creation_lock` and relies on retries alone (tests of the fallback).

    Returns:
        `RDBStorage` (pass it to `optuna.create_study`, which adds Optuna's cache), `GrpcStorageProxy`
        (heartbeats, if any, are the proxy's business; see the module doc) or `JournalStorage`.

    Raises:
        TrackingError: the URL is not a storage URL; the database, proxy or file cannot be reached or
            opened (the message names which, with the URL's password masked, and what to do); a needed
            package is missing; the schema is older than this Optuna.
    """
    kind = storage_kind(url)
    if kind == "grpc":
        return _open_grpc(url, connect_timeout)
    if kind == "journal":
        return _open_journal(url)
    return _open_rdb(
        url,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        stale_trial_callback=stale_trial_callback,
        connect_timeout=connect_timeout,
        lock_timeout=lock_timeout,
        lock=schema_lock,
    )
