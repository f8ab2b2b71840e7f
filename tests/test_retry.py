"""retries=N: which errors run a request again, the request body recorded as
the application reads it and replayed, and the backoff between attempts."""

from __future__ import annotations

import io
import socket
import sqlite3
import typing as t

import pytest
from conftest import StartResponseRecorder
from conftest import count_items
from conftest import serve
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import is_transient

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment


class Conflict:
    """A real SQLite "database is locked" for the first ``times`` attempts:
    another connection holds the write lock until then."""

    def __init__(self, path: str, times: int = 1) -> None:
        self.holder = sqlite3.connect(path, isolation_level=None)
        self.holder.execute("BEGIN IMMEDIATE")
        self.times = times
        self.attempts = 0

    def meet(self, registry: scoped_session[t.Any]) -> None:
        """Write through the request's session; conflicts while held."""
        self.attempts += 1
        if self.attempts > self.times and self.holder.in_transaction:
            self.holder.execute("ROLLBACK")
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))

    def close(self) -> None:
        if self.holder.in_transaction:
            self.holder.execute("ROLLBACK")
        self.holder.close()


@pytest.fixture
def locked_engine(tmp_path: t.Any) -> t.Iterator[tuple[Engine, str]]:
    path = str(tmp_path / "retry.db")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.01})
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    yield engine, path
    engine.dispose()


@pytest.fixture
def conflict(locked_engine: tuple[Engine, str]) -> t.Iterator[Conflict]:
    conflict = Conflict(locked_engine[1])
    yield conflict
    conflict.close()


def middleware(
    app: WSGIApplication, engine: Engine, **options: t.Any
) -> tuple[ScopedSessionMiddleware, scoped_session[t.Any]]:
    registry = scoped_session(sessionmaker(engine))
    options = {"retries": 2, "retry_backoff": 0, **options}
    return ScopedSessionMiddleware(app, registry, commit=True, **options), registry


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(SystemExit(1), id="SystemExit"),
        pytest.param(KeyboardInterrupt(), id="KeyboardInterrupt"),
        pytest.param(GeneratorExit(), id="GeneratorExit"),
    ],
)
def test_shutdown_while_handling_a_conflict_is_never_retried(
    locked_engine: tuple[Engine, str],
    conflict: Conflict,
    environ: WSGIEnvironment,
    stop: BaseException,
) -> None:
    """A worker told to stop while it handles a transient error stops: the
    application runs once, and the stop propagates."""
    engine, _ = locked_engine

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        try:
            conflict.meet(registry)
        except OperationalError:
            raise stop  # noqa: B904 - implicit chaining is what this tests
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine, retries=3)
    with pytest.raises(type(stop)):
        wrapped(environ, StartResponseRecorder())
    assert conflict.attempts == 1
    assert not registry.registry.has()


def test_is_transient_never_for_a_shutdown() -> None:
    locked = OperationalError(
        "INSERT", {}, sqlite3.OperationalError("database is locked")
    )
    for stop in (SystemExit(1), KeyboardInterrupt(), GeneratorExit()):
        stop.__context__ = locked
        assert not is_transient(stop)
    error = RuntimeError("the handler's own error")
    error.__context__ = locked  # raised while the conflict was handled
    assert is_transient(error)


def test_each_attempt_starts_from_the_original_environ(
    locked_engine: tuple[Engine, str], conflict: Conflict, environ: WSGIEnvironment
) -> None:
    """What a framework cached in environ on attempt 1 (a parsed request, a
    user) is gone on attempt 2; what the server put there is back."""
    engine, _ = locked_engine
    seen: list[tuple[object, object]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        seen.append((environ.get("app.cache"), environ.get("SERVER_NAME")))
        environ["app.cache"] = f"parsed on attempt {environ['wsgi_scoped.attempt']}"
        environ["SERVER_NAME"] = "changed"
        conflict.meet(registry)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine)
    server_name = environ["SERVER_NAME"]
    assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    assert seen == [(None, server_name), (None, server_name)]
    assert count_items(engine) == 1


def test_backoff_doubles_with_each_attempt(
    locked_engine: tuple[Engine, str],
    environ: WSGIEnvironment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before attempt n + 1 the wait is drawn from 0 to backoff × 2^(n-1)."""
    engine, path = locked_engine
    conflict = Conflict(path, times=3)
    bounds: list[tuple[float, float]] = []
    slept: list[float] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return high

    monkeypatch.setattr("wsgi_scoped.middleware.random.uniform", uniform)
    monkeypatch.setattr("wsgi_scoped.middleware.time.sleep", slept.append)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        conflict.meet(registry)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine, retries=3, retry_backoff=0.01)
    try:
        assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    finally:
        conflict.close()
    assert bounds == [(0, 0.01), (0, 0.02), (0, 0.04)]
    assert slept == [0.01, 0.02, 0.04]
    assert conflict.attempts == 4


def reading_app(
    conflict: Conflict, registry: list[scoped_session[t.Any]], how: str
) -> tuple[WSGIApplication, list[bytes]]:
    """An app that reads the request body in the way ``how`` says, then
    writes; each attempt's reading is kept."""
    bodies: list[bytes] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        stream = environ["wsgi.input"]
        attempt = environ["wsgi_scoped.attempt"]
        if how == "read all":
            data = stream.read()
        elif how == "read by size":
            data = b"".join(iter(lambda: stream.read(7), b""))
        elif how == "lines":
            data = b"".join(iter(stream.readline, b""))
        elif how == "readlines":
            data = b"".join(stream.readlines())
        elif how == "readlines with a hint":
            data = b"".join(stream.readlines(3))  # stops after the first line
            data += b"".join(stream.readlines())
        elif how == "iterate":
            data = b"".join(stream)
        elif how == "more on each attempt":
            # Attempt 1 reads a line, attempt 2 two lines, then the rest.
            data = b"".join(stream.readline() for _ in range(attempt))
            data += stream.read() if attempt > 1 else b""
        else:  # "line with a size limit"
            data = b"".join(iter(lambda: stream.readline(5), b""))
        bodies.append(data)
        conflict.meet(registry[0])
        start_response("200 OK", [])
        return [data]

    return app, bodies


@pytest.mark.parametrize(
    "how",
    [
        "read all",
        "read by size",
        "lines",
        "readlines",
        "readlines with a hint",
        "iterate",
        "more on each attempt",
        "line with a size limit",
    ],
)
@pytest.mark.parametrize("memory", [0, 8, 1 << 20], ids=["disk", "spilled", "memory"])
def test_retried_attempt_reads_the_same_body(
    locked_engine: tuple[Engine, str],
    conflict: Conflict,
    environ: WSGIEnvironment,
    how: str,
    memory: int,
) -> None:
    engine, _ = locked_engine
    data = b"first line\nsecond line\nthird line without end"
    holder: list[scoped_session[t.Any]] = []
    app, bodies = reading_app(conflict, holder, how)
    wrapped, registry = middleware(app, engine, replay_memory=memory)
    holder.append(registry)
    environ["REQUEST_METHOD"] = "POST"
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    assert serve(wrapped, environ, StartResponseRecorder()) == bodies[-1]
    if how == "more on each attempt":
        assert bodies == [b"first line\n", data]
    else:
        assert bodies == [data, data]
    assert count_items(engine) == 1


def test_replay_memory_zero_keeps_no_body_in_memory(
    locked_engine: tuple[Engine, str], conflict: Conflict, environ: WSGIEnvironment
) -> None:
    """replay_memory=0 spools every byte to a temporary file at once."""
    engine, _ = locked_engine
    spools: list[t.Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        data = environ["wsgi.input"].read()
        spools.append(environ["wsgi.input"]._spool)
        conflict.meet(registry)
        start_response("200 OK", [])
        return [data]

    wrapped, registry = middleware(app, engine, replay_memory=0)
    environ["wsgi.input"] = io.BytesIO(b"tiny")
    environ["CONTENT_LENGTH"] = "4"
    assert serve(wrapped, environ, StartResponseRecorder()) == b"tiny"
    assert spools[0] is spools[1]
    assert isinstance(spools[0], io.BufferedRandom)  # a real file, not BytesIO
    assert spools[0].closed


@pytest.mark.parametrize("pieces", [False, True], ids=["read at once", "in pieces"])
@pytest.mark.parametrize(
    ("size", "declared", "retried"),
    [
        pytest.param(100, True, True, id="exactly the limit"),
        pytest.param(101, True, False, id="one byte over, declared"),
        pytest.param(100, False, True, id="exactly the limit, chunked"),
        pytest.param(101, False, False, id="one byte over, chunked"),
    ],
)
def test_replay_limit_is_inclusive(
    locked_engine: tuple[Engine, str],
    conflict: Conflict,
    environ: WSGIEnvironment,
    size: int,
    declared: bool,
    retried: bool,
    pieces: bool,
) -> None:
    """A body of exactly ``replay_limit`` bytes is replayed; one byte more
    and the request runs once, its whole body still given to the app."""
    engine, _ = locked_engine
    bodies: list[bytes] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        stream = environ["wsgi.input"]
        if pieces:
            bodies.append(b"".join(iter(lambda: stream.read(30), b"")))
        else:
            bodies.append(stream.read())
        conflict.meet(registry)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine, replay_memory=10, replay_limit=100)
    data = b"y" * size
    environ["wsgi.input"] = io.BytesIO(data)
    if declared:
        environ["CONTENT_LENGTH"] = str(size)
    else:
        environ["wsgi.input_terminated"] = True
    if retried:
        assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
        assert bodies == [data, data]
    else:
        with pytest.raises(OperationalError, match="database is locked"):
            wrapped(environ, StartResponseRecorder())
        assert bodies == [data]
    assert not registry.registry.has()


def test_body_never_read_is_never_waited_for(
    locked_engine: tuple[Engine, str], environ: WSGIEnvironment
) -> None:
    """A client that announced 1 MB and sent 10 bytes (or is still
    uploading): a handler that never reads the body answers at once, and is
    still retried, since nothing of the body was read."""
    engine, path = locked_engine
    conflict = Conflict(path)
    client, server = socket.socketpair()
    server.settimeout(5)
    client.sendall(b"0123456789")
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        attempts.append(environ["wsgi_scoped.attempt"])
        conflict.meet(registry)
        start_response("204 No Content", [])
        return []

    wrapped, registry = middleware(app, engine)
    environ["REQUEST_METHOD"] = "POST"
    environ["CONTENT_LENGTH"] = str(1 << 20)
    with server.makefile("rb") as stream:
        environ["wsgi.input"] = stream
        try:
            assert serve(wrapped, environ, StartResponseRecorder()) == b""
        finally:
            conflict.close()
            client.close()
            server.close()
    assert attempts == [1, 2]
    assert count_items(engine) == 1
