"""One study over many processes and machines: Optuna storages by URL (SQLite, PostgreSQL,
journal, gRPC proxy), locks held in the study's own storage, dead trials found by heartbeat or
process check and re-queued, the gRPC storage proxy and the worker launcher.
"""

from pipeline.distributed._proxy import serve_storage_proxy
from pipeline.distributed._recovery import (
    FAIL_REASON_ATTR,
    HOST_ATTR,
    INTERRUPTED_ATTR,
    OWNER_ATTR,
    PID_ATTR,
    DeadTrials,
    TrialHeartbeat,
    host_name,
    owner_record,
    recover,
)
from pipeline.distributed._storages import creation_lock, heartbeat_supported, journal_path, open_storage, storage_kind
from pipeline.distributed._studylock import study_lock
from pipeline.distributed._workers import (
    apply_worker_threads,
    check_storage_for_workers,
    exit_code,
    forwarded_args,
    launch_workers,
)

__all__ = [
    "DeadTrials",
    "FAIL_REASON_ATTR",
    "HOST_ATTR",
    "INTERRUPTED_ATTR",
    "OWNER_ATTR",
    "PID_ATTR",
    "TrialHeartbeat",
    "apply_worker_threads",
    "check_storage_for_workers",
    "creation_lock",
    "exit_code",
    "forwarded_args",
    "heartbeat_supported",
    "host_name",
    "journal_path",
    "launch_workers",
    "open_storage",
    "owner_record",
    "recover",
    "serve_storage_proxy",
    "storage_kind",
    "study_lock",
]
