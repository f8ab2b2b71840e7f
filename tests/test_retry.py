"""retries=N: which errors run a request again, the request body recorded as
the application reads it and replayed, and the backoff between attempts."""

from __future__ import annotations

import io
import socket
import sqlite3
import tempfile
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


def test_is_transient_looks_at_each_exception_of_a_cycle_once() -> None:
    """Exceptions can name each other as cause and context (code that
    re-raises an error it kept does that): is_transient still answers."""
    first = ValueError("first")
    second = RuntimeError("second")
    first.__context__ = second
    second.__cause__ = first
    assert is_transient(first) is False


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


#: One call on a request body: the method's name and its argument (``...``:
#: none).
Call = tuple[str, t.Any]

#: Ways to read a body, call by call, each tried against a plain file.
SCRIPTS: dict[str, list[Call]] = {
    "sizes": [("read", n) for n in (0, 1, 2, 3, 5, 0, 8, 40, 1)],
    "line sizes": [("readline", n) for n in (0, 1, 2, 4, 3, 9, 6, 1, 50, 2)],
    "whole lines": [("readline", n) for n in (..., -1, -5, None, ..., ...)],
    "mixed": [
        ("read", 1),
        ("readline", None),
        ("readline", 2),
        ("read", None),
        ("read", ...),
        ("read", 3),
    ],
    "hints": [("readlines", n) for n in (1, 6, 0, -1)],
    "iterate": [("read", 4), ("iterate", ...)],
}
BODY = b"ab\ncdef\n\nghijklm\nnopqrstu\nvw"


def call(stream: t.Any, method: str, argument: t.Any) -> object:
    if method == "iterate":
        return list(stream)
    if argument is ...:
        return getattr(stream, method)()
    return getattr(stream, method)(argument)


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("first", [1, 2, 3, 6, 12, len(BODY)])
@pytest.mark.parametrize("memory", [0, 5, 1 << 20], ids=["disk", "spilled", "memory"])
def test_retried_attempt_reads_like_a_file(
    locked_engine: tuple[Engine, str],
    environ: WSGIEnvironment,
    script: str,
    first: int,
    memory: int,
) -> None:
    """Whatever attempt 1 read, each read(n), readline(n), readlines(hint)
    or iteration on attempt 2 returns what it returns on a fresh file of
    the body: never more than asked, never a short read, lines split where
    a file splits them, across the part replayed and the part still unread.
    """
    engine, path = locked_engine
    calls = SCRIPTS[script]
    reference = io.BytesIO(BODY)
    expected = [call(reference, *c) for c in calls]
    seen: list[list[object]] = []
    conflict = Conflict(path)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        stream = environ["wsgi.input"]
        if environ["wsgi_scoped.attempt"] == 1:
            seen.append([stream.read(first)])
        else:
            seen.append([call(stream, *c) for c in calls])
        conflict.meet(registry)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine, replay_memory=memory)
    environ["REQUEST_METHOD"] = "POST"
    environ["wsgi.input"] = io.BytesIO(BODY)
    environ["CONTENT_LENGTH"] = str(len(BODY))
    try:
        assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    finally:
        conflict.close()
    assert seen == [[BODY[:first]], expected]


class ServerInput:
    """A server's wsgi.input whose readline() takes no size: PEP 3333 lets
    servers leave it out ("the optional size argument to readline() is not
    supported")."""

    def __init__(self, body: bytes) -> None:
        self._file = io.BytesIO(body)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def readline(self) -> bytes:
        return self._file.readline()


def test_readline_without_a_size_reaches_a_server_input_that_takes_none(
    locked_engine: tuple[Engine, str], environ: WSGIEnvironment, conflict: Conflict
) -> None:
    """The app reads lines with readline(), on both attempts; the recording
    passes no size on to the server's input, which accepts none."""
    engine, _ = locked_engine
    seen: list[list[bytes]] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        stream = environ["wsgi.input"]
        seen.append([stream.readline(), stream.readline(), stream.readline()])
        conflict.meet(registry)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, registry = middleware(app, engine)
    environ["REQUEST_METHOD"] = "POST"
    environ["wsgi.input"] = ServerInput(b"one\ntwo\n")
    environ["CONTENT_LENGTH"] = "8"
    assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    assert seen == [[b"one\n", b"two\n", b""]] * 2


def spools_of(
    engine: Engine,
    conflict: Conflict,
    environ: WSGIEnvironment,
    body: bytes,
    *,
    memory: int,
) -> list[t.Any]:
    """Send ``body`` to an app that reads it and meets one conflict; return
    where each attempt's recording of the body was kept."""
    spools: list[t.Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        data = environ["wsgi.input"].read()
        spools.append(environ["wsgi.input"]._spool)
        conflict.meet(registry)
        start_response("200 OK", [])
        return [data]

    wrapped, registry = middleware(app, engine, replay_memory=memory)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    assert serve(wrapped, environ, StartResponseRecorder()) == body
    return spools


def test_replay_memory_zero_keeps_no_body_in_memory(
    locked_engine: tuple[Engine, str], conflict: Conflict, environ: WSGIEnvironment
) -> None:
    """replay_memory=0 spools every byte to a temporary file at once."""
    spools = spools_of(locked_engine[0], conflict, environ, b"tiny", memory=0)
    assert spools[0] is spools[1]
    assert isinstance(spools[0], io.BufferedRandom)  # a real file, not BytesIO
    assert spools[0].closed


@pytest.mark.parametrize(
    ("body", "on_disk"),
    [
        pytest.param(b"12345678", False, id="replay_memory bytes: in memory"),
        pytest.param(b"123456789", True, id="one byte more: on disk"),
    ],
)
def test_replay_memory_is_kept_in_memory_up_to_its_size(
    locked_engine: tuple[Engine, str],
    conflict: Conflict,
    environ: WSGIEnvironment,
    body: bytes,
    on_disk: bool,
) -> None:
    """A body of up to ``replay_memory`` bytes is replayed from memory; past
    that, it moves to a temporary file."""
    spools = spools_of(locked_engine[0], conflict, environ, body, memory=8)
    assert spools[0] is spools[1]
    assert isinstance(spools[0], tempfile.SpooledTemporaryFile)
    assert spools[0]._rolled is on_disk


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


def test_a_body_past_the_limit_keeps_nothing_more(
    locked_engine: tuple[Engine, str], environ: WSGIEnvironment
) -> None:
    """Once the app has read past ``replay_limit`` the request cannot be
    replayed, and nothing it reads after is kept, in memory or on disk."""
    engine, _ = locked_engine
    kept: list[object] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        stream = environ["wsgi.input"]
        pieces = list(iter(lambda: stream.read(30), b""))
        kept.append((stream.replayable, stream._spool, [len(p) for p in pieces]))
        start_response("200 OK", [])
        return [b"ok"]

    wrapped, _ = middleware(app, engine, replay_memory=10, replay_limit=100)
    environ["wsgi.input"] = io.BytesIO(b"z" * 125)
    environ["wsgi.input_terminated"] = True  # no length: recorded as read
    assert serve(wrapped, environ, StartResponseRecorder()) == b"ok"
    assert kept == [(False, None, [30, 30, 30, 30, 5])]


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


@pytest.mark.parametrize(
    "length",
    [
        pytest.param("101", id="over replay_limit"),
        pytest.param("12x", id="not a number"),
        pytest.param("\u0661\u0662", id="non-ASCII digits"),
    ],
)
def test_declared_length_not_replayable_runs_once_without_reading(
    locked_engine: tuple[Engine, str],
    conflict: Conflict,
    environ: WSGIEnvironment,
    length: str,
) -> None:
    """A CONTENT_LENGTH over ``replay_limit``, or one that is no plain
    number, settles it before the body is read: the request runs once, and
    its conflict reaches the server, even if the handler never reads."""
    engine, _ = locked_engine
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        attempts.append(environ["wsgi_scoped.attempt"])
        conflict.meet(registry)
        start_response("204 No Content", [])
        return []

    wrapped, registry = middleware(app, engine, replay_limit=100)
    environ["REQUEST_METHOD"] = "POST"
    environ["CONTENT_LENGTH"] = length
    environ["wsgi.input"] = io.BytesIO(b"")
    with pytest.raises(OperationalError, match="database is locked"):
        wrapped(environ, StartResponseRecorder())
    assert attempts == [1]
    assert not registry.registry.has()
