"""One exception family. The CLI maps each to a one-line message and an exit code."""


class SweepError(Exception):
    """Base class: a problem the user can fix; `str(err)` is the whole message."""

    exit_code = 1


class ConfigError(SweepError):
    """The study file or a `--set` override is invalid (names the file and key path)."""

    exit_code = 2


class DataError(SweepError):
    """The image folders are missing, empty, inconsistent or hold unreadable files."""

    exit_code = 3


class ModelError(SweepError):
    """An architecture, weights value or freeze depth cannot be honoured."""

    exit_code = 4


class TrackingError(SweepError):
    """The Optuna storage or MLflow store cannot be used (path, server, permissions)."""

    exit_code = 5


class StudyStateError(SweepError):
    """The stored study does not match the study file (resume refused)."""

    exit_code = 6


class StudyFailedError(SweepError):
    """The study ran but produced nothing usable: no COMPLETE trial, or it stopped because too
    many trials failed. The parent run ends FAILED."""

    exit_code = 8


class RegistryError(SweepError):
    """Selecting, registering or loading the model failed."""

    exit_code = 7


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of `str(err)`, at most `limit` characters; the exception's class
    name when its message is empty (some raise with no message at all)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[0].strip() if lines else type(err).__name__)[:limit]


def connection_refused(err: BaseException) -> bool:
    """True when a client error (an HTTP tracking server's, wrapped by MLflow) says the connection
    was refused: urllib3's retry dump, first line only."""
    text = first_line(err)
    return "NewConnectionError" in text or "Connection refused" in text
