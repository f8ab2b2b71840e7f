"""Replica health (#13): a write refused by a replica re-run on the primary,
servers whose connections fail taken out for a while, a lag limit in bytes,
and failover, on a real primary and hot standby (``tests/replica_pair.py``)
that these tests stop and start again."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
import typing as t
import uuid
from pathlib import Path

import pytest
import replica_pair
from conftest import StartResponseRecorder
from conftest import serve
from conftest import unavailable
from proxy import Proxy
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from support import free_port
from support import http_call
from support import replica_app_server

from wsgi_scoped import Database
from wsgi_scoped import HealthCheck
from wsgi_scoped import PrimaryUnavailableError
from wsgi_scoped import ReplicaWriteError
from wsgi_scoped import _servers
from wsgi_scoped.pytest_plugin import paused_replica
from wsgi_scoped.pytest_plugin import wait_for_replica
from wsgi_scoped.replicas import LSN_HEADER

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment


@pytest.fixture(scope="module")
def pair() -> t.Iterator[replica_pair.Pair]:
    """One pair for this module: tests that stop a server start it again."""
    with replica_pair.pair_or_skip() as running:
        yield running


@contextlib.contextmanager
def database(*replicas: t.Any, **options: t.Any) -> t.Iterator[Database]:
    db = Database(replicas[0], replicas=list(replicas[1:]), **options)
    try:
        yield db
    finally:
        db.remove()
        for engine in (db.engine, *db.replicas):
            engine.dispose()


@contextlib.contextmanager
def stopped(pair: replica_pair.Pair, server: t.Any) -> t.Iterator[None]:
    replica_pair.stop(pair, server)
    try:
        yield
    finally:
        replica_pair.start(pair, server)


class Served:
    """Which server each request's statements ran on (True: a replica)."""

    def __init__(self) -> None:
        self.replica: list[bool] = []


def reporting_app(db: Database, served: Served) -> t.Callable[..., t.Any]:
    """Reports its server; ``POST`` (or ``?write=NAME``) inserts a row."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        session = db()
        served.replica.append(
            session.execute(text("SELECT pg_is_in_recovery()")).scalar_one()
        )
        query = environ.get("QUERY_STRING", "")
        if environ["REQUEST_METHOD"] == "POST" or query.startswith("write="):
            name = query.partition("=")[2] or "posted"
            session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def call(
    app: t.Callable[..., t.Any], method: str, **environ: t.Any
) -> tuple[str, dict[str, str], bytes]:
    """One request: the status, headers and body the server would send."""
    recorder = StartResponseRecorder()
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/",
        "wsgi.input": None,
        **environ,
    }
    body = serve(app, environ, recorder)
    status, headers, _ = recorder.calls[-1]
    return status, dict(headers), body


def rows(pair: replica_pair.Pair, name: str) -> int:
    with replica_pair._engine(pair.primary) as engine, engine.connect() as connection:
        query = text("SELECT count(*) FROM item WHERE name = :n")
        return int(connection.execute(query, {"n": name}).scalar_one())


def test_a_write_in_a_get_is_rerun_on_the_primary_under_retries(
    pair: replica_pair.Pair,
) -> None:
    """The replica refuses it (25006); the retried attempt goes to the
    primary, commits the row once and sends its WAL position. The next
    request reads a replica again."""
    name = uuid.uuid4().hex
    with database(pair.primary, pair.standby) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True, retries=1)
        status, headers, _ = call(app, "GET", QUERY_STRING=f"write={name}")
        assert status == "200 OK"
        assert served.replica == [True, False]
        assert rows(pair, name) == 1
        assert LSN_HEADER in headers
        call(app, "GET")
        assert served.replica[-1] is True
        assert db.replicas[0].pool.checkedout() == 0


@pytest.mark.parametrize(
    ("retries", "environ"),
    [
        pytest.param(0, {}, id="no retries"),
        pytest.param(1, {"CONTENT_LENGTH": "99999"}, id="body not replayable"),
    ],
)
def test_a_write_in_a_get_that_cannot_be_retried_names_the_fix(
    pair: replica_pair.Pair, retries: int, environ: dict[str, str]
) -> None:
    name = uuid.uuid4().hex
    with database(pair.primary, pair.standby) as db:
        served = Served()
        app = db.middleware(
            reporting_app(db, served), commit=True, retries=retries, replay_limit=10
        )
        with pytest.raises(ReplicaWriteError, match=r"call db.use_primary\(\)"):
            call(app, "GET", QUERY_STRING=f"write={name}", **environ)
        assert served.replica == [True]
        assert rows(pair, name) == 0
        call(app, "GET", **environ)  # a new request: not sent to the primary
        assert served.replica[-1] is True


def test_replicas_that_refuse_connections_are_left_out(
    pair: replica_pair.Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Of two replicas, one refuses connections: no read fails, every read
    is served by the other, and the refusing one is tried once in its down
    period (one warning, which never shows the URL's password)."""
    dead = pair.standby.set(port=free_port(), password="hunter2")
    with database(pair.primary, dead, pair.standby, replica_down_for=600) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served))
        for _ in range(10):
            assert call(app, "GET")[0] == "200 OK"
        assert served.replica == [True] * 10
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.getMessage().startswith(
            f"Taking postgresql+psycopg://postgres:***@127.0.0.1:{dead.port}"
            "/postgres out for 600 s: connection failed"
        )


def test_with_every_replica_down_reads_use_the_primary(
    pair: replica_pair.Pair,
) -> None:
    dead = pair.standby.set(port=free_port())
    with database(pair.primary, dead, replica_down_for=600) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        for _ in range(3):
            assert call(app, "GET")[0] == "200 OK"
        assert served.replica == [False] * 3


def test_a_replica_connection_lost_mid_request_is_retried_elsewhere(
    pair: replica_pair.Pair,
) -> None:
    """The request's replica connection is lost after its first statement:
    the replica is taken out, and the retried attempt reads the primary."""
    with database(pair.primary, pair.standby, replica_down_for=600) as db:
        served = Served()

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            session = db()
            served.replica.append(
                session.execute(text("SELECT pg_is_in_recovery()")).scalar_one()
            )
            if len(served.replica) == 1:
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            start_response("200 OK", [])
            return [b"ok"]

        wrapped = db.middleware(app, commit=True, retries=1, retry_backoff=0)
        assert call(wrapped, "GET")[0] == "200 OK"
        assert served.replica == [True, False]
        assert call(wrapped, "GET")[0] == "200 OK"
        assert served.replica[-1] is False  # still out


def test_standby_failover(pair: replica_pair.Pair) -> None:
    """The standby stops: reads go to the primary, none fails (its pooled
    connection is found closed at checkout, the new one refused, the request
    re-pointed). It starts again: after the down period reads go back."""
    with database(pair.primary, pair.standby, replica_down_for=0.2) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        call(app, "GET")
        assert served.replica == [True]  # a pooled replica connection now
        with stopped(pair, "standby"):
            for _ in range(5):
                assert call(app, "GET")[0] == "200 OK"
            assert served.replica[1:] == [False] * 5
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the down period has passed
            assert call(app, "GET")[0] == "200 OK"
            if served.replica[-1]:
                break
            time.sleep(0.02)
        assert served.replica[-1] is True


def test_primary_failover(
    pair: replica_pair.Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """The primary stops: reads are served by the replica, even one that
    sent a position the replica has not replayed; a write answers 503 with
    Retry-After at once, without retries, and the log says why. Outside
    requests the driver's error is unchanged."""
    with database(pair.primary, pair.standby) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True, retries=3)
        assert call(app, "POST")[0] == "200 OK"
        with stopped(pair, "primary"):
            ahead = {"HTTP_X_WSGI_SCOPED_LSN": "FFFFFFFF/FFFFFFFF"}
            assert call(app, "GET", **ahead)[0] == "200 OK"
            assert call(app, "GET")[0] == "200 OK"
            assert served.replica[1:] == [True, True]
            status, headers, body = call(app, "POST")
            assert status == "503 Service Unavailable"
            assert body == (
                b"Service Unavailable: the database primary cannot be reached.\n"
            )
            assert headers == dict(unavailable(body))
            assert served.replica[1:] == [True, True]  # never retried
            [logged] = [r for r in caplog.records if r.exc_info]
            assert logged.getMessage() == "Connecting to the primary failed for POST /"
            error = logged.exc_info[1]  # type: ignore[index]
            assert isinstance(error, PrimaryUnavailableError)
            refused = str(error.__cause__)  # the driver's error
            assert "Connection refused" in refused
            assert str(error) == (
                f"The primary cannot be reached: {refused}. Requests with a"
                " safe method are still served by replicas; this one needs"
                " the primary."
            )
            with pytest.raises(OperationalError) as caught:
                db.engine.connect()
            assert not isinstance(caught.value, PrimaryUnavailableError)
        assert db.engine.pool.checkedout() == 0


def test_a_replica_behind_the_lag_limit_serves_no_reads(
    pair: replica_pair.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standby replays nothing while the primary writes 100 kB: reads
    go to the primary; once it has replayed, to the standby again."""
    monkeypatch.setattr(_servers, "LAG_INTERVAL", 0)  # measure every request
    with database(pair.primary, pair.standby, replica_max_lag=10_000) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        call(app, "GET")
        assert served.replica == [True]
        with paused_replica(pair.standby):
            with db.engine.begin() as connection:
                connection.execute(
                    text(
                        "INSERT INTO item (name) SELECT md5(i::text) FROM"
                        " generate_series(1, 2000) AS i"
                    )
                )
            call(app, "GET")
            assert served.replica[-1] is False
            assert db._router.servers[1].lag > 10_000  # type: ignore[union-attr]
        wait_for_replica(db)
        call(app, "GET")
        assert served.replica[-1] is True


def test_without_a_lag_limit_a_lagging_replica_serves_reads(
    pair: replica_pair.Pair,
) -> None:
    with database(pair.primary, pair.standby) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        with paused_replica(pair.standby):
            with db.engine.begin() as connection:
                connection.execute(
                    text(
                        "INSERT INTO item (name) SELECT md5(i::text) FROM"
                        " generate_series(1, 2000) AS i"
                    )
                )
            call(app, "GET")
        assert served.replica == [True]
        assert db._router.servers[1].lag is None  # type: ignore[union-attr]


def test_the_lag_is_measured_once_per_interval(
    pair: replica_pair.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted on the wire: with a limit, the first read measures (one
    round trip to the primary for its position, one to the replica); reads
    within the interval, and every read without a limit, pay nothing more."""
    monkeypatch.setattr(_servers, "LAG_INTERVAL", 3600)
    with (
        Proxy(("127.0.0.1", t.cast(int, pair.primary.port))) as primary,
        Proxy(("127.0.0.1", t.cast(int, pair.standby.port))) as standby,
    ):
        urls = [
            proxy.url(url.render_as_string())
            for proxy, url in ((primary, pair.primary), (standby, pair.standby))
        ]
        trips: dict[int | None, list[tuple[int, int]]] = {}
        for limit in (None, 10**9):
            with database(*urls, replica_max_lag=limit) as db:
                app = db.middleware(reporting_app(db, Served()), commit=True)
                call(app, "POST")  # a pooled connection to each server
                db.replicas[0].connect().close()
                trips[limit] = []
                for _ in range(3):
                    before = primary.round_trips, standby.round_trips
                    call(app, "GET")
                    after = primary.round_trips, standby.round_trips
                    trips[limit].append((after[0] - before[0], after[1] - before[1]))
    bare = trips[None][0][1]
    assert trips[None] == [(0, bare)] * 3
    assert trips[10**9] == [(1, bare + 1), (0, bare), (0, bare)]


def health(check: HealthCheck) -> tuple[str, dict[str, t.Any]]:
    recorder = StartResponseRecorder()
    body = b"".join(check({"REQUEST_METHOD": "GET"}, recorder))
    return recorder.calls[-1][0], json.loads(body)


def test_the_health_check_reports_each_replica(
    pair: replica_pair.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each replica's state and lag in bytes: a replica held back while the
    primary writes shows its lag; one that refuses connections shows down
    (the check's measurement found it), and the check still answers 200.
    A URL's password never reaches the report."""
    monkeypatch.setattr(_servers, "LAG_INTERVAL", 0)
    dead = pair.standby.set(port=free_port(), password="hunter2")
    with database(pair.primary, dead, pair.standby) as db:
        check = HealthCheck(db, timeout=10)
        status, report = health(check)
        assert status == "200 OK"
        standby_url, dead_url = (
            url.render_as_string(hide_password=True) for url in (pair.standby, dead)
        )
        assert report["replicas"] == [
            {"url": dead_url, "up": False, "lag_bytes": None},
            {"url": standby_url, "up": True, "lag_bytes": 0},
        ]
        assert ":***@" in dead_url
        assert "hunter2" not in json.dumps(report)
        with paused_replica(pair.standby):
            with db.engine.begin() as connection:
                connection.execute(text("INSERT INTO item (name) VALUES ('lag')"))
            status, report = health(check)
        assert status == "200 OK"
        assert report["replicas"][1]["lag_bytes"] > 0


@contextlib.contextmanager
def no_standby_delay(pair: replica_pair.Pair) -> t.Iterator[None]:
    """The standby cancels a conflicting query at once
    (``max_standby_streaming_delay = 0``) inside the block."""
    with replica_pair._engine(pair.standby) as engine:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("ALTER SYSTEM SET max_standby_streaming_delay = 0"))
            c.execute(text("SELECT pg_reload_conf()"))
        try:
            yield
        finally:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(text("ALTER SYSTEM RESET max_standby_streaming_delay"))
                c.execute(text("SELECT pg_reload_conf()"))


def test_a_recovery_conflict_on_the_standby_is_retried(
    pair: replica_pair.Pair,
) -> None:
    """A real recovery conflict: the standby cancels a read that holds a lock
    the primary's ``LOCK TABLE`` needs replayed ("canceling statement due to
    conflict with recovery", SQLSTATE 40001); the request is retried, on a
    replica again, and answers 200. (Only the retry of a write a replica
    refused goes to the primary: an earlier such request on this thread
    changes nothing.)"""
    errors: list[t.Any] = []
    sleeping = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE query LIKE 'SELECT count(*), pg_sleep(30)%'"
    )

    def lock_when_the_read_runs() -> None:
        with (
            replica_pair._engine(pair.standby) as standby,
            standby.connect() as watch,
        ):
            for _ in range(1000):
                if watch.execute(sleeping).scalar():
                    break
                watch.rollback()
                time.sleep(0.01)
        with replica_pair._engine(pair.primary) as primary, primary.begin() as c:
            c.execute(text("LOCK TABLE item IN ACCESS EXCLUSIVE MODE"))

    with no_standby_delay(pair), database(pair.primary, pair.standby) as db:
        served = Served()

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            session = db()
            served.replica.append(
                session.execute(text("SELECT pg_is_in_recovery()")).scalar_one()
            )
            if len(served.replica) == 1:
                try:
                    session.execute(text("SELECT count(*), pg_sleep(30) FROM item"))
                except Exception as error:
                    errors.append(error.orig)  # type: ignore[attr-defined]
                    raise
            start_response("200 OK", [])
            return [b"ok"]

        def writing(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            db().execute(text("INSERT INTO item (name) VALUES ('in a GET')"))
            start_response("200 OK", [])
            return [b"ok"]

        refused = db.middleware(writing, commit=True, retries=1, retry_backoff=0)
        assert call(refused, "GET")[0] == "200 OK"  # its retry ran on the primary
        locker = threading.Thread(target=lock_when_the_read_runs)
        locker.start()
        wrapped = db.middleware(app, commit=True, retries=1, retry_backoff=0)
        try:
            assert call(wrapped, "GET")[0] == "200 OK"
        finally:
            locker.join(timeout=30)
        assert served.replica == [True, True]
        [error] = errors
        assert error.sqlstate == "40001"
        assert "conflict with recovery" in str(error)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            {"replica_down_for": -1},
            "'replica_down_for' must be a number of seconds >= 0, got -1.",
            id="negative down period",
        ),
        pytest.param(
            {"replica_max_lag": -1},
            "'replica_max_lag' must be an int >= 0 (bytes) or None, got -1.",
            id="negative lag",
        ),
        pytest.param(
            {"replica_max_lag": "1MB"},
            "'replica_max_lag' must be an int >= 0 (bytes) or None, got '1MB'.",
            id="lag as text",
        ),
    ],
)
def test_health_options_are_checked_at_construction(
    options: dict[str, t.Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Database(
            "postgresql+psycopg://u@h/d",
            replicas=["postgresql+psycopg://u@r/d"],
            **options,
        )


def test_an_exhausted_replica_pool_answers_503_and_keeps_the_replica(
    pair: replica_pair.Pair,
) -> None:
    """Not a failure of the replica: the request answers 503 as for an
    exhausted primary pool, and the replica stays in."""
    options = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.1}
    with database(pair.primary, pair.standby, **options) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        with db.replicas[0].connect():
            status, _, body = call(app, "GET")
        assert status == "503 Service Unavailable"
        assert b"no database connection is free" in body
        assert call(app, "GET")[0] == "200 OK"
        assert served.replica == [True]


def test_a_replica_exactly_at_the_lag_limit_serves_reads() -> None:
    """``replica_max_lag`` is the most a replica may be behind: a replica
    measured at the limit is kept, one byte more is not (the last
    measurements stand, as within LAG_INTERVAL; nothing connects)."""
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    now = time.monotonic()
    primary, at_limit, over = (_servers._Server(engine, 5) for _ in range(3))
    for server, lag in ((at_limit, 100), (over, 101)):
        server.lag, server.measured = lag, now
    assert _servers._within_lag(primary, [at_limit, over], 100, now) == [at_limit]


def test_a_lag_measured_one_interval_ago_is_measured_again(
    pair: replica_pair.Pair,
) -> None:
    """A measurement stands for less than LAG_INTERVAL seconds: half an
    interval old, it is kept; exactly one interval old, it is taken again."""
    with database(pair.primary, pair.standby) as db:
        primary, replica = db._router.servers  # type: ignore[union-attr]
        now = time.monotonic()
        replica.lag, replica.measured = 12345, now - 0.5
        assert _servers.LAG_INTERVAL == 1.0
        _servers._measure(primary, [replica], now)
        assert (replica.lag, replica.measured) == (12345, now - 0.5)
        replica.measured = now - _servers.LAG_INTERVAL
        _servers._measure(primary, [replica], now)
        assert replica.measured == now
        assert replica.lag != 12345  # measured: 0 unless the pair is busy


def test_a_failed_lag_measurement_never_fails_the_health_check(
    pair: replica_pair.Pair, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.1}
    with database(pair.primary, pair.standby, **options) as db:
        with db.replicas[0].connect():
            status, report = health(HealthCheck(db, timeout=10))
        assert status == "200 OK"
        assert report["replicas"][0]["lag_bytes"] is None
        [logged] = [r for r in caplog.records if "lag" in r.getMessage()]
        assert logged.getMessage() == "Measuring the replicas' lag failed"
        assert logged.levelname == "WARNING"
        assert isinstance(logged.exc_info[1], PoolTimeout)  # type: ignore[index]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_write_on_a_replica_engine_outside_requests_names_the_fix(
    pair: replica_pair.Pair, driver: str
) -> None:
    """psycopg 3 reports the SQLSTATE as ``sqlstate``, psycopg2 as
    ``pgcode``: either way the write is recognised."""
    urls = [
        u.set(drivername=f"postgresql+{driver}") for u in (pair.primary, pair.standby)
    ]
    with database(*urls) as db:
        with db.replicas[0].connect() as connection:
            with pytest.raises(ReplicaWriteError) as caught:
                connection.execute(text("INSERT INTO item (name) VALUES ('x')"))
    refused = str(caught.value.__cause__)  # the driver's error
    assert refused.startswith("cannot execute INSERT in a read-only transaction")
    assert str(caught.value) == (
        f"This request is served by a read replica, which refuses writes (SQLSTATE"
        f" 25006): {refused}. Requests with a safe method (GET, HEAD, OPTIONS)"
        " read from a replica. Fix: call db.use_primary() in the handler before"
        " its first query, or send the write with POST, PUT, PATCH or DELETE."
    )


def test_with_the_primary_down_the_lag_limit_is_suspended(
    pair: replica_pair.Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica over the limit serves no reads, until the primary stops:
    then it serves them, behind or not."""
    monkeypatch.setattr(_servers, "LAG_INTERVAL", 0)
    with database(pair.primary, pair.standby, replica_max_lag=1) as db:
        served = Served()
        app = db.middleware(reporting_app(db, served), commit=True)
        with paused_replica(pair.standby):
            assert call(app, "POST")[0] == "200 OK"
            call(app, "GET")
            assert served.replica == [False, False]
            with stopped(pair, "primary"):
                assert call(app, "GET")[0] == "200 OK"
                assert served.replica[-1] is True


def test_other_errors_on_the_primary_are_unchanged(pair: replica_pair.Pair) -> None:
    with database(pair.primary, pair.standby) as db:

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            db().execute(text("SELECT * FROM no_such_table"))
            raise AssertionError("unreachable")

        with pytest.raises(ProgrammingError, match="no_such_table"):
            call(db.middleware(app, commit=True), "POST")


@pytest.mark.server
def test_standby_failover_under_gunicorn(
    pair: replica_pair.Pair, tmp_path: Path
) -> None:
    """Two gunicorn workers, each with its own view of the standby: while it
    is stopped, every GET and POST answers 200 from the primary; once it
    is back, GETs read it again."""
    with replica_app_server(
        pair, tmp_path, "gthread", REPLICA_APP_DOWN_FOR="0.2"
    ) as port:
        assert http_call(port, "GET", "/")[0]["replica"] is True
        with stopped(pair, "standby"):
            for method in ["GET", "POST"] * 10:
                assert http_call(port, method, "/?name=failover")[0]["replica"] is False
        deadline = time.monotonic() + 15
        replica = False
        while not replica and time.monotonic() < deadline:
            replica = http_call(port, "GET", "/")[0]["replica"]
            time.sleep(0.02)
        assert replica
