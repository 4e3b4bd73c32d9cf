"""Ctrl-C / SIGTERM at any moment: while a store's schema is created or migrated the signal is held
(`interrupts.deferred_interrupts`) and raised right after, so a first start interrupted there leaves
stores that the next start opens; a store broken before (an older version) gets one clear message."""

from __future__ import annotations

import os
import signal
import threading
import time

import optuna
import pytest
import sqlalchemy
from sqlalchemy import event

from pipeline.core import TrackingError, deferred_interrupts
from pipeline.distributed import open_storage
from pipeline.tracking import Tracker


class Term(Exception):
    pass


def _raise_term(signum, frame):
    raise Term


@pytest.fixture
def handlers():
    """The handlers `cli.handled` installs: Ctrl-C raises KeyboardInterrupt, SIGTERM an exception."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_term)
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "sig, raised, name", [(signal.SIGINT, KeyboardInterrupt, "Ctrl-C"), (signal.SIGTERM, Term, "SIGTERM")]
)
def test_a_signal_inside_the_block_is_raised_only_after_it(handlers, capfd, sig, raised, name):
    steps = []
    with pytest.raises(raised):
        with deferred_interrupts("the test store"):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # an installed Python handler would have run by now
            steps.append("block finished")
        steps.append("after the block")
    assert steps == ["block finished"]
    assert capfd.readouterr().err == f"{name}: finishing with the test store first (seconds), then stopping\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handlers of before are back"
    assert signal.getsignal(signal.SIGTERM) is _raise_term


def test_nested_blocks_hold_the_signal_until_the_outer_one_ends(handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # pressed twice: still one interrupt, after the block
            steps.append("inner ended")
        steps.append("after")
    assert steps == ["inner ended"]


def test_the_interrupt_wins_over_an_error_of_the_block_and_no_signal_means_nothing(handlers):
    with pytest.raises(KeyboardInterrupt) as caught, deferred_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        raise ValueError("the block failed")
    assert isinstance(caught.value.__context__, ValueError)
    with deferred_interrupts():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_the_block_just_runs(handlers):
    done = []

    def work():
        with deferred_interrupts():
            done.append(threading.current_thread().name)

    thread = threading.Thread(target=work, name="worker")
    thread.start()
    thread.join()
    assert done == ["worker"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture
def ctrl_c_at_table(request):
    """Send SIGINT the moment a table of a new schema has been created (SQLAlchemy's DDL event, fired
    inside Optuna's and MLflow's `create_all` and alembic's migrations): the first one, or the one named
    by the test's parameter."""
    sent = []

    def interrupt(target, connection, **kw):
        if not sent and request.param in ("first table", target.name):
            sent.append(target.name)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(sqlalchemy.Table, "after_create", interrupt)
    yield sent
    event.remove(sqlalchemy.Table, "after_create", interrupt)


@pytest.mark.parametrize("ctrl_c_at_table", ["first table", "alembic_version"], indirect=True)
def test_ctrl_c_during_the_optuna_schema_creation_leaves_a_usable_storage(handlers, ctrl_c_at_table, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(KeyboardInterrupt):
        open_storage(url)
    assert ctrl_c_at_table, "the interrupt was sent inside the schema creation"
    study = optuna.create_study(study_name="after", storage=open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["after"]


# webhooks: added by one of MLflow's later migrations; interrupted there, the store broke for good.
@pytest.mark.parametrize("ctrl_c_at_table", ["first table", "webhooks"], indirect=True)
def test_ctrl_c_during_the_mlflow_migration_leaves_a_usable_store(handlers, ctrl_c_at_table, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        Tracker(uri, "exp", tmp_path / "artifacts")
    assert ctrl_c_at_table, "the interrupt was sent inside the store's creation"
    first = Tracker(uri, "exp", tmp_path / "artifacts")
    assert Tracker(uri, "exp", tmp_path / "artifacts").experiment_id == first.experiment_id
    assert first.client.get_experiment(first.experiment_id).name == "exp"


def test_a_half_created_mlflow_store_is_named_with_what_to_do(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    Tracker(uri, "exp", tmp_path / "artifacts")
    with sqlalchemy.create_engine(uri).begin() as conn:  # what an older, interrupted start left
        conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '89d3d66ed43f'"))
    uri = f"sqlite:///{tmp_path}/./mlflow.db"  # the same file, not MLflow's store cached for the first URI
    with pytest.raises(TrackingError) as caught:
        Tracker(uri, "exp", tmp_path / "artifacts")
    message = str(caught.value)
    assert message.startswith(f"MLflow tracking store {uri}: its schema is half-created or from another version (")
    assert message.endswith(
        f"); if the file holds nothing you need, delete {db} and run again, else back it up and run "
        f"`mlflow db upgrade {uri}`"
    )
