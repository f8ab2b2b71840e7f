"""Read replicas (#13): one role per request, read-your-writes by the
primary's WAL position, on a real primary and streaming hot standby that
these tests start (``tests/replica_pair.py``) and hold back with
``pg_wal_replay_pause()`` instead of sleeping."""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import logging
import os
import re
import sys
import threading
import time
import typing as t
import uuid
import wsgiref.util
from pathlib import Path
from wsgiref.validate import validator

import pytest
import replica_pair
import webtest
from conftest import CountingSession
from proxy import Proxy
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from support import CheckedTestApp
from support import http_call
from support import in_child
from support import replica_app_server

from wsgi_scoped import Database
from wsgi_scoped import ReplicaWriteError
from wsgi_scoped import RequestStats
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import WsgiScopedError
from wsgi_scoped import after_commit
from wsgi_scoped.observe import STATS_KEY
from wsgi_scoped.pytest_plugin import paused_replica
from wsgi_scoped.pytest_plugin import wait_for_replica
from wsgi_scoped.replicas import LSN_COOKIE
from wsgi_scoped.replicas import LSN_HEADER

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
#: The statement with which the router asks a replica how far it replayed.
REPLAY_CHECK = "pg_last_wal_replay_lsn() >="


@pytest.fixture(scope="module")
def pair() -> t.Iterator[replica_pair.Pair]:
    with replica_pair.pair_or_skip() as running:
        yield running


class Seen:
    """What the application saw: the server of each statement batch."""

    def __init__(self) -> None:
        self.replica: list[bool] = []
        self.names: list[str] = []
        #: Each request's statistics, when the middleware keeps them.
        self.stats: list[RequestStats | None] = []


def make_db(pair: replica_pair.Pair, **options: t.Any) -> Database:
    return Database(pair.primary, replicas=[pair.standby], **options)


@pytest.fixture
def db(pair: replica_pair.Pair) -> t.Iterator[Database]:
    db = make_db(pair)
    yield db
    db.remove()
    for engine in (db.engine, *db.replicas):
        engine.dispose()


def make_app(db: Database, seen: Seen) -> t.Callable[..., t.Any]:
    """``?write=NAME`` inserts a row, ``?primary=1`` asks for the primary
    first; every request then reports which server it ran on and the names
    it can read."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        query = dict(
            pair.split("=", 1) for pair in environ["QUERY_STRING"].split("&") if pair
        )
        if "primary" in query:
            db.use_primary()
        seen.stats.append(environ.get(STATS_KEY))
        session = db()
        if "write" in query:
            session.execute(
                text("INSERT INTO item (name) VALUES (:name)"), {"name": query["write"]}
            )
        seen.replica.append(
            session.execute(text("SELECT pg_is_in_recovery()")).scalar()
        )
        seen.names = list(session.scalars(text("SELECT name FROM item")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app


def client(db: Database, seen: Seen, **options: t.Any) -> CheckedTestApp:
    """A WebTest client that checks the primary's pool after each request;
    the replica's is checked by the tests."""
    module = type("module", (), {})()
    module.app = db.middleware(make_app(db, seen), **options)  # type: ignore[attr-defined]
    module.db = db  # type: ignore[attr-defined]
    return CheckedTestApp(module)  # type: ignore[arg-type]


def replay_checks(db: Database) -> list[str]:
    """The statements the replica runs from now on that check its replay."""
    checks: list[str] = []

    @event.listens_for(db.replicas[0], "before_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        if REPLAY_CHECK in statement:
            checks.append(statement)

    return checks


@pytest.mark.parametrize(
    ("method", "replica"),
    [
        pytest.param("GET", True, id="GET"),
        pytest.param("HEAD", True, id="HEAD"),
        pytest.param("OPTIONS", True, id="OPTIONS"),
        pytest.param("POST", False, id="POST"),
        pytest.param("PUT", False, id="PUT"),
        pytest.param("PATCH", False, id="PATCH"),
        pytest.param("DELETE", False, id="DELETE"),
    ],
)
def test_safe_methods_read_a_replica_others_the_primary(
    db: Database, method: str, replica: bool
) -> None:
    seen = Seen()
    app = client(db, seen, commit=True)
    app.request("/", method=method)
    assert seen.replica == [replica]
    assert db.replicas[0].pool.checkedout() == 0


def test_use_primary_before_the_first_query(db: Database) -> None:
    seen = Seen()
    client(db, seen, commit=True).get("/?primary=1")
    assert seen.replica == [False]


def test_use_primary_after_a_replica_query_is_refused(db: Database) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("SELECT 1"))
        db.use_primary()
        raise AssertionError("unreachable")

    with pytest.raises(WsgiScopedError, match="before any query"):
        db.middleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert not db.registry.has()
    assert db.replicas[0].pool.checkedout() == 0


def test_use_primary_after_a_primary_query_is_allowed(db: Database) -> None:
    seen = Seen()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("SELECT 1"))
        db.use_primary()
        seen.replica.append(db().execute(text("SELECT pg_is_in_recovery()")).scalar())
        start_response("200 OK", [])
        return []

    db.middleware(app)({"REQUEST_METHOD": "POST"}, lambda *a: None)
    assert seen.replica == [False]


def test_all_statements_of_a_request_go_to_one_server(
    db: Database, pair: replica_pair.Pair
) -> None:
    """A handler's own commit, a new session and a lazy body stay on the
    server the request's first statement chose."""
    ports: list[int] = []

    def port() -> None:
        ports.append(db().execute(text("SELECT inet_server_port()")).scalar_one())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        port()
        db().commit()
        port()
        db.remove()
        port()
        start_response("200 OK", [])

        def body() -> t.Iterator[bytes]:
            port()
            yield b"done"

        return body()

    response = db.middleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert list(response) == [b"done"]
    response.close()  # type: ignore[attr-defined]
    assert ports == [pair.standby.port] * 4
    assert db.replicas[0].pool.checkedout() == 0


def test_a_retried_request_keeps_its_role(db: Database) -> None:
    """Each attempt of a retried GET is routed afresh, to a replica again."""
    roles: list[bool] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        roles.append(db().execute(text("SELECT pg_is_in_recovery()")).scalar())
        if len(roles) == 1:  # a serialization failure, raised by the standby
            db().execute(
                text("DO $$BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END$$")
            )
        start_response("200 OK", [])
        return []

    middleware = db.middleware(app, commit=True, retries=1, retry_backoff=0)
    middleware({"REQUEST_METHOD": "GET", "wsgi.input": None}, lambda *a: None)
    assert roles == [True, True]


def test_two_databases_route_one_request_each_their_own_way(
    db: Database, pair: replica_pair.Pair
) -> None:
    """Two replicated databases around one request (two middleware layers):
    use_primary() on one leaves the other on its replica."""
    other = make_db(pair)
    roles: dict[str, bool] = {}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        other.use_primary()
        for label, database in (("db", db), ("other", other)):
            query = text("SELECT pg_is_in_recovery()")
            roles[label] = database().execute(query).scalar_one()
        start_response("200 OK", [])
        return []

    try:
        layered = db.middleware(other.middleware(app))
        layered({"REQUEST_METHOD": "GET"}, lambda *a: None)
        assert roles == {"db": True, "other": False}
    finally:
        other.remove()
        for engine in (other.engine, *other.replicas):
            engine.dispose()


def test_a_session_outside_requests_uses_the_primary(db: Database) -> None:
    db.use_primary()  # nothing to do outside a request
    assert db().execute(text("SELECT pg_is_in_recovery()")).scalar() is False
    db().commit()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_never_uses_the_parents_replica_connections(
    db: Database,
) -> None:
    """gunicorn --preload: the replicas' pools are fresh in the child too."""
    pids: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        pids.append(db().execute(text("SELECT pg_backend_pid()")).scalar_one())
        start_response("200 OK", [])
        return []

    middleware = db.middleware(app)

    def get() -> int:
        middleware({"REQUEST_METHOD": "GET"}, lambda *a: None)
        return pids[-1]

    parent = get()  # its replica connection is pooled now
    assert in_child(get) != parent
    assert get() == parent


def test_a_session_class_keeps_its_type(pair: replica_pair.Pair) -> None:
    db = make_db(pair, class_=CountingSession)
    try:
        assert isinstance(db(), CountingSession)
    finally:
        db.remove()


def test_a_write_on_a_replica_names_the_fix(db: Database) -> None:
    seen = Seen()
    app = client(db, seen, commit=True)
    name = uuid.uuid4().hex
    with pytest.raises(ReplicaWriteError, match=r"call db.use_primary\(\)") as info:
        app.get(f"/?write={name}")
    assert getattr(info.value.__cause__, "sqlstate", None) == "25006"
    assert db.replicas[0].pool.checkedout() == 0
    with db.engine.connect() as connection:
        found = connection.execute(
            text("SELECT 1 FROM item WHERE name = :n"), {"n": name}
        )
        assert found.first() is None


def test_a_refused_write_without_retries_leaves_the_next_request_alone(
    db: Database,
) -> None:
    """Without retries (commit=False) the refused write fails its request;
    the next GET on this thread reads a replica as any other."""
    seen = Seen()
    app = client(db, seen)
    with pytest.raises(ReplicaWriteError):
        app.get(f"/?write={uuid.uuid4().hex}")
    app.get("/")
    assert seen.replica == [True]  # the write failed before its report


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_statement_that_names_its_server_runs_there(
    db: Database, method: str
) -> None:
    """``bind_arguments={"bind": engine}`` wins over the request's route,
    as it does on any Session; the request's other statements keep theirs."""
    servers: list[tuple[bool, bool]] = []
    in_recovery = text("SELECT pg_is_in_recovery()")
    other = db.replicas[0] if method == "POST" else db.engine

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        named = db().execute(in_recovery, bind_arguments={"bind": other}).scalar()
        servers.append((named, db().execute(in_recovery).scalar()))
        start_response("200 OK", [])
        return [b"ok"]

    webtest.TestApp(db.middleware(app)).request("/", method=method)
    assert servers == [(method == "POST", method == "GET")]


def test_other_errors_on_a_replica_are_unchanged(db: Database) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("SELECT * FROM no_such_table"))
        raise AssertionError("unreachable")

    with pytest.raises(ProgrammingError, match="no_such_table"):
        db.middleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)


def test_statements_that_write_nothing_send_no_wal_position(db: Database) -> None:
    """A POST on the primary whose statements only read, show, set or take
    savepoints (one-word status tags: SHOW, SET, SAVEPOINT, RELEASE) wrote
    nothing: its response carries no position."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        session = db()
        session.execute(text("SHOW server_version"))
        session.execute(text("SET LOCAL statement_timeout = 5000"))
        with session.begin_nested():
            session.execute(text("SELECT count(*) FROM item"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    app_under_test = webtest.TestApp(db.middleware(app, commit=True))
    response = app_under_test.post("/")
    assert LSN_HEADER not in response.headers
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
def test_an_error_page_after_start_response_reaches_the_server(
    db: Database, commit: bool
) -> None:
    """A handler that started a response and then failed calls
    start_response again with exc_info (PEP 3333): the server gets that
    call, exc_info included, so the error page replaces the first status."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            db().execute(text("SELECT * FROM no_such_table"))
        except ProgrammingError:
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain")],
                sys.exc_info(),
            )
            return [b"error page"]
        raise AssertionError("unreachable")

    environ: dict[str, t.Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ["QUERY_STRING"] = ""
    calls: list[tuple[str, object]] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
    ) -> t.Callable[[bytes], object]:
        calls.append((status, exc_info and exc_info[0]))
        return lambda data: None

    wrapped = validator(db.middleware(app, commit=commit))
    body = wrapped(environ, start_response)
    assert b"".join(body) == b"error page"
    body.close()  # type: ignore[attr-defined]
    assert calls[-1] == ("500 Internal Server Error", ProgrammingError)
    assert db.replicas[0].pool.checkedout() == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_committed_write_sends_the_wal_position(db: Database, scheme: str) -> None:
    seen = Seen()
    app = client(db, seen, commit=True)
    response = app.post(f"{scheme}://localhost/?write={uuid.uuid4().hex}")
    lsn = response.headers[LSN_HEADER]
    assert LSN.fullmatch(lsn)
    cookie = response.headers["Set-Cookie"]
    attributes = "; Path=/; HttpOnly; SameSite=Lax"
    if scheme == "https":
        attributes += "; Secure"
    assert cookie == f"{LSN_COOKIE}={lsn}{attributes}"
    with db.engine.connect() as connection:
        # The position is the commit's: the write is at or before it.
        ahead = connection.execute(
            text("SELECT pg_current_wal_lsn() >= CAST(:lsn AS pg_lsn)"), {"lsn": lsn}
        )
        assert ahead.scalar() is True


def test_a_handler_commit_before_the_response_sends_the_wal_position(
    db: Database,
) -> None:
    """commit=False: the handler's own commit, made before start_response."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("INSERT INTO item (name) VALUES ('handler')"))
        db().commit()
        start_response("200 OK", [])
        return []

    headers: list[tuple[str, str]] = []
    db.middleware(app)(
        {"REQUEST_METHOD": "POST"}, lambda s, h, e=None: headers.extend(h)
    )
    assert [name for name, value in headers] == [LSN_HEADER, "Set-Cookie"]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/", id="GET on a replica"),
        pytest.param("/?primary=1", id="GET on the primary"),
    ],
)
def test_reads_send_no_wal_position(db: Database, path: str) -> None:
    seen = Seen()
    response = client(db, seen, commit=True).get(path)
    assert LSN_HEADER not in response.headers
    assert "Set-Cookie" not in response.headers


def test_a_read_only_or_rolled_back_write_request_sends_no_wal_position(
    db: Database,
) -> None:
    seen = Seen()
    app = client(db, seen, commit=True)
    assert LSN_HEADER not in app.post("/").headers  # reads only

    def failing(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("INSERT INTO item (name) VALUES ('vetoed')"))
        start_response("400 Bad Request", [])
        return []

    headers: list[tuple[str, str]] = []
    failing_app = db.middleware(failing, commit=True)
    failing_app({"REQUEST_METHOD": "POST"}, lambda s, h, e=None: headers.extend(h))
    assert headers == []


@pytest.mark.parametrize("carrier", ["cookie", "header"])
def test_read_your_writes_on_a_lagging_replica(
    db: Database, pair: replica_pair.Pair, carrier: str
) -> None:
    """While the standby replays nothing, a client that wrote reads its write
    from the primary, others read the stale replica; once the standby has
    replayed the position, the writer reads the replica again."""
    seen = Seen()
    app = client(db, seen, commit=True)
    name = uuid.uuid4().hex
    with paused_replica(pair.standby):
        lsn = app.post(f"/?write={name}").headers[LSN_HEADER]
        if carrier == "header":
            app.reset()  # forget the cookie: an API client sends the header
        sent = {LSN_HEADER: lsn} if carrier == "header" else {}
        app.get("/", headers=sent)
        assert seen.replica[-1] is False
        assert name in seen.names
        app.reset()
        app.get("/")  # without the position: the replica, behind
        assert seen.replica[-1] is True
        assert name not in seen.names
    wait_for_replica(db)
    if carrier == "cookie":
        app.set_cookie(LSN_COOKIE, lsn)
    app.get("/", headers=sent)
    assert seen.replica[-1] is True
    assert name in seen.names
    assert db.replicas[0].pool.checkedout() == 0


def test_a_request_waits_for_the_replica_to_replay(pair: replica_pair.Pair) -> None:
    """With a long wait, the request polls the paused standby; once replay
    resumes it reads its write from the replica."""
    db = make_db(pair, replica_wait=30)
    seen = Seen()
    app = client(db, seen, commit=True)
    checks = replay_checks(db)
    name = uuid.uuid4().hex
    try:
        with paused_replica(db.replicas[0]):
            lsn = app.post(f"/?write={name}").headers[LSN_HEADER]
            reader = threading.Thread(target=app.get, args=("/",))
            reader.start()
            deadline = time.monotonic() + 15
            while len(checks) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)  # until the reader has found the replica behind
            assert len(checks) >= 2
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert seen.replica[-1] is True
        assert name in seen.names
        assert LSN.fullmatch(lsn)
    finally:
        db.remove()
        for engine in (db.engine, *db.replicas):
            engine.dispose()


@pytest.mark.parametrize(
    ("path", "method", "lagging", "role", "timing"),
    [
        pytest.param("/", "GET", False, "replica", "2 queries", id="GET"),
        pytest.param("/", "POST", False, "primary", "2 queries", id="POST"),
        pytest.param("/?primary=1", "GET", False, "primary", "2 queries", id="primary"),
        pytest.param("/", "GET", True, "primary", None, id="GET, position ahead"),
    ],
)
def test_statistics_and_server_timing_say_which_role_served(
    db: Database,
    path: str,
    method: str,
    lagging: bool,
    role: str,
    timing: str | None,
) -> None:
    """The role of the server that ran the request's statements, counted
    wherever they ran; a client that sent back a position the paused
    replica has not replayed is served by the primary."""
    seen = Seen()
    app = client(db, seen, commit=True, stats=True, server_timing=True)
    paused = paused_replica(db.replicas[0]) if lagging else contextlib.nullcontext()
    with paused:
        if lagging:
            app.post(f"/?write={uuid.uuid4().hex}")  # its cookie has the position
        response = app.request(path, method=method)
    stats = seen.stats[-1]
    assert stats is not None
    assert stats.role == role
    assert seen.replica[-1] is (role == "replica")
    server_timing = response.headers["Server-Timing"]
    assert server_timing.endswith(f", db-role;desc={role}")
    if timing is None:  # the handler's two, and the replica's replay checks
        assert stats.statements > 2
    else:
        assert f'desc="{timing}"' in server_timing
        assert stats.statements == 2
    assert f"role={role!r}" in repr(stats)


def test_replica_statements_are_counted_when_the_primary_was_observed_first(
    db: Database,
) -> None:
    """Another layer with statistics on a registry bound to the primary
    alone observed it first: the Database's layer still counts what runs on
    its replicas."""
    other = scoped_session(sessionmaker(db.engine))
    ScopedSessionMiddleware(lambda environ, start_response: [], other, stats=True)
    seen = Seen()
    client(db, seen, stats=True).get("/")
    stats = seen.stats[-1]
    assert stats is not None
    assert (stats.role, stats.statements) == ("replica", 2)
    assert seen.replica[-1] is True


def test_no_role_without_a_statement_or_without_replicas(
    db: Database, pair: replica_pair.Pair
) -> None:
    def idle(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        return []

    plain = Database(pair.primary)
    seen = Seen()
    try:
        for database, app in ((db, idle), (plain, make_app(plain, seen))):
            sent: dict[str, str] = {}
            environ: dict[str, t.Any] = {"REQUEST_METHOD": "GET", "QUERY_STRING": ""}
            database.middleware(app, server_timing=True)(
                environ, lambda s, h, e=None, sent=sent: sent.update(h)
            )
            assert environ[STATS_KEY].role is None
            assert "db-role" not in sent["Server-Timing"]
        assert seen.replica == [False]
    finally:
        plain.engine.dispose()


def test_statement_warnings_say_which_role_served(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    app = client(db, seen, commit=True, warn_statements=1, warn_db_time=0)
    app.get("/")
    app.post("/")
    times = [f"{stats.db_time:.3f}" for stats in seen.stats if stats is not None]
    assert [r.getMessage() for r in caplog.records] == [
        "GET / ran 2 SQL statements on a replica (the limit is 1): an N+1 query?",
        f"GET / spent {times[0]} s in the database on a replica (the limit is 0.000 s)",
        "POST / ran 2 SQL statements on the primary (the limit is 1): an N+1 query?",
        f"POST / spent {times[1]} s in the database on the primary"
        " (the limit is 0.000 s)",
    ]


def on_replica(db: Database, name: str) -> bool:
    """Whether the replica has the row ``name``."""
    with db.replicas[0].connect() as connection:
        query = text("SELECT 1 FROM item WHERE name = :n")
        return connection.execute(query, {"n": name}).first() is not None


def insert(db: Database, name: str) -> None:
    with db.engine.begin() as connection:
        connection.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})


@pytest.mark.parametrize("given", ["URLs", "engines"])
def test_a_paused_replica_has_a_write_once_waited_for(
    db: Database, pair: replica_pair.Pair, given: str
) -> None:
    """paused_replica() holds a write back on the replica, deterministically;
    wait_for_replica() waits for the write once replay resumes."""
    primary: t.Any = pair.primary
    replica: t.Any = pair.standby.set(password="hunter2")  # trust: not asked
    if given == "engines":
        primary, replica = db.engine, db.replicas[0]
    name = uuid.uuid4().hex
    with paused_replica(replica):
        insert(db, name)
        with pytest.raises(TimeoutError) as caught:
            wait_for_replica(primary, replica, timeout=0.1)
        assert not on_replica(db, name)
    where = (db.replicas[0].url if given == "engines" else replica).render_as_string(
        hide_password=True
    )
    assert re.fullmatch(
        f"The replica {re.escape(where)} did not replay the primary's WAL up to"
        r" [0-9A-F]+/[0-9A-F]+ within 0.1 s. Is its replay paused"
        r" \(paused_replica\(\) around this call\), and is it a streaming"
        " standby of this primary\\?",
        str(caught.value),
    )
    assert "hunter2" not in str(caught.value)
    lsn = wait_for_replica(primary, replica)
    assert LSN.fullmatch(lsn)
    assert on_replica(db, name)
    with db.engine.connect() as connection:
        ahead = text("SELECT pg_current_wal_lsn() >= CAST(:lsn AS pg_lsn)")
        assert connection.execute(ahead, {"lsn": lsn}).scalar() is True


def test_wait_for_replica_waits_for_a_replica_to_resume(db: Database) -> None:
    """Replay resumes 0.2 s into the wait: the wait ends then, within its
    timeout of less than a second, with the write on the replica."""
    name = uuid.uuid4().hex
    paused = threading.Event()

    def hold_back() -> None:
        with paused_replica(db.replicas[0]):
            insert(db, name)
            paused.set()
            time.sleep(0.2)

    holder = threading.Thread(target=hold_back)
    holder.start()
    assert paused.wait(timeout=10)
    started = time.monotonic()
    wait_for_replica(db, timeout=0.9)
    waited = time.monotonic() - started
    holder.join()
    assert 0.1 < waited < 0.9
    assert on_replica(db, name)


def test_wait_for_replica_waits_for_each_replica_of_a_database(db: Database) -> None:
    name = uuid.uuid4().hex
    with paused_replica(db.replicas[0]):
        insert(db, name)
        with pytest.raises(TimeoutError, match="Is its replay paused"):
            wait_for_replica(db, timeout=0)
    wait_for_replica(db)
    assert on_replica(db, name)


def test_a_paused_replica_resumes_when_the_block_raises(db: Database) -> None:
    paused = text("SELECT pg_is_wal_replay_paused()")
    with pytest.raises(KeyError), paused_replica(db.replicas[0]):
        with db.replicas[0].connect() as connection:
            assert connection.execute(paused).scalar() is True
        raise KeyError("the test failed")
    with db.replicas[0].connect() as connection:
        assert connection.execute(paused).scalar() is False


def test_wait_for_replica_needs_a_replica_and_a_server(pair: replica_pair.Pair) -> None:
    plain = Database("sqlite://")
    for primary in (plain, plain.engine):  # a Database without replicas, an engine
        with pytest.raises(TypeError) as caught:
            wait_for_replica(primary)
        assert str(caught.value) == (
            f"wait_for_replica() got no replica to wait for: {primary!r} has no"
            " 'replicas'. Pass a Database with replicas, or the replica's engine"
            " or URL: wait_for_replica(primary, replica)."
        )
    with pytest.raises(TypeError, match="The replica helpers need a wsgi_scoped"):
        wait_for_replica(42, pair.standby)  # type: ignore[arg-type]
    plain.engine.dispose()


def test_wait_for_replica_waits_ten_seconds_by_default() -> None:
    """README, "Testing with read replicas": "After timeout seconds (default
    10)"; the wait itself is tested with shorter timeouts."""
    timeout = inspect.signature(wait_for_replica).parameters["timeout"]
    assert timeout.default == 10
    readme = Path(__file__).parent.parent / "README.rst"
    assert "(default 10)" in " ".join(readme.read_text().split())


README_APP = """
import urllib.parse

import pytest
import webtest
from sqlalchemy import text

from wsgi_scoped import Database

db = Database({primary!r}, replicas=[{standby!r}])


def todos(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        form = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        title = urllib.parse.parse_qs(form.decode())["title"][0]
        db().execute(text("INSERT INTO item (name) VALUES (:n)"), {{"n": title}})
    titles = db().scalars(text("SELECT name FROM item WHERE name = 'milk'"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [" ".join(titles).encode()]


@pytest.fixture
def testapp():
    yield webtest.TestApp(db.middleware(todos, commit=True))
    db.engine.dispose()
    db.replicas[0].dispose()


"""


def test_readme_replica_testing_sample_passes(
    pair: replica_pair.Pair, pytester: pytest.Pytester
) -> None:
    """README, "Testing with read replicas": its test, as written, against
    a todo application on the pair."""
    from test_docs import readme_python_blocks

    (sample,) = readme_python_blocks("Testing with read replicas")
    urls = {
        "primary": pair.primary.render_as_string(),
        "standby": pair.standby.render_as_string(),
    }
    engine = create_engine(pair.primary)
    with engine.begin() as connection:  # the sample's title, from an earlier run
        connection.execute(text("DELETE FROM item WHERE name = 'milk'"))
    engine.dispose()
    pytester.makepyfile(test_readme=README_APP.format(**urls) + sample)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)


PLUGIN_CONFTEST = """
import pytest
from sqlalchemy import text

from wsgi_scoped import Database


@pytest.fixture(scope="session")
def wsgi_scoped_registry():
    db = Database({primary!r}, replicas=[{standby!r}])
    yield db
    db.engine.dispose()
    db.replicas[0].dispose()


@pytest.fixture
def wsgi_scoped_app(wsgi_scoped_registry):
    db = wsgi_scoped_registry

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            db().execute(text("INSERT INTO item (name) VALUES ({name!r})"))
        found = db().execute(text("SELECT count(*) FROM item WHERE name = {name!r}"))
        start_response("200 OK", [])
        return [str(found.scalar_one()).encode()]

    return db.middleware(app, commit=True)
"""

PLUGIN_TESTS = """
def test_writes(wsgi_scoped_testapp):
    wsgi_scoped_testapp.post("/")
    assert wsgi_scoped_testapp.get("/").text == "1"


def test_changes_dont_persist(wsgi_scoped_testapp):
    assert wsgi_scoped_testapp.get("/").text == "0"
"""


def test_the_pytest_plugin_keeps_requests_in_the_tests_transaction(
    pair: replica_pair.Pair, pytester: pytest.Pytester
) -> None:
    """The plugin binds sessions to the test's connection on the primary:
    requests are not routed, and their writes are rolled back."""
    urls = {
        "primary": pair.primary.render_as_string(),
        "standby": pair.standby.render_as_string(),
        "name": uuid.uuid4().hex,
    }
    pytester.makeconftest(PLUGIN_CONFTEST.format(**urls))
    pytester.makepyfile(PLUGIN_TESTS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("headers", "checked"),
    [
        pytest.param({LSN_HEADER: "ffffffff/ffffffff"}, False, id="lower case"),
        pytest.param({LSN_HEADER: "FFFFFFFFF/0"}, False, id="too many digits"),
        pytest.param({LSN_HEADER: "1/2/3"}, False, id="three parts"),
        pytest.param({LSN_HEADER: ""}, False, id="empty"),
        pytest.param({LSN_HEADER: "0/0'; DROP TABLE item; --"}, False, id="injection"),
        pytest.param({LSN_HEADER: "0/1" * 10000}, False, id="long"),
        pytest.param({"Cookie": f"{LSN_COOKIE}=zz/1"}, False, id="bad cookie"),
        pytest.param({"Cookie": f"x{LSN_COOKIE}=0/1"}, False, id="other cookie"),
        pytest.param({"Cookie": "session=abc"}, False, id="no cookie of ours"),
        pytest.param({LSN_HEADER: "FFFFFFFF/FFFFFFFF"}, True, id="forged, far ahead"),
    ],
)
def test_malformed_or_forged_positions_never_fail(
    db: Database, headers: dict[str, str], checked: bool
) -> None:
    """A malformed position is ignored (no check, the replica); one far
    ahead costs the bounded wait, then the primary."""
    seen = Seen()
    app = client(db, seen, commit=True)
    checks = replay_checks(db)
    app.get("/", headers=headers)
    assert bool(checks) is checked
    assert seen.replica == [not checked]


def test_an_unreadable_wal_position_is_logged_and_the_commit_stands(
    pair: replica_pair.Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool has one connection, which an after-commit hook takes: the
    position cannot be read, the response goes out without it."""
    db = make_db(pair, pool_size=1, max_overflow=0, pool_timeout=0.1)
    held: list[t.Any] = []
    name = uuid.uuid4().hex

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        db().execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
        after_commit(db(), lambda: held.append(db.engine.connect()))
        start_response("200 OK", [])
        return []

    headers: list[tuple[str, str]] = []
    try:
        db.middleware(app, commit=True)(
            {"REQUEST_METHOD": "POST", "PATH_INFO": "/"},
            lambda s, h, e=None: headers.extend(h),
        )
        assert headers == []
        assert [
            r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
        ] == ["Reading the primary's WAL position failed for POST /"]
        found = held[0].execute(text("SELECT 1 FROM item WHERE name = :n"), {"n": name})
        assert found.first() is not None
    finally:
        for connection in held:
            connection.close()
        db.remove()
        for engine in (db.engine, *db.replicas):
            engine.dispose()


@pytest.mark.parametrize(
    ("url", "replicas"),
    [
        pytest.param("mysql+pymysql://u@h/d", ["mysql+pymysql://u@r/d"], id="mysql"),
        pytest.param("sqlite://", ["sqlite://"], id="sqlite"),
        pytest.param(
            "postgresql+psycopg://u@h/d", ["mysql+pymysql://u@r/d"], id="mixed"
        ),
    ],
)
def test_replicas_other_than_postgresql_are_not_yet_supported(
    url: str, replicas: list[str]
) -> None:
    with pytest.raises(ValueError, match="not yet supported for (mysql|sqlite)"):
        Database(url, replicas=replicas)


def test_replicas_must_be_a_list() -> None:
    with pytest.raises(TypeError, match=r"replicas=\[replica_url\]"):
        Database("postgresql+psycopg://u@h/d", replicas="postgresql+psycopg://u@r/d")
    with pytest.raises(ValueError, match="'replica_wait' must be a number"):
        Database("postgresql+psycopg://u@h/d", replica_wait=-1)


def test_no_replicas_is_a_plain_database() -> None:
    db = Database("sqlite://", replicas=[])
    assert db.replicas == ()
    assert not hasattr(db, "_request_started")
    db.use_primary()  # nothing to do
    db.engine.dispose()


def count_round_trips(
    pair: replica_pair.Pair, primary: Proxy, standby: Proxy, replicas: list[str]
) -> dict[str, tuple[int, int]]:
    """Round trips (to the primary, to the standby) of a write, a read and
    a read that sends back the write's position, through the proxies."""
    name = uuid.uuid4().hex
    db = Database(primary.url(pair.primary.render_as_string()), replicas=replicas)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            db().execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
        else:
            db().execute(text("SELECT count(*) FROM item")).scalar()
        start_response("200 OK", [])
        return []

    middleware = db.middleware(app, commit=True)

    def run(method: str, **environ: t.Any) -> list[tuple[str, str]]:
        sent: list[tuple[str, str]] = []
        environ.update(REQUEST_METHOD=method)
        environ["wsgi.input"] = None
        middleware(environ, lambda s, h, e=None: sent.extend(h))
        return sent

    def count(method: str, **environ: t.Any) -> tuple[int, int]:
        before = (primary.round_trips, standby.round_trips)
        run(method, **environ)
        return (primary.round_trips - before[0], standby.round_trips - before[1])

    try:
        run("POST"), run("GET")  # connect, warm the pools
        trips = {"write": count("POST"), "read": count("GET")}
        lsn = dict(run("POST")).get(LSN_HEADER, "0/0")
        wait_for_replica(pair.primary, pair.standby)
        trips["read after write"] = count("GET", HTTP_X_WSGI_SCOPED_LSN=lsn)
        return trips
    finally:
        db.remove()
        for engine in (db.engine, *db.replicas):
            engine.dispose()


def test_a_write_costs_one_round_trip_and_a_position_check_one(
    pair: replica_pair.Pair,
) -> None:
    """Counted on the wire: reading the WAL position after a write, and
    checking it on the replica, are one statement each, with no BEGIN or
    ROLLBACK around them."""
    with (
        Proxy(("127.0.0.1", t.cast(int, pair.primary.port))) as primary,
        Proxy(("127.0.0.1", t.cast(int, pair.standby.port))) as standby,
    ):
        without = count_round_trips(pair, primary, standby, [])
        replica = standby.url(pair.standby.render_as_string())
        routed = count_round_trips(pair, primary, standby, [replica])
    bare = without["write"][0]
    assert without == {
        "write": (bare, 0),
        "read": (bare, 0),
        "read after write": (bare, 0),
    }
    assert routed == {
        "write": (bare + 1, 0),
        "read": (0, bare),
        "read after write": (0, bare + 1),
    }


def write_then_read(port: int) -> tuple[bool, bool, bool]:
    """A client's write, then its read with the position it was given:
    (write on the primary, read on a replica, read found the write)."""
    name = uuid.uuid4().hex
    wrote, headers = http_call(port, "POST", f"/?name={name}")
    read, _ = http_call(
        port, "GET", f"/?name={name}", {LSN_HEADER: headers[LSN_HEADER]}
    )
    return not wrote["replica"], read["replica"], read["found"]


@pytest.mark.server
@pytest.mark.parametrize("worker", ["gthread", "gevent"])
def test_concurrent_writers_read_their_writes_under_gunicorn(
    pair: replica_pair.Pair, tmp_path: Path, worker: str
) -> None:
    """Concurrent write-then-read clients under a real server: every write on
    the primary, every read finds its write (0 stale), requests interleaved
    in one worker never share a role, and no connection is left open in a
    transaction."""
    with replica_app_server(pair, tmp_path, worker) as port:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: write_then_read(port), range(200)))
        assert all(primary for primary, _, _ in results)
        assert all(found for _, _, found in results), "stale reads"
        replica_reads = sum(replica for _, replica, _ in results)
        # Reads that found the replica behind after 20 ms used the primary.
        assert replica_reads > 0
        idle = text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
            " 'wsgi_scoped_replica_app' AND state LIKE 'idle in transaction%'"
        )
        for url in (pair.primary, pair.standby):
            engine = create_engine(url)
            try:
                with engine.connect() as connection:
                    assert connection.execute(idle).scalar() == 0
            finally:
                engine.dispose()
        print(f"{worker}: {replica_reads} of {len(results)} reads on the replica")
