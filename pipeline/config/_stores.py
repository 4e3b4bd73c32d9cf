"""Where the embedded stores live: the store folder, Optuna storage and MLflow tracking URLs,
trial checkpoints, the lock that serialises a new SQLite store's creation, and writability.

Defaults (../shared/DESIGN.md, "defaults that embed"): everything under `$SWEEP_HOME` (default
`./mlruns`): `optuna.db` (Optuna RDB storage), `mlflow.db` (MLflow tracking + registry),
`artifacts/` (MLflow artifacts), `checkpoints/<study>/` (trial checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from pipeline.config._config import StudyConfig
from pipeline.core import TrackingError, mask_text, mask_url

HOME_ENV = "SWEEP_HOME"
SQLITE_PREFIX = "sqlite:///"
# What SQLAlchemy, alembic and MLflow say about a schema that an interrupted creation or migration left
# half-done, or that another version wrote (SQLite and PostgreSQL wordings).
DAMAGED_SCHEMA = re.compile(
    r"out-of-date database schema|table \S+ already exists|relation \S+ already exists|no such table"
    r"|Can't locate revision",
    re.IGNORECASE,
)


def home() -> Path:
    """The embedded store folder: `$SWEEP_HOME` or `./mlruns` (relative to the working directory)."""
    return Path(os.environ.get(HOME_ENV, "mlruns"))


def default_tracking_uri(folder: Path | None = None) -> str:
    """`sqlite:///<abs>/mlflow.db` in `folder` (default `home()`): embedded, no server needed."""
    return f"{SQLITE_PREFIX}{((folder or home()) / 'mlflow.db').resolve()}"


def storage_url(cfg: StudyConfig, override: str | None = None) -> str:
    """Optuna storage URL: `override` (--storage), else `study.storage`, else `home()/optuna.db`."""
    return override or cfg.study.storage or f"{SQLITE_PREFIX}{(home() / 'optuna.db').resolve()}"


def tracking_uri(cfg: StudyConfig, override: str | None = None) -> str:
    """MLflow tracking URI: `override` (--tracking-uri), else `tracking.uri`, else the embedded store."""
    return override or cfg.tracking.uri or default_tracking_uri()


def artifact_root() -> Path:
    """Where a new MLflow experiment of the embedded store keeps its artifacts."""
    return home() / "artifacts"


def experiment_artifacts(uri: str) -> Path | None:
    """Where a new MLflow experiment of the tracking store `uri` keeps its artifacts: None for a
    tracking server (`http(s)://`), which decides itself (with `--serve-artifacts`, proxied
    `mlflow-artifacts:/` storage, so workers need no shared file system); else `artifact_root()`."""
    return None if uri.startswith(("http://", "https://")) else artifact_root()


def checkpoint_dir(study_name: str) -> Path:
    """Folder of the study's trial checkpoints: `home()/checkpoints/<study>`."""
    return home() / "checkpoints" / study_name


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL, None for any other URL."""
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


@contextlib.contextmanager
def store_lock(uri: str, timeout: float = 600.0) -> Iterator[None]:
    """Hold an exclusive lock beside an embedded SQLite store while it is created or migrated.

    Two processes creating the same new SQLite store race through its schema migration and can
    leave it half-migrated for good; a lock file next to it (`<db>.lock`, `filelock`) serialises
    them. Other URLs are servers that handle concurrency themselves: no lock.

    Raises:
        TrackingError: the lock was not acquired within `timeout` seconds.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", timeout=timeout)
    try:
        lock.acquire()
    except TimeoutError:
        raise TrackingError(
            f"{path}.lock: held by another process for over {timeout:.0f} s; "
            "is another sweep stuck? remove the file if no sweep is running"
        ) from None
    try:
        yield
    finally:
        lock.release()


def check_writable(path: Path) -> None:
    """Create `path` and write a 4 KiB probe file there.

    Raises:
        TrackingError: naming `path` when a file cannot be created there (permissions, disk full).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-") as handle:
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise TrackingError(
            f"{path}: cannot write there ({err.strerror or err}); free disk space or fix its "
            "permissions, or point --storage/--tracking-uri elsewhere"
        ) from None


def check_local_paths(*uris: str) -> None:
    """Fail early, naming the folder, when the folder of an embedded SQLite store cannot be written,
    or when a URI is a plain folder (MLflow's file store, which MLflow 3 refuses unless
    `MLFLOW_ALLOW_FILE_STORE=true`).

    Raises:
        TrackingError: from `check_writable`, or naming the folder and the sqlite:/// URI to use.
    """
    for uri in uris:
        path = sqlite_path(uri)
        if path is not None:
            check_writable(path.parent)
        elif _folder_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            folder = Path(uri.removeprefix("file://"))
            raise TrackingError(
                f"tracking URI {uri}: a folder is MLflow's file store, which MLflow 3 no longer opens by default; "
                f"use sqlite:///{(folder / 'mlflow.db').resolve()} (a database file in that folder), "
                "or set MLFLOW_ALLOW_FILE_STORE=true to keep a file store"
            )


def _folder_store(uri: str) -> bool:
    """True for a tracking URI that is a path (no scheme) or a file:// URI."""
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("http:", "https:", "databricks"))


TRACKING_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking(flag: str | None, cfg_value: str | None) -> str:
    """The MLflow tracking URI, by precedence: `flag` (--tracking-uri), then `cfg_value` (the study
    file's `tracking.uri`), then `$MLFLOW_TRACKING_URI` (how users point every MLflow tool at a
    store), then the embedded store (`default_tracking_uri()`). Empty values count as unset."""
    return flag or cfg_value or os.environ.get(TRACKING_ENV) or default_tracking_uri()


def damaged_schema(what: str, url: str, error: str, upgrade: str) -> str | None:
    """One message for a store whose schema is half-created or from another version, or None when
    `error` (a driver's or library's first line) says something else.

    Args:
        what: names the store ("MLflow tracking store").
        url: its URL (shown with the password masked); an SQLite file is named as a file.
        error: the error's first line.
        upgrade: the command that migrates such a store (`URL` stands for the store's URL).

    Returns:
        e.g. `MLflow tracking store sqlite:////x/mlflow.db: its schema is half-created or from another
        version (table webhooks already exists); if the file holds nothing you need, delete /x/mlflow.db
        and run again, else back it up and run `mlflow db upgrade sqlite:////x/mlflow.db``.
    """
    if not DAMAGED_SCHEMA.search(error):
        return None
    path, shown = sqlite_path(url), mask_url(url)
    fresh = f"delete {path} and run again" if path else "drop its tables (or use a new database) and run again"
    return (
        f"{what} {shown}: its schema is half-created or from another version ({mask_text(error, [url])}); "
        f"if {'the file' if path else 'it'} holds nothing you need, {fresh}, else back it up and run "
        f"`{upgrade.replace('URL', shown)}`"
    )
