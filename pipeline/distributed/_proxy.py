"""`sweep storage-proxy`: Optuna's gRPC storage proxy in front of the study's database.

Many worker nodes talking to one database each hold connections and poll it; Optuna's answer for
large node counts is one proxy process (`optuna.storages.run_grpc_proxy_server`) that owns the
database connections and a trial cache, with every worker opening `grpc://HOST:PORT`
(`optuna.storages.GrpcStorageProxy`, see `pipeline.distributed`). This module is a thin wrapper over
Optuna's own server: it opens the database with `pipeline.distributed.open_storage` (schema created
under the creation lock, masked messages) and turns the errors a user can fix into `TrackingError`.

Heartbeats: the gRPC protocol of Optuna 5.0 has no heartbeat call, so trials of workers that reach
the study through the proxy keep their own heartbeat as a user attr (`pipeline.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import optuna

from pipeline.core import TrackingError, mask_url
from pipeline.distributed._storages import check_grpc_installed, open_storage, storage_kind

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 13000  # Optuna's default proxy port


def serve_storage_proxy(
    storage_url: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    threads: int = 10,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the Optuna storage behind `storage_url` over gRPC on `host:port` until the process is
    stopped (SIGTERM, or KeyboardInterrupt from Ctrl-C, which propagates to the caller).

    Args:
        storage_url: an RDB storage URL (`postgresql://...`, `mysql://...`, `sqlite:///...`); Optuna's
            proxy does not support journal storage, and a proxy in front of a proxy is refused.
        host: address to listen on; `0.0.0.0` for every interface (inside a container).
        port: TCP port to listen on.
        threads: worker threads of the gRPC server (concurrent requests served).
        announce: called with one line (the masked database URL and the address) once the database
            is open, just before the server starts listening.

    Raises:
        TrackingError: grpcio is missing; the URL is not an RDB storage; the database cannot be
            opened (from `open_storage`); `host:port` cannot be bound (in use or not local).
    """
    check_grpc_installed("sweep storage-proxy")
    kind = storage_kind(storage_url)
    if kind != "rdb":
        raise TrackingError(
            f"sweep storage-proxy {mask_url(storage_url)}: the proxy serves a database "
            "(postgresql://..., mysql://..., sqlite:///...), not a "
            f"{'gRPC proxy' if kind == 'grpc' else 'journal file'}; give it the database URL"
        )
    # Optuna's docs ask for get_storage(): it adds the in-process trial cache RDBStorage lacks alone.
    storage = optuna.storages.get_storage(open_storage(storage_url))
    if announce is not None:
        announce(
            f"Optuna storage proxy for {mask_url(storage_url)} on {host}:{port}; workers use "
            f"--storage grpc://{host}:{port}"
        )
    try:
        optuna.storages.run_grpc_proxy_server(
            storage, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=threads)
        )
    except RuntimeError as err:  # grpc: "Failed to bind to address HOST:PORT ..."
        raise TrackingError(
            f"sweep storage-proxy: cannot listen on {host}:{port} ({str(err).split(';')[0]}); "
            "is another proxy running there? choose another --port"
        ) from None
