"""Observability: per-request statistics, Server-Timing, warnings about
costly or lossy requests, SQL comment tags, and the health check."""

from __future__ import annotations

import logging
import threading
import time
import typing as t

import pytest
from conftest import BODY_KINDS
from conftest import Observed
from conftest import StartResponseRecorder
from conftest import count_items
from conftest import make_app
from conftest import serve
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import RequestStats
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import get_ident
from wsgi_scoped import observe
from wsgi_scoped.observe import _before

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment


def served_in(
    wrapped: WSGIApplication,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> tuple[RequestStats, float]:
    """Serve one request: its statistics, and the seconds it took, which
    bound every figure of it."""
    started = time.perf_counter()
    serve(wrapped, environ, start_response)
    return environ["wsgi_scoped.stats"], time.perf_counter() - started


def test_no_listener_without_statistics(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """Statistics off costs nothing: no event listener, no environ key."""
    registry = scoped_session(sessionmaker(engine))
    app = make_app(registry, "list", Observed())
    serve(ScopedSessionMiddleware(app, registry, commit=True), environ, start_response)
    assert not event.contains(engine, "before_cursor_execute", _before)
    assert "wsgi_scoped.stats" not in environ


@pytest.mark.parametrize("body_kind", ["list", "generator"])
def test_statistics_count_the_requests_work(
    backend_url: str,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    """Readable by the app while it runs and by outer code afterwards; a
    streamed body's statements count too."""
    engine = create_engine(backend_url)
    registry = scoped_session(sessionmaker(engine))
    during: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        registry().execute(text("SELECT 2"))
        during.append(environ["wsgi_scoped.stats"].statements)
        start_response("200 OK", [])
        if body_kind == "list":
            return [b"x"]

        def body() -> t.Iterator[bytes]:
            registry().execute(text("SELECT 3"))
            yield b"x"

        return body()

    try:
        wrapped = ScopedSessionMiddleware(app, registry, stats=True)
        serve(wrapped, environ, start_response)
        stats = environ["wsgi_scoped.stats"]
        assert isinstance(stats, RequestStats)
        assert during == [2]
        assert stats.statements == (2 if body_kind == "list" else 3)
        assert stats.db_time > 0
        assert stats.connection_held >= stats.db_time
        assert stats.checkout_wait > 0
        assert "statements=" in repr(stats)
    finally:
        engine.dispose()


@pytest.mark.parametrize("body_kind", BODY_KINDS)
@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
def test_server_timing_header_for_every_body_kind(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
    commit: bool,
) -> None:
    app = make_app(registry, body_kind, Observed())
    wrapped = ScopedSessionMiddleware(app, registry, commit=commit, server_timing=True)
    serve(wrapped, environ, start_response)
    [(status, headers, _)] = start_response.calls
    assert status == "200 OK"
    [timing] = [value for name, value in headers if name == "Server-Timing"]
    assert timing.startswith("db;dur=")
    assert 'desc="1 queries"' in timing  # the handler's INSERT, before the body
    assert "INSERT" not in timing and "item" not in timing
    assert ", db-wait;dur=" in timing


def test_server_timing_for_generator_app_starting_late(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"late"

    wrapped = ScopedSessionMiddleware(app, registry, server_timing=True)
    assert serve(wrapped, environ, start_response) == b"late"
    names = [name for name, _ in start_response.calls[0][1]]
    assert names == ["Content-Type", "Server-Timing"]


def test_statement_and_time_warnings_name_the_request(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        for number in range(3):
            registry().execute(text("SELECT :secret"), {"secret": f"s3cr3t{number}"})
        start_response("200 OK", [])
        return [b""]

    environ["PATH_INFO"] = "/orders"
    wrapped = ScopedSessionMiddleware(
        app, registry, warn_statements=2, warn_db_time=0.0
    )
    serve(wrapped, environ, start_response)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == (
        "GET /orders ran 3 SQL statements (the limit is 2): an N+1 query?"
    )
    assert messages[1].startswith("GET /orders spent ")
    assert all("s3cr3t" not in message for message in messages)

    caplog.clear()
    quiet = ScopedSessionMiddleware(app, registry, warn_statements=3)
    serve(quiet, dict(environ), start_response)
    assert caplog.records == []

    # Zero is a limit too: any statement, any time in the database.
    for option in ({"warn_statements": 0}, {"warn_db_time": 0}):
        caplog.clear()
        strict = ScopedSessionMiddleware(app, registry, **option)  # type: ignore[arg-type]
        serve(strict, dict(environ), start_response)
        [record] = caplog.records
        assert record.getMessage().startswith("GET /orders ")


@pytest.mark.parametrize(
    ("work", "warned"),
    [
        pytest.param("orm pending", True, id="ORM object never flushed"),
        pytest.param("orm dirty", True, id="ORM change never flushed"),
        pytest.param("orm deleted", True, id="ORM deletion never flushed"),
        pytest.param("flushed", True, id="statement run, never committed"),
        pytest.param("committed", False, id="committed by the handler"),
        pytest.param("read only", False, id="read only"),
    ],
)
def test_uncommitted_work_rolled_back_is_warned(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
    work: str,
    warned: bool,
) -> None:
    from test_transaction import Base
    from test_transaction import Item

    Base.metadata.create_all(registry.session_factory.kw["bind"])

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        if work == "orm pending":
            session.add(Item(name="lost"))
        elif work.startswith("orm"):
            session.add(Item(name="kept"))
            session.commit()
            item = session.scalars(select(Item)).one()
            if work == "orm dirty":
                item.name = "changed"
            else:
                session.delete(item)
        elif work == "read only":
            session.execute(text("SELECT 1"))
        else:
            session.execute(text("INSERT INTO item (name) VALUES ('x')"))
            if work == "committed":
                session.commit()
        start_response("201 Created", [])
        return [b""]

    environ.update(REQUEST_METHOD="POST", PATH_INFO="/items")
    serve(ScopedSessionMiddleware(app, registry, stats=True), environ, start_response)
    expected = [
        "Uncommitted changes rolled back at the end of POST /items: commit them"
        " in the handler, or use commit=True"
    ]
    assert [r.getMessage() for r in caplog.records] == (expected if warned else [])


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("vetoed", id="vetoed status"),
        pytest.param("handler", id="handler raised"),
        pytest.param("body", id="streamed body raised"),
    ],
)
def test_no_lost_work_warning_under_commit(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """Under commit=True a request that failed, or was vetoed, rolls back on
    purpose: advice to "use commit=True" would be noise."""

    def write() -> None:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))

    def body() -> t.Iterator[bytes]:
        yield b"first"
        write()
        raise ValueError("the body failed")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        write()
        if failure == "handler":
            raise ValueError("the handler failed")
        start_response("409 Conflict" if failure == "vetoed" else "200 OK", [])
        return [b""] if failure == "vetoed" else body()

    wrapped = ScopedSessionMiddleware(app, registry, commit=True, stats=True)
    if failure == "vetoed":
        serve(wrapped, environ, start_response)
    else:
        with pytest.raises(ValueError, match="failed"):
            serve(wrapped, environ, start_response)
    assert caplog.records == []
    assert environ["wsgi_scoped.stats"].statements >= 1


def test_statistics_of_each_layer_with_its_own_registry(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    first = scoped_session(sessionmaker(engine))
    second = scoped_session(sessionmaker(engine))
    seen: list[RequestStats] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        seen.append(environ["wsgi_scoped.stats"])
        first().execute(text("SELECT 1"))
        second().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return iter([b""])

    inner = ScopedSessionMiddleware(app, second, stats=True)
    serve(ScopedSessionMiddleware(inner, first, stats=True), environ, start_response)
    # The inner layer's statistics replaced the outer's in environ; each
    # layer finished its own.
    assert seen[0].statements == 2
    assert not first.registry.has() and not second.registry.has()


@pytest.mark.parametrize(
    ("trace", "extra", "tag"),
    [
        pytest.param(True, {}, "/* GET /trace/me */", id="method and path"),
        pytest.param(
            "X-Request-Id",
            {"HTTP_X_REQUEST_ID": "req-42"},
            "/* req-42 */",
            id="request id header",
        ),
        pytest.param(
            "X-Request-Id", {}, "/* GET /trace/me */", id="header missing: the path"
        ),
    ],
)
def test_trace_tag_visible_in_pg_stat_activity(
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    trace: bool | str,
    extra: dict[str, str],
    tag: str,
) -> None:
    db = Database(server_url("postgresql"))
    observer = create_engine(server_url("postgresql"))
    seen: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        pid = db().execute(text("SELECT pg_backend_pid()")).scalar_one()
        with observer.connect() as connection:
            query = connection.execute(
                text("SELECT query FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            ).scalar_one()
        seen.append(query)
        start_response("200 OK", [])
        return [b""]

    environ.update(PATH_INFO="/trace/me", **extra)
    try:
        serve(db.middleware(app, trace=trace), environ, start_response)
    finally:
        db.engine.dispose()
        observer.dispose()
    assert seen == [f"SELECT pg_backend_pid() {tag}"]


def test_trace_tag_cannot_close_the_comment(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    registry = scoped_session(sessionmaker(engine))
    statements: list[str] = []

    @event.listens_for(engine, "after_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        statements.append(statement)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return [b""]

    environ["PATH_INFO"] = "/x*/; DROP TABLE item; --\n"
    serve(ScopedSessionMiddleware(app, registry, trace=True), environ, start_response)
    assert statements == ["SELECT 1 /* GET /x/; DROP TABLE item; -- */"]


HOSTILE_TAGS = ["%s", "%(x)s", "%%", "?", ":x", ":1", "$1", "*/", "\n", "\xe9"]


@pytest.mark.parametrize(
    ("driver", "paramstyle"),
    [
        pytest.param("sqlite", "qmark", id="sqlite3 qmark"),
        pytest.param("sqlite", "named", id="sqlite3 named"),
        pytest.param("sqlite", "numeric", id="sqlite3 numeric"),
        pytest.param("psycopg", "pyformat", id="psycopg pyformat"),
        pytest.param("psycopg", "format", id="psycopg format"),
        pytest.param("psycopg2", "pyformat", id="psycopg2 pyformat"),
        pytest.param("psycopg2", "format", id="psycopg2 format"),
        pytest.param("pymysql", "format", id="PyMySQL format"),
        pytest.param("pymysql", "pyformat", id="PyMySQL pyformat"),
    ],
)
def test_trace_tag_never_changes_a_statement(
    tmp_path: t.Any, environ: WSGIEnvironment, driver: str, paramstyle: str
) -> None:
    """A path or request id a client chose, placeholders and all, is inert
    in the comment: a statement with bound parameters still runs with them."""
    if driver == "sqlite":
        url = make_url(f"sqlite:///{tmp_path / 'trace.db'}")
    else:
        backend = "mysql" if driver == "pymysql" else "postgresql"
        url = make_url(server_url(backend))
        url = url.set(drivername=f"{url.get_backend_name()}+{driver}")
    engine = create_engine(url, paramstyle=paramstyle)
    registry = scoped_session(sessionmaker(engine))
    statements: list[str] = []
    event.listen(
        engine, "after_cursor_execute", lambda c, cur, s, *a: statements.append(s)
    )
    rows: list[t.Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        query = text("SELECT :first, :second")
        rows.append(registry().execute(query, {"first": 1, "second": 2}).one())
        start_response("200 OK", [])
        return [b""]

    by_path = ScopedSessionMiddleware(app, registry, trace=True)
    by_header = ScopedSessionMiddleware(app, registry, trace="X-Request-Id")
    try:
        for hostile in HOSTILE_TAGS:
            serve(
                by_path,
                dict(environ, PATH_INFO=f"/a{hostile}"),
                StartResponseRecorder(),
            )
            serve(
                by_header,
                dict(environ, HTTP_X_REQUEST_ID=f"r{hostile}"),
                StartResponseRecorder(),
            )
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [(1, 2)] * 2 * len(HOSTILE_TAGS)
    tags = [statement.partition("/*")[2] for statement in statements]
    assert len(tags) == 2 * len(HOSTILE_TAGS)
    assert tags[:2] == [" GET /as */", " rs */"]  # "%s" with the % dropped
    assert not any(set(tag) & set("%?:$\n\xe9") for tag in tags)


def test_statistics_follow_retried_attempts(
    tmp_path: t.Any, environ: WSGIEnvironment
) -> None:
    """Each attempt gets fresh statistics: environ shows the final one."""
    from test_transaction import LockedOnce
    from test_transaction import retrying_app

    path = str(tmp_path / "locked.db")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.01})
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    lock = LockedOnce(path)
    registry = scoped_session(sessionmaker(engine))
    wrapped = ScopedSessionMiddleware(
        retrying_app(registry, lock),
        registry,
        commit=True,
        retries=1,
        retry_backoff=0,
        stats=True,
    )
    try:
        serve(wrapped, environ, StartResponseRecorder())
        assert lock.attempts == [1, 2, -2]
        assert environ["wsgi_scoped.stats"].statements == 1
    finally:
        lock.release()
        lock.holder.close()
        engine.dispose()


def test_checkout_wait_measures_a_busy_pool(tmp_path: t.Any) -> None:
    db = Database(
        f"sqlite:///{tmp_path / 'w.db'}", pool_size=1, max_overflow=0, pool_timeout=5
    )
    held = db.engine.connect()
    release = threading.Timer(0.2, held.close)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        release.start()
        db().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return [b""]

    environ: dict[str, t.Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    serve(db.middleware(app, stats=True), environ, StartResponseRecorder())
    assert environ["wsgi_scoped.stats"].checkout_wait >= 0.15
    db.engine.dispose()


def test_logger_is_wsgi_scoped() -> None:
    assert observe.logger is logging.getLogger("wsgi_scoped.middleware")


def test_server_timing_alone_never_commits_a_bodys_work(
    engine: Engine, environ: WSGIEnvironment
) -> None:
    """Server-Timing holds the status line as commit=True does, but without
    commit=True the handlers commit their own work: a streamed body's
    uncommitted work is rolled back."""
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])

        def body() -> t.Iterator[bytes]:
            registry().execute(text("INSERT INTO item (name) VALUES ('body')"))
            yield b"streamed"

        return body()

    recorder = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, server_timing=True)
    assert serve(wrapped, environ, recorder) == b"streamed"
    assert dict(recorder.calls[0][1])["Server-Timing"].startswith("db;dur=")
    assert count_items(engine) == 0


def test_work_outside_requests_is_not_counted(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """The listeners stay on the engine; work done outside a request, before
    it (start-up code) or after it on the same thread, is counted in no
    request."""
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return [b""]

    def work_outside() -> None:
        with sessionmaker(engine).begin() as outside:
            outside.execute(text("INSERT INTO item (name) VALUES ('outside')"))

    wrapped = ScopedSessionMiddleware(app, registry, stats=True)
    work_outside()
    serve(wrapped, environ, start_response)
    stats = environ["wsgi_scoped.stats"]
    held = stats.connection_held
    work_outside()
    assert (stats.statements, stats.connection_held) == (1, held)


def test_statistics_forget_requests_that_ended(engine: Engine) -> None:
    """Nothing of a request stays registered once it ended, in any thread."""
    registry = scoped_session(sessionmaker(engine))
    scopes: list[t.Hashable] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        scopes.append(get_ident())
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return iter([b""])

    wrapped = ScopedSessionMiddleware(app, registry, stats=True)
    threads = [
        threading.Thread(
            target=serve,
            args=(wrapped, {"REQUEST_METHOD": "GET"}, StartResponseRecorder()),
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(scopes) == 8
    assert not set(scopes) & set(observe._current)


def test_savepoints_and_sessions_begun_earlier_add_no_wait(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """Only a root transaction asking the pool counts as checkout wait: not a
    savepoint, nor a test's session whose transaction began before the
    request."""
    registry = scoped_session(sessionmaker(engine))
    session = registry()
    session.begin()  # began outside the request, no connection yet
    environ["wsgi_scoped.session"] = session

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        with registry().begin_nested():
            registry().execute(text("SELECT 2"))
        start_response("200 OK", [])
        return [b""]

    serve(ScopedSessionMiddleware(app, registry, stats=True), environ, start_response)
    stats = environ["wsgi_scoped.stats"]
    assert stats.statements == 4  # SELECT 1, SAVEPOINT, SELECT 2, RELEASE
    assert stats.checkout_wait == 0.0
    registry.remove()


@pytest.mark.parametrize("body_kind", ["list", "generator"])
def test_server_timing_and_warnings_on_postgresql(
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
    body_kind: str,
) -> None:
    """The header and the warnings against a real server, under commit=True."""
    db = Database(server_url("postgresql"))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        for _ in range(3):
            db().execute(text("SELECT pg_sleep(0.01)"))
        start_response("200 OK", [])
        return [b"ok"] if body_kind == "list" else iter([b"ok"])

    environ["PATH_INFO"] = "/slow"
    wrapped = db.middleware(
        app, commit=True, server_timing=True, warn_statements=2, warn_db_time=0.02
    )
    try:
        assert serve(wrapped, environ, start_response) == b"ok"
    finally:
        db.engine.dispose()
    [timing] = [v for name, v in start_response.calls[0][1] if name == "Server-Timing"]
    assert 'desc="3 queries"' in timing
    assert float(timing.split("dur=")[1].split(";")[0]) >= 30  # three 10 ms sleeps
    messages = [record.getMessage() for record in caplog.records]
    assert (
        messages[0] == "GET /slow ran 3 SQL statements (the limit is 2): an N+1 query?"
    )
    assert messages[1].startswith("GET /slow spent 0.0")


def test_statistics_add_up_every_checkout_and_report_milliseconds(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """A request that takes a connection twice (commit in between): each
    wait, each hold and each statement's time adds up, every figure stays
    within the request's own duration, and Server-Timing gives the same
    figures in milliseconds. The pauses are made by the test (a slow
    checkout, a slow SQL function, a handler holding its connection); the
    figures are checked against them, never against the machine's speed."""
    pause = 0.1

    @event.listens_for(engine.pool, "checkout")
    def slow_checkout(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
        dbapi_connection.create_function("pause", 0, lambda: time.sleep(pause))
        time.sleep(pause)

    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        for _ in range(2):
            registry().execute(text("SELECT pause()"))
            time.sleep(pause / 2)  # the connection is held meanwhile
            registry().commit()  # and back in the pool
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, stats=True, server_timing=True)
    stats, elapsed = served_in(wrapped, environ, start_response)
    assert stats.statements == 2
    assert 2 * pause <= stats.db_time <= elapsed
    assert 2 * pause <= stats.checkout_wait <= elapsed
    assert 2 * (pause + pause / 2) <= stats.connection_held <= elapsed
    (timing,) = [v for k, v in start_response.calls[0][1] if k == "Server-Timing"]
    db, wait = timing.split(", ")
    assert db.startswith("db;dur=") and db.endswith(';desc="2 queries"')
    assert abs(float(db[7:].split(";")[0]) - stats.db_time * 1000) <= 0.05
    assert wait.startswith("db-wait;dur=")
    assert abs(float(wait[12:]) - stats.checkout_wait * 1000) <= 0.05
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_statistics_tag_statements_only_when_tracing(
    engine: Engine, environ: WSGIEnvironment
) -> None:
    """Statistics alone leave statements as written; tracing tags them with
    the method and path (an absent PATH_INFO or REQUEST_METHOD is empty), at most 200
    characters of it."""
    registry = scoped_session(sessionmaker(engine))
    statements: list[str] = []
    event.listen(
        engine, "after_cursor_execute", lambda c, cur, s, *a: statements.append(s)
    )

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return [b""]

    plain = ScopedSessionMiddleware(app, registry, stats=True)
    traced = ScopedSessionMiddleware(app, registry, trace=True)
    serve(plain, dict(environ, PATH_INFO="/plain"), StartResponseRecorder())
    no_path = dict(environ)
    del no_path["PATH_INFO"]
    serve(traced, no_path, StartResponseRecorder())
    no_method = dict(environ, PATH_INFO="/m")
    del no_method["REQUEST_METHOD"]
    serve(traced, no_method, StartResponseRecorder())
    serve(traced, dict(environ, PATH_INFO="/" + "a" * 300), StartResponseRecorder())
    long_tag = ("GET /" + "a" * 300)[:200]
    assert statements == [
        "SELECT 1",
        "SELECT 1 /* GET  */",
        "SELECT 1 /*  /m */",
        f"SELECT 1 /* {long_tag} */",
    ]
    assert RequestStats().tag == ""


def test_db_time_warning_needs_more_than_the_limit(
    engine: Engine, environ: WSGIEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """warn_db_time=0 warns about any time in the database, and not about a
    request that spent none."""
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return [b""]

    wrapped = ScopedSessionMiddleware(app, registry, warn_db_time=0)
    serve(wrapped, environ, StartResponseRecorder())
    assert environ["wsgi_scoped.stats"].db_time == 0
    assert caplog.records == []


def test_a_commit_that_fails_adds_no_time_it_did_not_spend(
    tmp_path: t.Any, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """A deferred foreign key fails at COMMIT, where no statement runs: the
    error adds nothing to the statements' time, which stays within the
    request's duration."""
    engine = create_engine(f"sqlite:///{tmp_path / 'deferred.db'}")

    @event.listens_for(engine, "connect")
    def enforce_foreign_keys(dbapi_connection: t.Any, record: t.Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE parent (id INTEGER PRIMARY KEY)"))
        connection.execute(
            text(
                "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id)"
                " DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO child VALUES (42)"))  # checked at COMMIT
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True, stats=True)
    started = time.perf_counter()
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        serve(wrapped, environ, start_response)
    elapsed = time.perf_counter() - started
    stats = environ["wsgi_scoped.stats"]
    assert stats.statements == 1
    assert 0 < stats.db_time <= elapsed
    engine.dispose()


def test_a_session_on_two_engines_counts_each_wait_and_hold_once(
    tmp_path: t.Any, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """A session bound to two databases takes a connection from each pool
    in one transaction: the figures cover what the request waited and held,
    never more than the request's own duration."""
    engines = [create_engine(f"sqlite:///{tmp_path / f'{n}.db'}") for n in "ab"]
    registry = scoped_session(sessionmaker(engines[0]))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        for engine in engines:
            registry().execute(text("SELECT 1"), bind_arguments={"bind": engine})
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, stats=True)
    stats, elapsed = served_in(wrapped, environ, start_response)
    assert 0 < stats.checkout_wait <= elapsed
    assert 0 < stats.connection_held <= elapsed
    for engine in engines:
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        engine.dispose()


def test_a_connection_taken_before_the_request_adds_no_hold_time(
    engine: Engine, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """Only connections the request took count as held: one checked out
    before it and given back during it (after the request's own, here)
    adds nothing, and the figure stays within the request's duration."""
    registry = scoped_session(sessionmaker(engine))
    earlier = [engine.connect(), engine.connect()]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        earlier[0].close()  # before the request takes one
        registry().execute(text("SELECT 1"))
        registry().commit()  # the request's connection is back in the pool
        earlier[1].close()  # and after
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, stats=True)
    stats, elapsed = served_in(wrapped, environ, start_response)
    assert 0 < stats.connection_held <= elapsed
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_request_that_cannot_connect_spent_no_time_in_statements(
    tmp_path: t.Any, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """Connecting fails before any statement runs: the error is the
    request's, and no statement time is reported."""
    engine = create_engine(f"sqlite:///{tmp_path / 'no such directory' / 'x.db'}")
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        raise AssertionError("unreachable")

    wrapped = ScopedSessionMiddleware(app, registry, stats=True)
    with pytest.raises(OperationalError, match="unable to open database file"):
        serve(wrapped, environ, start_response)
    stats = environ["wsgi_scoped.stats"]
    assert (stats.statements, stats.db_time) == (0, 0.0)
    engine.dispose()
