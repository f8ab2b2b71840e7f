"""Per-request deadlines on a real PostgreSQL (#13): each transaction gets
``statement_timeout`` set to the time left, a cancelled statement answers
503 and is never retried, and nothing is left behind on the connection,
not even under PgBouncer's transaction pooling."""

from __future__ import annotations

import gc
import math
import os
import time
import typing as t
import uuid
import wsgiref.util

import pgbouncer
import pytest
import replica_pair
from conftest import StartResponseRecorder
from conftest import serve
from conftest import server_url
from conftest import unavailable
from proxy import Proxy
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from wsgi_scoped import Database
from wsgi_scoped import DeadlineExceededError
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import is_transient
from wsgi_scoped.pytest_plugin import wait_for_replica
from wsgi_scoped.replicas import LSN_HEADER

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

SET_CONFIG = "set_config('statement_timeout'"


class Handler:
    """``/slow`` sleeps 5 s in PostgreSQL, ``/late`` sleeps 0.1 s in Python
    before its first query, ``/twice`` commits one transaction and begins
    another; every request records its ``statement_timeout`` (ms) and its
    attempt number."""

    def __init__(self, db: scoped_session[t.Any]) -> None:
        self.db = db
        self.timeouts: list[int] = []
        self.attempts: list[int] = []
        self.errors: list[BaseException] = []

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        self.attempts.append(environ.get("wsgi_scoped.attempt", 1))
        path = environ["PATH_INFO"]
        if path == "/late":
            time.sleep(0.1)
        session = self.db()
        try:
            self.timeouts.append(timeout_of(session))
        except DeadlineExceededError as error:
            self.errors.append(error)
            raise
        if path == "/slow":
            session.execute(text("SELECT pg_sleep(5)"))
        if path == "/twice":
            session.commit()
            self.timeouts.append(timeout_of(session))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]


def timeout_of(session: t.Any) -> int:
    """The ``statement_timeout`` in force, in milliseconds."""
    value = session.execute(text("SELECT current_setting('statement_timeout')"))
    shown = str(value.scalar_one())
    return int(shown.removesuffix("ms")) if shown != "0" else 0


def call(
    app: WSGIApplication, path: str = "/", method: str = "GET"
) -> tuple[str, t.Any, bytes]:
    environ: WSGIEnvironment = {"PATH_INFO": path, "REQUEST_METHOD": method}
    wsgiref.util.setup_testing_defaults(environ)
    start_response = StartResponseRecorder()
    body = serve(app, environ, start_response)
    status, headers, _ = start_response.calls[-1]
    return status, headers, body


@pytest.fixture
def db() -> t.Iterator[Database]:
    """One pooled connection, so the next transaction reuses the request's."""
    db = Database(server_url("postgresql"), pool_size=1, max_overflow=0)
    yield db
    db.remove()
    db.engine.dispose()


def statements(db: Database) -> list[str]:
    """The statements the engine sends from now on."""
    sent: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        sent.append(statement)

    return sent


def backend_pid_and_timeout(db: Database) -> tuple[int, str]:
    """Outside any request: the pooled connection's backend and its
    ``statement_timeout``."""
    session = db()
    try:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        shown = session.execute(text("SHOW statement_timeout")).scalar_one()
        return int(pid), str(shown)
    finally:
        db.remove()


@pytest.mark.parametrize(
    ("commit", "retries"),
    [
        pytest.param(False, 0, id="commit=False"),
        pytest.param(True, 0, id="commit=True"),
        pytest.param(True, 2, id="commit=True, retries=2"),
    ],
)
def test_a_statement_past_the_deadline_answers_503_once(
    db: Database, commit: bool, retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``SELECT pg_sleep(5)`` under ``deadline=0.3`` is cancelled by its
    statement_timeout: 503 with Retry-After, run once even with retries,
    logged with the driver's error; the session is ended, and its connection
    is back in the pool with PostgreSQL's default timeout."""
    pid_before, _ = backend_pid_and_timeout(db)
    handler = Handler(db)
    app = db.middleware(handler, commit=commit, retries=retries, deadline=0.3)
    status, headers, body = call(app, "/slow", "POST")
    assert status == "503 Service Unavailable"
    assert body == b"Service Unavailable: the request ran out of time. Retry later.\n"
    assert headers == unavailable(body)
    assert handler.attempts == [1]
    assert 0 < handler.timeouts[0] <= 300
    [record] = caplog.records
    assert record.getMessage() == (
        "Finishing the request before its deadline failed for POST /slow"
    )
    assert "QueryCanceled" in caplog.text
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0
    assert backend_pid_and_timeout(db) == (pid_before, "0")


def test_each_transaction_gets_the_time_left(db: Database) -> None:
    """A handler's second transaction gets what is left of the deadline,
    never more than the first, and never 0 (which would mean no limit)."""
    handler = Handler(db)
    status, _, _ = call(db.middleware(handler, deadline=30), "/twice")
    assert status == "200 OK"
    first, second = handler.timeouts
    assert 0 < second <= first <= 30_000


def test_a_deadline_beyond_postgresqls_longest_timeout_is_capped(
    db: Database,
) -> None:
    """Some 31 years is more than ``statement_timeout`` takes (an int of
    milliseconds): the longest it takes is set instead of an error."""
    handler = Handler(db)
    assert call(db.middleware(handler, deadline=1e9))[0] == "200 OK"
    assert handler.timeouts == [2**31 - 1]


def test_no_time_left_refuses_the_transaction(db: Database) -> None:
    """The deadline passed before the first query: no statement is sent,
    the handler sees ``DeadlineExceededError``, the request answers 503."""
    sent = statements(db)
    handler = Handler(db)
    status, _, body = call(db.middleware(handler, deadline=0.05), "/late")
    assert status == "503 Service Unavailable"
    assert b"ran out of time" in body
    [error] = handler.errors
    assert str(error).startswith(
        "The request's deadline (0.05 s) passed before this transaction began"
    )
    assert not is_transient(error)
    assert sent == []
    assert db.engine.pool.checkedout() == 0


def test_code_after_the_request_has_no_deadline(db: Database) -> None:
    """The deadline is the request's: once its session is ended, the same
    thread's sessions have none, even though that deadline has passed."""
    handler = Handler(db)
    assert call(db.middleware(handler, deadline=0.05), "/late")[0].startswith("503")
    _, shown = backend_pid_and_timeout(db)
    assert shown == "0"


def by_path(environ: WSGIEnvironment) -> float | None:
    return {"/report": 20.0, "/free": None}.get(environ["PATH_INFO"], 0.5)


def test_a_callable_sets_each_requests_deadline(db: Database) -> None:
    """The callable decides per request; ``None`` means no deadline, and
    then no ``set_config`` is sent."""
    sent = statements(db)
    handler = Handler(db)
    app = db.middleware(handler, deadline=by_path)
    for path in ("/report", "/api", "/free"):
        assert call(app, path)[0] == "200 OK"
    report, api, free = handler.timeouts
    assert 500 < report <= 20_000
    assert 0 < api <= 500
    assert free == 0
    assert len([statement for statement in sent if SET_CONFIG in statement]) == 2


def test_a_callable_object_returning_no_deadline_is_named_by_its_class(
    db: Database,
) -> None:
    """An object with ``__call__`` has no ``__qualname__`` of its own."""

    class Budget:
        def __call__(self, environ: WSGIEnvironment) -> float:
            return 0

    with pytest.raises(ValueError) as caught:
        call(db.middleware(Handler(db), deadline=Budget()))
    assert str(caught.value) == (
        f"The 'deadline' callable '{Budget.__qualname__}' returned 0: it must"
        " return a number of seconds > 0, or None for no deadline."
    )


@pytest.mark.parametrize(
    ("returned", "error", "shown"),
    [
        pytest.param(0, ValueError, "0", id="zero"),
        pytest.param(-1.5, ValueError, "-1.5", id="negative"),
        pytest.param(True, TypeError, "True", id="bool"),
        pytest.param("2", TypeError, "'2'", id="str"),
    ],
)
def test_a_callable_returning_no_deadline_fails_the_request(
    db: Database, returned: object, error: type[Exception], shown: str
) -> None:
    def pick(environ: WSGIEnvironment) -> t.Any:
        return returned

    app = db.middleware(Handler(db), deadline=pick)
    with pytest.raises(error) as caught:
        call(app)
    assert str(caught.value) == (
        f"The 'deadline' callable '{pick.__qualname__}' returned {shown}: it"
        " must return a number of seconds > 0, or None for no deadline."
    )
    assert db.engine.pool.checkedout() == 0


@pytest.mark.parametrize(
    ("deadline", "error"),
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(math.nan, ValueError, id="nan"),
        pytest.param(math.inf, ValueError, id="infinite"),
        pytest.param(True, TypeError, id="bool"),
        pytest.param("2", TypeError, id="str"),
    ],
)
def test_a_deadline_that_is_no_number_of_seconds_is_refused(
    deadline: object, error: type[Exception]
) -> None:
    db = Database("sqlite://")
    with pytest.raises(error) as caught:
        db.middleware(Handler(db), deadline=deadline)
    assert str(caught.value) == (
        "'deadline' must be a number of seconds > 0, or a callable taking the"
        f" environ and returning one (or None), got {deadline!r}. Fix: pass"
        " e.g. deadline=2.5, or None for no deadline."
    )


@pytest.mark.parametrize("url", ["sqlite://", "mysql+pymysql://root@127.0.0.1/x"])
def test_deadlines_are_not_yet_supported_beyond_postgresql(url: str) -> None:
    db = Database(url)
    backend = make_url(url).get_backend_name()
    with pytest.raises(ValueError) as caught:
        db.middleware(Handler(db), deadline=1)
    assert str(caught.value) == (
        f"'deadline' is not yet supported for {backend}: deadlines set"
        " PostgreSQL's statement_timeout. Fix: drop 'deadline', or use a"
        " PostgreSQL database."
    )
    db.engine.dispose()


def test_a_deadline_needs_a_registry_bound_to_one_engine() -> None:
    unbound = scoped_session(sessionmaker())
    with pytest.raises(TypeError, match="Deadlines need a wsgi_scoped.Database"):
        ScopedSessionMiddleware(Handler(unbound), unbound, deadline=1)
    engine = create_engine(server_url("postgresql"))
    factory = sessionmaker(engine)
    custom = scoped_session(lambda: factory())
    with pytest.raises(TypeError) as caught:
        ScopedSessionMiddleware(Handler(custom), custom, deadline=1)
    assert str(caught.value) == (
        "'deadline' needs a registry whose session factory is a sessionmaker,"
        f" got {custom.session_factory!r}. Create the registry with"
        " scoped_session(sessionmaker(engine))."
    )
    # A plain registry bound to a PostgreSQL engine is enough.
    plain = scoped_session(factory)
    handler = Handler(plain)
    assert call(ScopedSessionMiddleware(handler, plain, deadline=0.5))[0] == "200 OK"
    assert 0 < handler.timeouts[0] <= 500
    plain.remove()
    engine.dispose()


def test_nested_layers_must_agree_on_the_deadline(db: Database) -> None:
    inner = db.middleware(Handler(db), deadline=0.5)
    assert repr(inner).endswith(", deadline=0.5)>")
    with pytest.raises(ValueError, match="wrapped inside"):
        call(db.middleware(inner, deadline=1))
    handler = Handler(db)
    same = db.middleware(db.middleware(handler, deadline=0.5), deadline=0.5)
    assert call(same)[0] == "200 OK"


def test_an_outer_layers_deadline_is_the_requests(db: Database) -> None:
    """Two layers of two registries: the deadline stamped first (the
    outer layer's) applies to both, and outlives the inner layer."""
    other = Database(server_url("postgresql"))
    inner_handler = Handler(other)
    inner = other.middleware(inner_handler, deadline=0.3)
    seen: list[int] = []

    def outer_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = serve(inner, environ, start_response)
        seen.append(timeout_of(db()))
        return [body]

    try:
        assert call(db.middleware(outer_app, deadline=20))[0] == "200 OK"
        assert 300 < inner_handler.timeouts[0] <= 20_000
        assert 300 < seen[0] <= 20_000
        assert backend_pid_and_timeout(db)[1] == "0"
    finally:
        other.remove()
        other.engine.dispose()


def test_running_out_of_time_is_never_transient(db: Database) -> None:
    """A cancelled statement is not a conflict, and a transaction refused
    for lack of time is not one either, even when it was begun while the
    handler dealt with a serialization failure."""
    session = db()
    session.execute(text("SET LOCAL statement_timeout = 10"))
    with pytest.raises(OperationalError) as cancelled:
        session.execute(text("SELECT pg_sleep(1)"))
    db.remove()
    assert not is_transient(cancelled.value)
    conflict = OperationalError("COMMIT", {}, Exception("conflict"))
    conflict.orig.sqlstate = "40001"  # type: ignore[union-attr]
    assert is_transient(conflict)
    refused = DeadlineExceededError("no time left")
    refused.__context__ = conflict  # raised in an ``except`` of the conflict
    assert not is_transient(refused)


def test_a_retried_attempt_keeps_the_requests_clock(db: Database) -> None:
    """The clock starts once, when the request arrives: after a transient
    failure, the next attempt's transaction gets what is left, not a new
    deadline, and still gets one."""
    timeouts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        timeouts.append(timeout_of(db()))
        if len(timeouts) == 1:
            time.sleep(0.1)
            conflict = OperationalError("SELECT", {}, Exception("conflict"))
            conflict.orig.sqlstate = "40001"  # type: ignore[union-attr]
            raise conflict
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = db.middleware(app, commit=True, retries=1, deadline=20)
    assert call(wrapped, "/", "POST")[0] == "200 OK"
    first, second = timeouts
    assert 0 < second <= first - 100


def test_a_savepoint_keeps_its_transactions_limit(db: Database) -> None:
    """``begin_nested()`` opens no transaction of its own: no second
    ``set_config``, and the limit set at BEGIN holds inside it."""
    sent = statements(db)
    inside: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = db()
        session.execute(text("SELECT 1"))
        with session.begin_nested():
            inside.append(timeout_of(session))
        start_response("200 OK", [])
        return [b"ok"]

    assert call(db.middleware(app, deadline=0.5))[0] == "200 OK"
    assert 0 < inside[0] <= 500
    assert len([statement for statement in sent if SET_CONFIG in statement]) == 1


def test_without_a_deadline_a_cancelled_statement_is_not_a_503(
    db: Database,
) -> None:
    """A statement_timeout of the application's own stays its business."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        db().execute(text("SET LOCAL statement_timeout = 10"))
        db().execute(text("SELECT pg_sleep(1)"))
        return []

    with pytest.raises(OperationalError, match="statement timeout"):
        call(db.middleware(app))
    assert db.engine.pool.checkedout() == 0


def round_trips(url: str, proxy: Proxy, deadline: float | None) -> int:
    """Round trips of one request on a warm pool."""
    db = Database(proxy.url(url))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        db().execute(text("SELECT 1")).scalar_one()
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = db.middleware(app, commit=True, deadline=deadline)
    try:
        call(wrapped)
        before = proxy.round_trips
        call(wrapped)
        return proxy.round_trips - before
    finally:
        db.remove()
        db.engine.dispose()


def test_a_deadline_costs_one_round_trip_per_transaction() -> None:
    """Counted on the wire: ``set_config`` is one more exchange; without
    ``deadline`` a request costs what it cost before."""
    url = server_url("postgresql")
    target = make_url(url)
    with Proxy((str(target.host), int(target.port or 0))) as proxy:
        engine = create_engine(proxy.url(url))
        registry = scoped_session(sessionmaker(engine))

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            registry().execute(text("SELECT 1")).scalar_one()
            start_response("200 OK", [])
            return [b"ok"]

        bare = ScopedSessionMiddleware(app, registry, commit=True)
        call(bare)
        before = proxy.round_trips
        call(bare)
        bare_trips = proxy.round_trips - before
        registry.remove()
        engine.dispose()
        without = round_trips(url, proxy, None)
        with_deadline = round_trips(url, proxy, 5)
    assert without == bare_trips
    assert with_deadline == bare_trips + 1


@pytest.fixture
def bouncer() -> t.Iterator[pgbouncer.PgBouncer]:
    """PgBouncer in transaction pooling mode with one server connection, so
    every client shares it."""
    reason = pgbouncer.unusable_reason()
    if reason is not None:
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    with pgbouncer.run_pgbouncer(
        make_url(server_url("postgresql")), pool_size=1
    ) as running:
        yield running


@pytest.mark.parametrize("path", ["/", "/slow"], ids=["served", "cancelled"])
def test_a_deadline_does_not_leak_to_other_clients_of_pgbouncer(
    bouncer: pgbouncer.PgBouncer, path: str
) -> None:
    """Client A's requests run under a deadline, served or cancelled; client
    B, another engine on the same one server connection, then sees the
    default ``statement_timeout``: ``set_config(..., true)`` ends with the
    transaction, which is PgBouncer's unit of pooling."""
    no_prepare = {"prepare_threshold": None}  # PgBouncer shares the backend
    a = Database(bouncer.url, connect_args=no_prepare)
    b = create_engine(bouncer.url, poolclass=NullPool, connect_args=no_prepare)
    handler = Handler(a)
    try:
        app = a.middleware(handler, commit=True, deadline=0.3)
        status, _, _ = call(app, path, "POST")
        assert status == ("200 OK" if path == "/" else "503 Service Unavailable")
        assert 0 < handler.timeouts[0] <= 300
        with b.connect() as connection:
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            shown = connection.execute(text("SHOW statement_timeout")).scalar_one()
        with a.engine.connect() as connection:
            same = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        assert (shown, pid) == ("0", same)  # one server connection for both
        assert a.engine.pool.checkedout() == 0
    finally:
        a.remove()
        a.engine.dispose()
        b.dispose()


@pytest.fixture(scope="module")
def pair() -> t.Iterator[replica_pair.Pair]:
    """A primary and a streaming standby of this module's own."""
    reason = replica_pair.unusable_reason()
    if reason is not None:
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    with replica_pair.run_pair() as running:
        yield running


def replica_app(
    db: Database, seen: list[tuple[bool, int, list[str]]]
) -> WSGIApplication:
    """``POST /write/NAME`` inserts a row; every request records whether it ran
    on the standby, its ``statement_timeout`` and the names it reads."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        session = db()
        name = environ["PATH_INFO"].partition("/write/")[2]
        if name:
            session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
        standby = bool(session.execute(text("SELECT pg_is_in_recovery()")).scalar())
        names = list(session.scalars(text("SELECT name FROM item")))
        seen.append((standby, timeout_of(session), names))
        start_response("200 OK", [])
        return [b"ok"]

    return app


def test_a_deadline_limits_reads_on_a_replica_and_writes_on_the_primary(
    pair: replica_pair.Pair,
) -> None:
    db = Database(pair.primary, replicas=[pair.standby])
    seen: list[tuple[bool, int, list[str]]] = []
    app = db.middleware(replica_app(db, seen), commit=True, deadline=0.5)
    try:
        for method in ("GET", "POST"):
            assert call(app, "/", method)[0] == "200 OK"
        (read_on_standby, read_limit, _), (write_on_standby, write_limit, _) = seen
        assert (read_on_standby, write_on_standby) == (True, False)
        assert 0 < read_limit <= 500 and 0 < write_limit <= 500
        assert db.replicas[0].pool.checkedout() == db.engine.pool.checkedout() == 0
    finally:
        db.remove()
        for engine in (db.engine, *db.replicas):
            engine.dispose()


def test_read_your_writes_through_pgbouncer_under_a_deadline(
    pair: replica_pair.Pair,
) -> None:
    """The primary behind PgBouncer (transaction pooling, one server
    connection): a write under a deadline still gets the WAL position
    (``pg_current_wal_lsn()`` in autocommit goes through), a read that
    sends it back reads its write on the standby, and the shared server
    connection keeps the default ``statement_timeout``."""
    if pgbouncer.unusable_reason() is not None:
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(str(pgbouncer.unusable_reason()))
        pytest.skip(str(pgbouncer.unusable_reason()))
    no_prepare = {"prepare_threshold": None}
    with pgbouncer.run_pgbouncer(pair.primary, pool_size=1) as bouncer:
        db = Database(bouncer.url, replicas=[pair.standby], connect_args=no_prepare)
        seen: list[tuple[bool, int, list[str]]] = []
        app = db.middleware(replica_app(db, seen), commit=True, deadline=2)
        name = uuid.uuid4().hex
        try:
            status, headers, _ = call(app, f"/write/{name}", "POST")
            assert status == "200 OK"
            lsn = dict(headers)[LSN_HEADER]
            wait_for_replica(pair.primary, pair.standby)  # past lsn
            environ: WSGIEnvironment = {"HTTP_X_WSGI_SCOPED_LSN": lsn}
            wsgiref.util.setup_testing_defaults(environ)
            assert serve(app, environ, StartResponseRecorder()) == b"ok"
            (on_standby, limit, _), (read_on_standby, _, names) = seen
            assert (on_standby, read_on_standby) == (False, True)
            assert 0 < limit <= 2000 and name in names
            with db.engine.connect() as connection:
                shown = connection.execute(text("SHOW statement_timeout"))
                assert shown.scalar_one() == "0"
        finally:
            db.remove()
            for engine in (db.engine, *db.replicas):
                engine.dispose()


def test_every_registry_gets_the_deadline() -> None:
    """A sessionmaker made where a garbage-collected one lived still gets
    the deadline's listener: ``event.contains()`` would take it for the dead
    one, whose key SQLAlchemy keeps."""
    engine = create_engine(server_url("postgresql"))
    limits = []
    try:
        for _ in range(20):
            registry = scoped_session(sessionmaker(engine))
            handler = Handler(registry)
            app = ScopedSessionMiddleware(handler, registry, deadline=5)
            assert call(app)[0] == "200 OK"
            limits.extend(handler.timeouts)
            registry.remove()
            del registry, handler, app
            gc.collect()
    finally:
        engine.dispose()
    assert all(0 < limit <= 5000 for limit in limits)
