"""commit=True: commit before the status line, the veto, streamed bodies,
after-commit hooks, commit failures, and the retry loop with a replayed body."""

from __future__ import annotations

import functools
import gc
import importlib.util
import io
import os
import sqlite3
import sys
import typing as t

import pytest
from conftest import BODY_KINDS
from conftest import MATERIALIZED
from conftest import CountingSession
from conftest import Observed
from conftest import StartResponseRecorder
from conftest import count_items
from conftest import make_app
from conftest import serve
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import AbortedTransactionError
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import after_commit
from wsgi_scoped import default_commit_veto
from wsgi_scoped import is_transient

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

Registry = scoped_session[CountingSession]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "unique_item"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)


@pytest.fixture(params=BODY_KINDS)
def body_kind(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


class CommitWitness(StartResponseRecorder):
    """A start_response that records how many rows were committed when the
    status line reached the server."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.committed_at_status: list[int] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
    ) -> t.Callable[[bytes], object]:
        self.committed_at_status.append(count_items(self.engine))
        return super().__call__(status, headers, exc_info)


@pytest.mark.parametrize(
    ("status", "headers", "vetoed"),
    [
        pytest.param("200 OK", [], False, id="200"),
        pytest.param("201 Created", [], False, id="201"),
        pytest.param("302 Found", [], False, id="302"),
        pytest.param("304 Not Modified", [], False, id="304"),
        pytest.param("400 Bad Request", [], True, id="400"),
        pytest.param("404 Not Found", [], True, id="404"),
        pytest.param("500 Internal Server Error", [], True, id="500"),
        pytest.param("503 Service Unavailable", [], True, id="503"),
        pytest.param("500 Error", [("X-Tm", "commit")], False, id="500, X-Tm commit"),
        pytest.param("200 OK", [("x-tm", "abort")], True, id="200, x-tm abort"),
        pytest.param("200 OK", [("X-TM", " Commit ")], False, id="X-TM Commit"),
        pytest.param("200 OK", [("X-Tm", "other")], True, id="X-Tm other value"),
    ],
)
def test_default_commit_veto(
    status: str, headers: list[tuple[str, str]], vetoed: bool
) -> None:
    assert default_commit_veto({}, status, headers) is vetoed


def test_work_committed_before_status_line_for_every_body_kind(
    registry: Registry, engine: Engine, environ: WSGIEnvironment, body_kind: str
) -> None:
    observed = Observed()
    app = make_app(registry, body_kind, observed)
    witness = CommitWitness(engine)
    body = serve(ScopedSessionMiddleware(app, registry, commit=True), environ, witness)
    assert body
    assert witness.calls[0][0] == "200 OK"
    assert witness.committed_at_status == [1]
    assert observed.sessions[0].closed == 1  # type: ignore[attr-defined]
    assert not registry.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def status_app(
    registry: Registry, status: str, headers: list[tuple[str, str]], body_kind: str
) -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response(status, list(headers))
        return [b"x"] if body_kind in MATERIALIZED else iter([b"x"])

    return app


@pytest.mark.parametrize(
    ("status", "headers", "committed"),
    [
        pytest.param("200 OK", [], 1, id="200 commits"),
        pytest.param("303 See Other", [], 1, id="303 commits"),
        pytest.param("404 Not Found", [], 0, id="404 rolls back"),
        pytest.param("500 Internal Server Error", [], 0, id="500 rolls back"),
        pytest.param("500 Error", [("X-Tm", "commit")], 1, id="X-Tm commit"),
        pytest.param("200 OK", [("X-Tm", "abort")], 0, id="X-Tm abort"),
    ],
)
@pytest.mark.parametrize("body_kind", ["list", "generator"])
def test_commit_policy_and_x_tm_header_stripped(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    status: str,
    headers: list[tuple[str, str]],
    committed: int,
    body_kind: str,
) -> None:
    app = status_app(registry, status, headers + [("X-Other", "kept")], body_kind)
    serve(ScopedSessionMiddleware(app, registry, commit=True), environ, start_response)
    assert count_items(engine) == committed
    [(sent_status, sent_headers, _)] = start_response.calls
    assert sent_status == status
    assert sent_headers == [("X-Other", "kept")]


def test_app_raising_rolls_back_and_sends_nothing(
    registry: Registry, engine: Engine, environ: WSGIEnvironment, body_kind: str
) -> None:
    observed = Observed()
    error = RuntimeError("handler failed")
    app = make_app(registry, body_kind, observed, raises=error)
    witness = CommitWitness(engine)
    with pytest.raises(RuntimeError) as caught:
        ScopedSessionMiddleware(app, registry, commit=True)(environ, witness)
    assert caught.value is error
    assert witness.calls == []
    assert count_items(engine) == 0
    assert not registry.registry.has()


def test_exc_info_error_page_rolled_back(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """A framework that turns an exception into a 500 page: the veto sees
    the 500 and the exc_info reaches the server."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        try:
            raise LookupError("missing")
        except LookupError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error page"]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, start_response) == b"error page"
    [(status, _, exc_info)] = start_response.calls
    assert status.startswith("500")
    assert isinstance(exc_info[1], LookupError)
    assert count_items(engine) == 0


def test_custom_veto_decides_and_raising_veto_rolls_back(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def veto_unless_created(
        environ: WSGIEnvironment, status: str, headers: list[tuple[str, str]]
    ) -> bool:
        seen.append((status, headers))
        return not status.startswith("201")

    for status, committed in (("200 OK", 0), ("201 Created", 1)):
        app = status_app(registry, status, [], "list")
        wrapped = ScopedSessionMiddleware(
            app, registry, commit=True, commit_veto=veto_unless_created
        )
        serve(wrapped, dict(environ), start_response)
        assert count_items(engine) == committed
    assert [status for status, _ in seen] == ["200 OK", "201 Created"]

    def broken_veto(*args: t.Any) -> bool:
        raise ZeroDivisionError("veto failed")

    app = status_app(registry, "200 OK", [], "list")
    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, commit_veto=broken_veto
    )
    calls = len(start_response.calls)
    with pytest.raises(ZeroDivisionError):
        wrapped(environ, start_response)
    assert len(start_response.calls) == calls
    assert count_items(engine) == 1
    assert not registry.registry.has()


def test_handler_opts_out_with_environ_key(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """A handler that manages its own transaction: its commit stands, the
    rest is rolled back, and the middleware commits nothing."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        environ["wsgi_scoped.commit"] = False
        session = registry()
        session.execute(text("INSERT INTO item (name) VALUES ('own')"))
        session.commit()
        session.execute(text("INSERT INTO item (name) VALUES ('dropped')"))
        start_response("200 OK", [])
        return [b"ok"]

    serve(ScopedSessionMiddleware(app, registry, commit=True), environ, start_response)
    with engine.connect() as connection:
        names = connection.execute(text("SELECT name FROM item")).scalars().all()
    assert names == ["own"]


def test_commit_failure_never_reports_2xx(
    backend_url: str, environ: WSGIEnvironment, body_kind: str
) -> None:
    """A duplicate key flushed by the commit itself: the error reaches the
    server before any status, nothing is committed, nothing leaks."""
    postgresql = backend_url.startswith("postgresql")
    name = {"application_name": "wsgi_scoped_commit_failure"}
    engine = create_engine(backend_url, connect_args=name if postgresql else {})
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(Item.__table__.insert().values(name="taken"))
    registry = scoped_session(sessionmaker(engine, class_=CountingSession))
    closed: list[bool] = []
    files: list[io.BytesIO] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().add(Item(name="fresh"))
        registry().add(Item(name="taken"))  # flushed only at commit
        start_response("200 OK", [])
        if body_kind == "list":
            return [b"ok"]
        if body_kind == "tuple":
            return (b"ok",)
        if body_kind == "file_wrapper":
            files.append(io.BytesIO(b"ok"))
            return environ["wsgi.file_wrapper"](files[-1])

        def body() -> t.Iterator[bytes]:
            try:
                yield b"ok"
            finally:
                closed.append(True)

        return body()

    start_response = StartResponseRecorder()
    try:
        wrapped = ScopedSessionMiddleware(app, registry, commit=True)
        with pytest.raises(IntegrityError):
            wrapped(environ, start_response)
        assert start_response.calls == []
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert not registry.registry.has()
        with engine.connect() as connection:
            names = connection.execute(Item.__table__.select()).scalars().all()
        assert names == ["taken"]
        if body_kind == "file_wrapper":
            assert files[0].closed
        if body_kind in ("generator", "iterable_with_close"):
            assert closed == [] or closed == [True]  # never started, or closed
        if postgresql:
            assert idle_in_transaction(engine) == 0
    finally:
        registry.remove()
        Base.metadata.drop_all(engine)
        engine.dispose()


def idle_in_transaction(engine: Engine) -> int:
    """Connections of this engine's application_name left idle in a
    transaction, as PostgreSQL sees them."""
    with engine.connect() as connection:
        count = connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                " current_database() AND application_name ="
                " current_setting('application_name')"
                " AND state LIKE 'idle in transaction%'"
            )
        )
        return int(count.scalar_one())


def counting_statements(engine: Engine) -> list[str]:
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        statements.append(statement)

    return statements


@pytest.mark.parametrize(
    ("outcome", "committed"),
    [
        pytest.param("exhausted", ["handler", "body"], id="body produced to its end"),
        pytest.param("raises", ["handler"], id="body raises"),
        pytest.param("client leaves", ["handler"], id="client disconnects"),
    ],
)
def test_streamed_body_work_is_a_second_transaction(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    outcome: str,
    committed: list[str],
) -> None:
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO item (name) VALUES ('loaded')"))
    statements = counting_statements(engine)
    during_body: list[int] = []  # statements run when the body resumes

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        row = session.execute(text("SELECT name FROM item")).one()
        session.execute(text("INSERT INTO item (name) VALUES ('handler')"))
        start_response("200 OK", [])

        def body() -> t.Iterator[bytes]:
            yield row.name.encode()
            # What the body itself ran so far (the test counts rows meanwhile).
            during_body.append(len([s for s in statements if "count(*)" not in s]))
            session.execute(text("INSERT INTO item (name) VALUES ('body')"))
            if outcome == "raises":
                raise ValueError("body failed")
            yield b"!"

        return body()

    body = ScopedSessionMiddleware(app, registry, commit=True)(environ, start_response)
    iterator = iter(body)
    assert next(iterator) == b"loaded"
    assert count_items(engine) == 2  # the handler's row, committed before the body
    if outcome == "raises":
        with pytest.raises(ValueError):
            list(iterator)
    elif outcome == "exhausted":
        assert list(iterator) == [b"!"]
    body.close()  # type: ignore[attr-defined]
    with engine.connect() as connection:
        names = connection.execute(text("SELECT name FROM item")).scalars().all()
    assert names == ["loaded", *committed]
    assert not registry.registry.has()
    if outcome != "client leaves":
        assert during_body == [2]  # the handler's two: no refresh for the body


def test_loaded_objects_not_expired_for_the_body(
    tmp_path: t.Any, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    """expire_on_commit=True would reload every object the body touches."""
    engine = create_engine(f"sqlite:///{tmp_path / 'expire.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            Item.__table__.insert(), [{"name": f"n{i}"} for i in range(5)]
        )
    registry = scoped_session(sessionmaker(engine, expire_on_commit=True))
    statements = counting_statements(engine)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        items = registry().query(Item).order_by(Item.name).all()
        start_response("200 OK", [])
        return (item.name.encode() for item in items)

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, start_response) == b"n0n1n2n3n4"
    assert len([s for s in statements if s.startswith("SELECT")]) == 1
    engine.dispose()


def test_generator_app_starting_response_when_iterated(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    """The middleware pulls the first chunk to learn the status, commits,
    then releases the status and the chunks in order."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("201 Created", [])
        yield b"first"
        yield b"second"

    witness = CommitWitness(engine)
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, witness) == b"firstsecond"
    assert witness.calls[0][0] == "201 Created"
    assert witness.committed_at_status == [1]


def test_generator_app_with_error_status_rolled_back(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("409 Conflict", [])
        yield b"conflict"

    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, start_response) == b"conflict"
    assert count_items(engine) == 0


def test_app_never_starting_response_commits_nothing(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        return [b"no status"]

    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert wrapped(environ, start_response) == [b"no status"]
    assert start_response.calls == []
    assert count_items(engine) == 0


def test_legacy_write_commits_before_first_byte(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    written: list[tuple[bytes, int]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        write = start_response("200 OK", [])
        write(b"early")
        write(b"late")
        return []

    class Server(StartResponseRecorder):
        def __call__(self, *args: t.Any) -> t.Callable[[bytes], object]:
            super().__call__(*args)
            return lambda data: written.append((data, count_items(engine)))

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, Server()) == b""
    assert written == [(b"early", 1), (b"late", 1)]
    assert not registry.registry.has()


def test_start_response_after_release_goes_to_server(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    """An error raised after the status went out: the app calls
    start_response with exc_info again, and the server decides."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        write = start_response("200 OK", [])
        write(b"partial")
        try:
            raise OSError("lost")
        except OSError:
            start_response("500 Error", [], sys.exc_info())
        return []

    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    serve(wrapped, environ, start_response)
    assert [call[0] for call in start_response.calls] == ["200 OK", "500 Error"]


def test_after_commit_hooks_run_in_order_only_after_commit(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def failing() -> None:
        raise RuntimeError("mail server down")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        session.execute(text("INSERT INTO item (name) VALUES ('x')"))
        after_commit(session, lambda: ran.append("first"))
        after_commit(session, failing)
        after_commit(session, lambda: ran.append("third"))
        status = environ["QUERY_STRING"] or "200 OK"
        start_response(status, [])

        def body() -> t.Iterator[bytes]:
            ran.append("body starts")
            after_commit(registry(), lambda: ran.append("after the body"))
            yield b"ok"

        return body()

    environ["PATH_INFO"] = "/signup"
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, dict(environ), start_response) == b"ok"
    assert ran == ["first", "third", "body starts", "after the body"]
    [record] = caplog.records
    assert record.getMessage() == (
        "An after-commit hook failed:"
        " test_after_commit_hooks_run_in_order_only_after_commit.<locals>.failing"
    )
    assert start_response.calls[-1][0] == "200 OK"

    ran.clear()
    caplog.clear()
    environ["QUERY_STRING"] = "400 Bad Request"
    serve(wrapped, environ, start_response)
    assert ran == ["body starts"]  # rolled back: no hook ran
    assert caplog.records == []


class LockedOnce:
    """A real "database is locked" on the first attempt: another connection
    holds the write lock until the second attempt starts."""

    def __init__(self, path: str) -> None:
        self.holder = sqlite3.connect(path, isolation_level=None)
        self.holder.execute("BEGIN IMMEDIATE")
        self.attempts: list[int] = []
        self.bodies: list[bytes] = []

    def release(self) -> None:
        if self.holder.in_transaction:
            self.holder.execute("ROLLBACK")


@pytest.fixture
def locked(tmp_path: t.Any) -> t.Iterator[tuple[Engine, LockedOnce]]:
    path = str(tmp_path / "locked.db")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.01})
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    lock = LockedOnce(path)
    yield engine, lock
    lock.release()
    lock.holder.close()
    engine.dispose()


def retrying_app(
    registry: scoped_session[t.Any], lock: LockedOnce, *, always: bool = False
) -> WSGIApplication:
    """Reads the body, writes it, and meets the lock on the first attempt (or
    on every attempt)."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        attempt = environ["wsgi_scoped.attempt"]
        lock.attempts.append(attempt)
        if attempt > 1 and not always:
            lock.release()
        length = environ.get("CONTENT_LENGTH")
        data = environ["wsgi.input"].read(int(length) if length else -1)
        lock.bodies.append(data)
        environ["app.cache"] = attempt
        session = registry()
        after_commit(session, lambda: lock.attempts.append(-attempt))
        start_response(f"20{attempt} Attempt", [("X-Attempt", str(attempt))])
        session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": len(data)})
        return [data]

    return app


@pytest.mark.parametrize(
    ("size", "chunked", "retried"),
    [
        pytest.param(10, False, True, id="small, in memory"),
        pytest.param(5000, False, True, id="spooled to disk"),
        pytest.param(20000, False, False, id="over the cap"),
        pytest.param(5000, True, True, id="chunked"),
        pytest.param(20000, True, False, id="chunked over the cap"),
        pytest.param(0, False, True, id="empty"),
    ],
)
def test_retry_replays_request_body(
    locked: tuple[Engine, LockedOnce],
    environ: WSGIEnvironment,
    size: int,
    chunked: bool,
    retried: bool,
) -> None:
    engine, lock = locked
    registry = scoped_session(sessionmaker(engine))
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    environ["REQUEST_METHOD"] = "POST"
    environ["wsgi.input"] = io.BytesIO(data)
    if chunked:
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(size)
    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(
        retrying_app(registry, lock),
        registry,
        commit=True,
        retries=2,
        retry_backoff=0,
        replay_memory=1024,
        replay_limit=10000,
    )
    if not retried:
        with pytest.raises(OperationalError, match="database is locked"):
            wrapped(environ, start_response)
        assert lock.attempts == [1]
        assert start_response.calls == []
        assert count_items(engine) == 0
        assert lock.bodies == [data]  # the whole body, though it was not kept
        return
    assert serve(wrapped, environ, start_response) == data
    assert lock.bodies == [data, data]
    assert lock.attempts == [1, 2, -2]  # attempt 1's hook was dropped
    [(status, headers, _)] = start_response.calls
    assert (status, headers) == ("202 Attempt", [("X-Attempt", "2")])
    with engine.connect() as connection:
        lengths = connection.execute(text("SELECT name FROM item")).scalars().all()
    assert lengths == [str(size)]
    assert environ["app.cache"] == 2  # the final attempt's (see test_retry.py)
    assert not registry.registry.has()


def test_retries_exhausted_raise_last_error(
    locked: tuple[Engine, LockedOnce], environ: WSGIEnvironment
) -> None:
    engine, lock = locked
    registry = scoped_session(sessionmaker(engine))
    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(
        retrying_app(registry, lock, always=True),
        registry,
        commit=True,
        retries=2,
        retry_backoff=0.001,
    )
    with pytest.raises(OperationalError, match="database is locked"):
        wrapped(environ, start_response)
    assert lock.attempts == [1, 2, 3]
    assert start_response.calls == []
    assert not registry.registry.has()
    lock.release()
    assert count_items(engine) == 0


def test_non_transient_error_not_retried(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        attempts.append(environ["wsgi_scoped.attempt"])
        registry().execute(text("SELECT * FROM missing_table"))
        return []

    wrapped = ScopedSessionMiddleware(app, registry, commit=True, retries=3)
    with pytest.raises(OperationalError, match="no such table"):
        wrapped(environ, StartResponseRecorder())
    assert attempts == [1]


def test_no_retry_once_the_response_started(
    locked: tuple[Engine, LockedOnce], environ: WSGIEnvironment
) -> None:
    """write() sent bytes: a later conflict cannot be retried."""
    engine, lock = locked
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        lock.attempts.append(environ["wsgi_scoped.attempt"])
        start_response("200 OK", [])("sent")
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        return []

    wrapped = ScopedSessionMiddleware(app, registry, commit=True, retries=2)
    with pytest.raises(OperationalError):
        wrapped(environ, StartResponseRecorder())
    assert lock.attempts == [1]


def mysql_error(kind: str, number: int, sqlstate: str) -> Exception:
    """A PyMySQL error as the driver raises it: with its SQLSTATE set."""
    error = getattr(__import__("pymysql").err, kind)(number, "message")
    error.sqlstate = sqlstate
    return t.cast(Exception, error)


@pytest.mark.parametrize(
    ("make_error", "transient"),
    [
        pytest.param(
            lambda: sqlite3.OperationalError("database is locked"),
            True,
            id="sqlite locked",
        ),
        pytest.param(
            lambda: sqlite3.OperationalError("no such table: x"),
            False,
            id="sqlite other",
        ),
        pytest.param(
            lambda: __import__("pymysql").err.OperationalError(1213, "Deadlock found"),
            True,
            id="pymysql 1213",
        ),
        pytest.param(
            lambda: __import__("pymysql").err.OperationalError(
                1205, "Lock wait timeout"
            ),
            True,
            id="pymysql 1205",
        ),
        pytest.param(
            lambda: mysql_error("OperationalError", 1205, "HY000"),
            True,
            id="pymysql 1205 with its SQLSTATE",
        ),
        pytest.param(
            lambda: mysql_error("OperationalError", 1213, "40001"),
            True,
            id="pymysql 1213 with its SQLSTATE",
        ),
        pytest.param(
            lambda: __import__("pymysql").err.IntegrityError(1062, "Duplicate entry"),
            False,
            id="pymysql 1062",
        ),
        pytest.param(
            lambda: __import__("psycopg").errors.SerializationFailure("conflict"),
            True,
            id="psycopg 40001",
        ),
        pytest.param(
            lambda: __import__("psycopg").errors.DeadlockDetected("deadlock"),
            True,
            id="psycopg 40P01",
        ),
        pytest.param(
            lambda: __import__("psycopg").errors.UniqueViolation("duplicate"),
            False,
            id="psycopg 23505",
        ),
        pytest.param(
            lambda: ValueError("not a database error"), False, id="ValueError"
        ),
    ],
)
def test_is_transient_table(
    make_error: t.Callable[[], Exception], transient: bool
) -> None:
    orig = make_error()
    wrapped = OperationalError("statement", {}, orig)
    assert is_transient(wrapped) is transient
    assert is_transient(orig) is transient
    try:
        try:
            raise wrapped
        except OperationalError as error:
            raise RuntimeError("the app's own error") from error
    except RuntimeError as chained:
        assert is_transient(chained) is transient


def test_nested_commit_layers_commit_once(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    commits: list[object] = []

    def record(session: object) -> None:
        commits.append(session)

    event.listen(registry.session_factory.class_, "after_commit", record)
    try:
        app = status_app(registry, "200 OK", [], "generator")
        inner = ScopedSessionMiddleware(app, registry, commit=True)
        outer = ScopedSessionMiddleware(inner, registry, commit=True)
        serve(outer, environ, start_response)
    finally:
        event.remove(registry.session_factory.class_, "after_commit", record)
    assert len(commits) == 1
    assert count_items(engine) == 1


def noop(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
    return []


def test_body_commit_failure_logged_and_raised_from_close(
    tmp_path: t.Any,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The status went out before the body's work failed to commit: close()
    raises, the log names the request, and the body's work is rolled back."""
    engine = create_engine(f"sqlite:///{tmp_path / 'body.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(Item.__table__.insert().values(name="taken"))
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().add(Item(name="handler"))
        start_response("200 OK", [])

        def body() -> t.Iterator[bytes]:
            registry().add(Item(name="body"))
            registry().add(Item(name="taken"))
            yield b"streamed"

        return body()

    environ["PATH_INFO"] = "/export"
    body = ScopedSessionMiddleware(app, registry, commit=True)(environ, start_response)
    assert b"".join(body) == b"streamed"
    with pytest.raises(IntegrityError):
        body.close()  # type: ignore[attr-defined]
    [record] = caplog.records
    assert record.getMessage() == (
        "Committing the work of the response body failed for GET /export"
    )
    with engine.connect() as connection:
        names = connection.execute(Item.__table__.select()).scalars().all()
    assert sorted(names) == ["handler", "taken"]
    assert not registry.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()


def test_streamed_request_without_session_commits_nothing(
    registry: Registry, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return iter([b"no database"])

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, start_response) == b"no database"
    assert not registry.registry.has()


def test_streamed_response_retried_and_replay_closed(
    locked: tuple[Engine, LockedOnce], environ: WSGIEnvironment
) -> None:
    engine, lock = locked
    registry = scoped_session(sessionmaker(engine))
    inner = retrying_app(registry, lock)
    inputs: list[t.IO[bytes]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        inputs.append(environ["wsgi.input"])
        return iter(inner(environ, start_response))

    environ["wsgi.input"] = io.BytesIO(b"payload")
    environ["CONTENT_LENGTH"] = "7"
    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, retries=1, retry_backoff=0
    )
    body = wrapped(environ, start_response)
    assert not inputs[-1].closed  # the body may still read the request
    assert b"".join(body) == b"payload"
    body.close()  # type: ignore[attr-defined]
    assert inputs[0] is inputs[1] and inputs[0].closed
    assert lock.attempts == [1, 2, -2]
    assert count_items(engine) == 1


def test_short_request_body_replayed_as_sent(
    locked: tuple[Engine, LockedOnce], environ: WSGIEnvironment
) -> None:
    """A client that sent less than its Content-Length: each attempt reads
    what arrived."""
    engine, lock = locked
    registry = scoped_session(sessionmaker(engine))
    environ["wsgi.input"] = io.BytesIO(b"short")
    environ["CONTENT_LENGTH"] = "100"
    wrapped = ScopedSessionMiddleware(
        retrying_app(registry, lock), registry, commit=True, retries=1, retry_backoff=0
    )
    serve(wrapped, environ, StartResponseRecorder())
    assert lock.bodies == [b"short", b"short"]


def test_psycopg2_serialization_failure_is_transient() -> None:
    """A real 40001 through psycopg2, whose errors carry ``pgcode``."""
    pytest.importorskip("psycopg2")
    url = server_url("postgresql").replace("+psycopg:", "+psycopg2:")
    engine = create_engine(url, isolation_level="REPEATABLE READ")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS pg2_counter"))
        connection.execute(text("CREATE TABLE pg2_counter (n INT)"))
        connection.execute(text("INSERT INTO pg2_counter VALUES (0)"))
    try:
        with engine.connect() as reader, engine.connect() as writer:
            reader.execute(text("SELECT n FROM pg2_counter")).scalar_one()
            writer.execute(text("UPDATE pg2_counter SET n = n + 1"))
            writer.commit()
            with pytest.raises(OperationalError) as caught:
                reader.execute(text("UPDATE pg2_counter SET n = n + 1"))
            assert caught.value.orig.pgcode == "40001"  # type: ignore[union-attr]
            assert is_transient(caught.value)
            reader.rollback()
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE pg2_counter"))
        engine.dispose()


def test_iterable_starting_response_when_iterated_gets_its_status_out(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    """Not only generators: any lazy iterable may call start_response on its
    first ``next()``; the work is committed before that status goes out."""

    class LateStart:
        def __init__(self, start_response: StartResponse) -> None:
            self.start_response = start_response
            self.closed = False

        def __iter__(self) -> t.Iterator[bytes]:
            self.start_response("201 Created", [("X-Late", "yes")])
            yield b"made"

        def close(self) -> None:
            self.closed = True

    bodies: list[LateStart] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        bodies.append(LateStart(start_response))
        return bodies[-1]

    witness = CommitWitness(engine)
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, witness) == b"made"
    assert [call[:2] for call in witness.calls] == [
        ("201 Created", [("X-Late", "yes")])
    ]
    assert witness.committed_at_status == [1]
    assert bodies[0].closed
    assert not registry.registry.has()


def test_injected_session_keeps_its_settings_and_no_vetoed_hook(
    engine: Engine, environ: WSGIEnvironment
) -> None:
    """A session handed to requests (the pytest plugin's) outlives them: a
    vetoed request's hooks never run later, and the middleware's commit
    leaves the session's own expire_on_commit as it was."""
    session = sessionmaker(engine, expire_on_commit=True)()
    registry: Registry = scoped_session(sessionmaker(engine))
    ran: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        name = environ["PATH_INFO"].strip("/")
        after_commit(registry(), lambda: ran.append(name))
        if name == "failed":
            raise RuntimeError("before any SQL")
        if name != "vetoed before any SQL":
            insert = text("INSERT INTO item (name) VALUES (:n)")
            registry().execute(insert, {"n": name})
        start_response(environ["QUERY_STRING"] or "200 OK", [])
        return [b"done"]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    try:
        with pytest.raises(RuntimeError):
            request = dict(environ, PATH_INFO="/failed")
            wrapped(dict(request, **{"wsgi_scoped.session": session}), noop)
        for path, status in (
            ("/vetoed", "400 Bad Request"),
            ("/vetoed before any SQL", "400 Bad Request"),
            ("/kept", ""),
        ):
            request = dict(environ, PATH_INFO=path, QUERY_STRING=status)
            request["wsgi_scoped.session"] = session
            serve(wrapped, request, StartResponseRecorder())
        assert ran == ["kept"]
        assert session.expire_on_commit is True
        with engine.connect() as connection:
            names = connection.execute(text("SELECT name FROM item")).scalars().all()
        assert names == ["kept"]
    finally:
        session.close()
        registry.remove()


@pytest.fixture(params=["psycopg", "psycopg2"])
def pg_engine(request: pytest.FixtureRequest) -> t.Iterator[Engine]:
    """PostgreSQL through psycopg 3 and psycopg2, with a fresh unique table."""
    url = server_url("postgresql")
    if request.param == "psycopg2":
        pytest.importorskip("psycopg2")
        url = url.replace("+psycopg:", "+psycopg2:")
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(Item.__table__.insert().values(name="taken"))
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


def pg_names(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        names = connection.execute(Item.__table__.select()).scalars().all()
    return sorted(names)


def catching_app(
    registry: scoped_session[t.Any], *, savepoint: bool = False, commits: bool = False
) -> WSGIApplication:
    """Inserts, then meets a duplicate key it expects and catches: the usual
    "insert or ignore" written in Python."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        session.execute(Item.__table__.insert().values(name="fresh"))
        try:
            if savepoint:
                with session.begin_nested():
                    session.execute(Item.__table__.insert().values(name="taken"))
            else:
                session.execute(Item.__table__.insert().values(name="taken"))
        except IntegrityError:
            pass  # "already there": fine, the handler thinks
        if commits:
            session.commit()
        start_response("200 OK", [])
        return [b"saved"]

    return app


def test_an_aborted_postgresql_transaction_is_refused_behind_another_database(
    tmp_path: t.Any, environ: WSGIEnvironment
) -> None:
    """A session on two databases: the PostgreSQL transaction that a caught
    error aborted is found, and the commit refused, whichever connection the
    session lists first (its set of connections has no order: 8 requests)."""
    lite = create_engine(f"sqlite:///{tmp_path / 'first.db'}")
    postgresql = create_engine(server_url("postgresql"))
    registry = scoped_session(sessionmaker())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        session.execute(text("SELECT 1"), bind_arguments={"bind": lite})
        try:
            session.execute(
                text("SELECT * FROM no_such_table"), bind_arguments={"bind": postgresql}
            )
        except DBAPIError:
            pass  # caught: the PostgreSQL transaction is aborted
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    try:
        for _ in range(8):
            with pytest.raises(AbortedTransactionError):
                serve(wrapped, dict(environ), StartResponseRecorder())
        assert not registry.registry.has()
        assert postgresql.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        lite.dispose()
        postgresql.dispose()


@pytest.mark.parametrize(
    "commit", [True, False], ids=["commit=True", "handler commits"]
)
def test_commit_of_an_aborted_postgresql_transaction_is_never_a_success(
    pg_engine: Engine, environ: WSGIEnvironment, commit: bool
) -> None:
    """PostgreSQL answers COMMIT of an aborted transaction with a silent
    ROLLBACK: the client must not be told 200 for the lost insert."""
    registry = scoped_session(sessionmaker(pg_engine))
    app = catching_app(registry, commits=not commit)
    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=commit)
    with pytest.raises(AbortedTransactionError, match="begin_nested"):
        wrapped(environ, start_response)
    assert start_response.calls == []
    assert pg_names(pg_engine) == ["taken"]
    assert not registry.registry.has()
    assert pg_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "commit", [True, False], ids=["commit=True", "handler commits"]
)
def test_savepoint_recovery_commits_the_rest(
    pg_engine: Engine, environ: WSGIEnvironment, commit: bool
) -> None:
    registry = scoped_session(sessionmaker(pg_engine))
    app = catching_app(registry, savepoint=True, commits=not commit)
    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=commit)
    assert serve(wrapped, environ, start_response) == b"saved"
    assert start_response.status == "200 OK"
    assert pg_names(pg_engine) == ["fresh", "taken"]


def test_aborted_transaction_refused_outside_requests_too(pg_engine: Engine) -> None:
    """The guard lives on the sessionmaker, so a script's commit is checked."""
    factory = sessionmaker(pg_engine)
    ScopedSessionMiddleware(noop, scoped_session(factory))
    with factory() as session:
        session.execute(Item.__table__.insert().values(name="fresh"))
        with pytest.raises(IntegrityError):
            session.execute(Item.__table__.insert().values(name="taken"))
        with pytest.raises(AbortedTransactionError):
            session.commit()
    assert pg_names(pg_engine) == ["taken"]


def test_every_sessionmaker_gets_the_guard(pg_engine: Engine) -> None:
    """Also one made where a garbage-collected one lived: SQLAlchemy's
    ``event.contains()`` keeps the dead one's key and would answer yes."""
    for _ in range(20):
        factory = sessionmaker(pg_engine)
        ScopedSessionMiddleware(noop, scoped_session(factory))
        with factory() as session:
            with pytest.raises(DBAPIError):
                session.execute(text("SELECT no_such_column"))
            with pytest.raises(AbortedTransactionError):
                session.commit()
        del factory, session
        gc.collect()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_after_commit_hooks_follow_the_handlers_own_commit(
    backend: str, tmp_path: t.Any, environ: WSGIEnvironment
) -> None:
    """commit=False: a hook runs after the handler's commit, with the
    connection back in the pool; one whose work was rolled back or never
    committed does not run."""
    url = f"sqlite:///{tmp_path / 'hooks.db'}" if backend == "sqlite" else None
    engine = create_engine(url or server_url("postgresql"))
    registry = scoped_session(sessionmaker(engine))
    ran: list[tuple[str, int]] = []

    def hook(name: str) -> t.Callable[[], None]:
        return lambda: ran.append((name, engine.pool.checkedout()))  # type: ignore[attr-defined]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        session.execute(text("SELECT 1"))
        after_commit(session, hook("committed"))
        session.commit()
        ran.append(("handler goes on", 0))
        session.execute(text("SELECT 1"))
        after_commit(session, hook("rolled back"))
        session.rollback()
        session.execute(text("SELECT 1"))
        session.commit()  # a later commit: the rolled-back work's hook stays dropped
        with session.begin_nested():
            after_commit(session, hook("savepoint only"))
        after_commit(session, hook("never committed"))
        start_response("200 OK", [])
        return [b"ok"]

    try:
        wrapped = ScopedSessionMiddleware(app, registry)
        serve(wrapped, environ, StartResponseRecorder())
        assert ran == [("committed", 0), ("handler goes on", 0)]
        with registry() as session:  # a script, outside any request
            session.execute(text("SELECT 1"))
            after_commit(session, hook("script"))
            session.commit()
        assert ran[-1] == ("script", 0)
    finally:
        registry.remove()
        engine.dispose()


def test_failing_hook_without_a_qualname_is_logged_by_its_type(
    registry: Registry,
    environ: WSGIEnvironment,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hook that is a callable object (functools.partial, an instance
    with ``__call__``) has no ``__qualname__``: the log names its type."""

    def mail(to: str) -> None:
        raise RuntimeError(f"cannot mail {to}")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        session.execute(text("INSERT INTO item (name) VALUES ('x')"))
        after_commit(session, functools.partial(mail, "ops@example.com"))
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    [record] = caplog.records
    assert record.getMessage() == "An after-commit hook failed: partial"


@pytest.mark.parametrize(
    ("driver", "module"),
    [
        ("pymysql", "pymysql"),
        ("mysqlconnector", "mysql.connector"),
        ("mariadbconnector", "mariadb"),
    ],
)
def test_mysql_lock_wait_timeout_is_transient_with_each_driver(
    driver: str, module: str
) -> None:
    """A real lock wait timeout (1205) on MariaDB, through each driver the
    docs name: PyMySQL and MySQL Connector put the error number in
    ``args[0]``, MariaDB Connector only in ``errno``."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        reason = f"the {module} driver is not installed"
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(f"{reason}; .ci/run installs it")
        pytest.skip(reason)
    url = make_url(server_url("mysql")).set(drivername=f"mysql+{driver}")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE IF EXISTS lock_wait"))
        connection.execute(text("CREATE TABLE lock_wait (id INT PRIMARY KEY)"))
        connection.execute(text("INSERT INTO lock_wait VALUES (1)"))
    try:
        with engine.connect() as holder, engine.connect() as waiter:
            holder.execute(text("SELECT id FROM lock_wait FOR UPDATE")).all()
            waiter.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
            with pytest.raises(DBAPIError) as caught:
                waiter.execute(text("SELECT id FROM lock_wait FOR UPDATE"))
            assert "Lock wait timeout" in str(caught.value.orig)
            assert is_transient(caught.value)
            waiter.rollback()
            holder.rollback()
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE lock_wait"))
        engine.dispose()
