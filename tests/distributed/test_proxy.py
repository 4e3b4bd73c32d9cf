"""Optuna's gRPC storage proxy in front of a real database, reached through `grpc://HOST:PORT`."""

from __future__ import annotations

import importlib.util
import socket

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.core import TrackingError
from pipeline.distributed import open_storage, serve_storage_proxy

from conftest import free_port, start_proxy, stop


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_workers_reach_the_study_through_the_grpc_proxy(tmp_path, postgres, backend):
    database = postgres("proxied") if backend == "postgres" else f"sqlite:///{tmp_path / 'optuna.db'}"
    port = free_port()
    proxy = start_proxy(database, port)
    try:
        storage = open_storage(f"grpc://127.0.0.1:{port}", connect_timeout=60)
        assert isinstance(storage, optuna.storages.GrpcStorageProxy)
        study = optuna.create_study(
            storage=storage, study_name="via-proxy", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
        )
        study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=4)
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 0.5},
                value=0.5,
                distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)},
            )
        )
        storage.close()
    finally:
        stop(proxy)
    # Read back from the database itself, not through the proxy's cache.
    trials = optuna.load_study(study_name="via-proxy", storage=database).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert [t.value for t in trials] == [t.params["lr"] for t in trials]
    assert trials[-1].value == 0.5


def test_proxy_that_does_not_answer_is_named():
    port = free_port()
    with pytest.raises(TrackingError) as info:
        open_storage(f"grpc://127.0.0.1:{port}", connect_timeout=1)
    assert str(info.value) == (
        f"Optuna gRPC storage proxy grpc://127.0.0.1:{port}: no answer within 1 s; start "
        f"`sweep storage-proxy DATABASE_URL --host 127.0.0.1 --port {port}` there, or fix --storage / study.storage"
    )


def test_proxy_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TrackingError) as info:
            serve_storage_proxy(f"sqlite:///{tmp_path / 'optuna.db'}", "127.0.0.1", port)
    assert str(info.value) == (
        f"sweep storage-proxy: cannot listen on 127.0.0.1:{port} (Failed to bind to address "
        f"127.0.0.1:{port}); is another proxy running there? choose another --port"
    )


@pytest.mark.parametrize(
    ("url", "what"), [("grpc://other:13000", "gRPC proxy"), ("journal:///x.journal", "journal file")]
)
def test_proxy_serves_only_a_database(url, what):
    with pytest.raises(TrackingError) as info:
        serve_storage_proxy(url)
    assert str(info.value) == (
        f"sweep storage-proxy {url}: the proxy serves a database (postgresql://..., "
        f"mysql://..., sqlite:///...), not a {what}; give it the database URL"
    )


def test_missing_grpcio_is_one_clear_message(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    with pytest.raises(TrackingError) as info:
        serve_storage_proxy(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert str(info.value) == "sweep storage-proxy needs grpcio: pip install grpcio (or the sweep[grpc] extra)"
    with pytest.raises(TrackingError) as info:
        open_storage("grpc://u:pw@proxy:13000")
    assert str(info.value) == (
        "Optuna storage grpc://u:***@proxy:13000 needs grpcio: pip install grpcio (or the sweep[grpc] extra)"
    )
    assert not (tmp_path / "optuna.db").exists(), "nothing written before the check"
