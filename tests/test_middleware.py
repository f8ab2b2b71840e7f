"""The request lifecycle, driven by hand with raw environ and start_response."""

from __future__ import annotations

import inspect
import io
import logging
import re
import sys
import typing as t
import wsgiref.util

import pytest
from conftest import BODY_KINDS
from conftest import MATERIALIZED
from conftest import ClosingIterable
from conftest import CountingSession
from conftest import Observed
from conftest import StartResponseRecorder
from conftest import count_items
from conftest import make_app
from conftest import serve
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import WsgiScopedWarning
from wsgi_scoped import is_active
from wsgi_scoped import middleware

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

Registry = scoped_session[CountingSession]

LAZY_KINDS = [kind for kind in BODY_KINDS if kind not in MATERIALIZED]


@pytest.fixture(params=BODY_KINDS)
def body_kind(request: pytest.FixtureRequest) -> str:
    return t.cast(str, request.param)


def assert_ended(
    registry: Registry, engine: Engine, observed: Observed, table: str = "item"
) -> None:
    """The request's one session was closed once, the registry is empty, the
    connection is back in the pool and the uncommitted row is gone."""
    assert observed.sessions, "the app never used the session"
    session = observed.sessions[0]
    assert all(s is session for s in observed.sessions)
    assert isinstance(session, CountingSession)
    assert session.closed == 1
    assert not registry.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert count_items(engine, table) == 0


def test_session_ended_once_after_normal_response(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    observed = Observed()
    app = ScopedSessionMiddleware(make_app(registry, body_kind, observed), registry)

    body = app(environ, start_response)
    if body_kind in MATERIALIZED:
        # Ended before the server writes a byte: the connection is free.
        assert_ended(registry, engine, observed)
    else:
        assert registry.registry.has()
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    chunks = list(body)
    getattr(body, "close", lambda: None)()

    assert start_response.status == "200 OK"
    assert chunks
    assert_ended(registry, engine, observed)


def test_session_ended_on_every_backend(
    backend_url: str,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    """The same lifecycle against SQLite, PostgreSQL and MariaDB: uncommitted
    work is rolled back and no connection stays checked out."""
    engine = create_engine(backend_url)
    table = f"lifecycle_{body_kind}"
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        connection.execute(text(f"CREATE TABLE {table} (name VARCHAR(50))"))
    registry = scoped_session(sessionmaker(engine, class_=CountingSession))
    observed = Observed()
    inner = make_app(registry, body_kind, observed, table=table)
    try:
        body = ScopedSessionMiddleware(inner, registry)(environ, start_response)
        held = 0 if body_kind in MATERIALIZED else 1
        assert engine.pool.checkedout() == held  # type: ignore[attr-defined]
        assert b"".join(body)
        getattr(body, "close", lambda: None)()
        assert_ended(registry, engine, observed, table)
    finally:
        registry.remove()
        with engine.begin() as connection:
            connection.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


def test_same_session_all_through_request_and_fresh_one_next(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    first, second = Observed(), Observed()
    for observed in (first, second):
        app = ScopedSessionMiddleware(
            make_app(registry, "generator", observed), registry
        )
        body = app(dict(environ), start_response)
        list(body)
        body.close()  # type: ignore[attr-defined]
    assert len(first.sessions) == 4
    assert all(s is first.sessions[0] for s in first.sessions)
    assert all(s is second.sessions[0] for s in second.sessions)
    assert first.sessions[0] is not second.sessions[0]


@pytest.mark.parametrize("body_kind", sorted(MATERIALIZED))
def test_materialized_body_returned_unchanged(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    returned: list[object] = []
    inner = make_app(registry, body_kind, Observed())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        returned.append(inner(environ, start_response))
        return returned[-1]

    body = ScopedSessionMiddleware(app, registry)(environ, start_response)
    assert body is returned[0]
    assert not registry.registry.has()


def test_reused_environ_is_a_new_request(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """The nesting marker is taken back when a request ends, so a test that
    sends one environ twice does not get an unmanaged second request."""
    for _ in range(2):
        observed = Observed()
        app = ScopedSessionMiddleware(make_app(registry, "list", observed), registry)
        app(environ, start_response)
        assert_ended(registry, engine, observed)
        assert "wsgi_scoped.active" not in environ


@pytest.mark.parametrize("body_kind", LAZY_KINDS)
def test_app_raising_ends_session_and_propagates(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    observed = Observed()
    error = RuntimeError("handler failed")
    app = make_app(registry, body_kind, observed, raises=error)
    with pytest.raises(RuntimeError) as caught:
        ScopedSessionMiddleware(app, registry)(environ, start_response)
    assert caught.value is error
    assert_ended(registry, engine, observed)


@pytest.mark.parametrize("body_kind", LAZY_KINDS)
def test_body_raising_ends_session_on_close(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    observed = Observed()
    error = ValueError("body failed")
    inner = make_app(registry, body_kind, observed, body_raises=error)
    body = ScopedSessionMiddleware(inner, registry)(environ, start_response)
    with pytest.raises(ValueError) as caught:
        list(body)
    assert caught.value is error
    assert registry.registry.has()  # the server has not closed the body yet
    body.close()  # type: ignore[attr-defined]
    assert_ended(registry, engine, observed)


@pytest.mark.parametrize("body_kind", LAZY_KINDS)
@pytest.mark.parametrize(
    "chunks_read",
    [
        pytest.param(0, id="never iterated"),
        pytest.param(1, id="client disconnect after one chunk"),
    ],
)
def test_early_close_ends_session(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
    chunks_read: int,
) -> None:
    """The server closes a body it did not exhaust: the generator sees
    GeneratorExit (its finally runs) and the session is ended."""
    observed = Observed()
    inner = make_app(registry, body_kind, observed)
    body = ScopedSessionMiddleware(inner, registry)(environ, start_response)
    iterator = iter(body)
    for _ in range(chunks_read):
        next(iterator)
    body.close()  # type: ignore[attr-defined]
    assert observed.generator_finished == (chunks_read > 0)
    assert_ended(registry, engine, observed)


def test_close_forwarded_to_original_iterable_once(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    observed = Observed()
    inner = make_app(registry, "iterable_with_close", observed)
    original: list[ClosingIterable] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = inner(environ, start_response)
        original.append(body)
        return body

    body = ScopedSessionMiddleware(app, registry)(environ, start_response)
    list(body)
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]
    assert original[0].closed == 1
    assert observed.sessions[0].closed == 1  # type: ignore[attr-defined]


def test_body_close_raising_still_ends_session(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    observed = Observed()
    inner = make_app(registry, "iterable_with_close", observed)
    error = OSError("close failed")

    def failing_close() -> None:
        raise error

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = inner(environ, start_response)
        body.close = failing_close
        return body

    body = ScopedSessionMiddleware(app, registry)(environ, start_response)
    list(body)
    with pytest.raises(OSError) as caught:
        body.close()  # type: ignore[attr-defined]
    assert caught.value is error
    assert_ended(registry, engine, observed)


class BrokenCloseSession(CountingSession):
    def close(self) -> None:
        super().close()
        raise RuntimeError("Session.close() failed")


@pytest.fixture
def broken_registry(engine: Engine) -> t.Iterator[scoped_session[BrokenCloseSession]]:
    registry = scoped_session(sessionmaker(engine, class_=BrokenCloseSession))
    yield registry
    registry.registry.clear()


@pytest.mark.parametrize("body_kind", BODY_KINDS)
def test_session_close_raising_still_clears_registry(
    broken_registry: scoped_session[BrokenCloseSession],
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    """scoped_session.remove() would keep the broken session registered; the
    middleware clears it and lets the failure reach the server."""
    observed = Observed()
    inner = make_app(broken_registry, body_kind, observed)
    app = ScopedSessionMiddleware(inner, broken_registry)
    with pytest.raises(RuntimeError, match=r"Session\.close\(\) failed"):
        body = app(environ, start_response)
        list(body)
        body.close()  # type: ignore[attr-defined]
    assert_ended(broken_registry, engine, observed)  # type: ignore[arg-type]


def test_file_wrapper_closed_when_ending_session_fails(
    broken_registry: scoped_session[BrokenCloseSession],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """The server never receives the file wrapper, so the middleware closes it."""
    files: list[io.BytesIO] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        broken_registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        files.append(io.BytesIO(b"data"))
        return environ["wsgi.file_wrapper"](files[-1])

    with pytest.raises(RuntimeError, match="failed"):
        ScopedSessionMiddleware(app, broken_registry)(environ, start_response)
    assert files[0].closed


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param("app", id="app raises"),
        pytest.param("body_close", id="body close raises"),
    ],
)
def test_original_error_propagates_when_ending_session_also_fails(
    broken_registry: scoped_session[BrokenCloseSession],
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    observed = Observed()
    error = KeyError("original")
    environ["PATH_INFO"] = "/orders"
    if failure == "app":
        app = make_app(broken_registry, "generator", observed, raises=error)
        with pytest.raises(KeyError) as caught:
            ScopedSessionMiddleware(app, broken_registry)(environ, start_response)
    else:
        inner = make_app(broken_registry, "iterable_with_close", observed)

        def failing_close() -> None:
            raise error

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            body = inner(environ, start_response)
            body.close = failing_close
            return body

        body = ScopedSessionMiddleware(app, broken_registry)(environ, start_response)
        with pytest.raises(KeyError) as caught:
            body.close()  # type: ignore[attr-defined]
    assert caught.value is error
    assert_ended(broken_registry, engine, observed)  # type: ignore[arg-type]
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "Ending the session failed for GET /orders"
    assert "Session.close() failed" in str(record.exc_info[1])  # type: ignore[index]


def test_file_wrapper_close_failure_logged_and_session_error_raised(
    broken_registry: scoped_session[BrokenCloseSession],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FailingFile(io.BytesIO):
        def close(self) -> None:
            raise OSError("file close failed")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        broken_registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](FailingFile(b"data"))

    with pytest.raises(RuntimeError, match=r"Session\.close\(\) failed"):
        ScopedSessionMiddleware(app, broken_registry)(environ, start_response)
    [record] = caplog.records
    assert record.getMessage() == "Closing the response body failed for GET /"


def test_file_wrapper_function_treated_as_lazy(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """A server whose file_wrapper is a function gives no type to recognise:
    the body is kept lazy, which is always safe."""
    environ["wsgi.file_wrapper"] = lambda file, size=8192: wsgiref.util.FileWrapper(
        file, size
    )
    app = make_app(registry, "file_wrapper", Observed())
    body = ScopedSessionMiddleware(app, registry)(environ, start_response)
    assert registry.registry.has()
    body.close()  # type: ignore[attr-defined]
    assert not registry.registry.has()


def test_exc_info_reaches_server_unchanged(
    registry: Registry,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        try:
            raise LookupError("shown as 500")
        except LookupError:
            import sys

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    assert ScopedSessionMiddleware(app, registry)(environ, start_response) == [b"error"]
    status, _, exc_info = start_response.calls[0]
    assert status == "500 Internal Server Error"
    assert isinstance(exc_info[1], LookupError)
    assert not registry.registry.has()


@pytest.mark.parametrize("body_kind", BODY_KINDS)
def test_nested_same_registry_ended_once_by_outer_layer(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    observed = Observed()
    inner_bodies: list[object] = []
    inner = ScopedSessionMiddleware(make_app(registry, body_kind, observed), registry)

    def dispatcher(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = inner(environ, start_response)
        inner_bodies.append(body)
        assert registry.registry.has()  # the inner layer did not end it
        return body

    outer = ScopedSessionMiddleware(dispatcher, registry)
    body = outer(environ, start_response)
    list(body)
    getattr(body, "close", lambda: None)()
    assert type(inner_bodies[0]).__name__ != "_ScopedBody"
    assert_ended(registry, engine, observed)


def test_nested_different_registries_each_ended(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    other = scoped_session(sessionmaker(engine, class_=CountingSession))
    seen: list[Session] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        seen.extend([registry(), other()])
        assert is_active(environ, registry) and is_active(environ, other)
        start_response("200 OK", [])
        return iter([b"body"])

    wrapped = ScopedSessionMiddleware(ScopedSessionMiddleware(app, other), registry)
    body = wrapped(environ, start_response)
    list(body)
    body.close()  # type: ignore[attr-defined]
    assert [s.closed for s in seen] == [1, 1]  # type: ignore[attr-defined]
    assert not registry.registry.has() and not other.registry.has()


@pytest.mark.parametrize("body_kind", ["list", "generator", "failing close"])
def test_an_outer_layer_stays_active_until_its_own_end(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
) -> None:
    """Two layers on two registries, with a middleware of the user's in
    between: once the inner layer has ended its session, the outer one
    still manages its own until the outer body ends."""
    other = scoped_session(sessionmaker(engine))
    answers: list[tuple[bool, bool]] = []

    def chunks() -> t.Iterator[bytes]:
        yield b"body"

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        if body_kind == "list":
            return [b"body"]
        body = ClosingIterable(chunks)
        if body_kind == "failing close":
            body.close = lambda: 1 / 0  # type: ignore[method-assign]
        return body

    def between(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = inner(environ, start_response)

        def after_the_inner_layer() -> t.Iterator[bytes]:
            try:
                yield from body
            finally:
                try:
                    getattr(body, "close", lambda: None)()
                finally:
                    answers.append(
                        (is_active(environ, registry), is_active(environ, other))
                    )

        return after_the_inner_layer()

    inner = ScopedSessionMiddleware(app, other)
    outer = ScopedSessionMiddleware(between, registry)
    served = outer(environ, start_response)
    if body_kind == "failing close":
        with pytest.raises(ZeroDivisionError):
            list(served)  # the inner body ends, and its close() fails
    else:
        assert list(served) == [b"body"]
    served.close()  # type: ignore[attr-defined]
    assert answers == [(True, False)]
    assert not is_active(environ)


def test_is_active_only_inside_managed_request(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    other = scoped_session(sessionmaker(engine))
    answers: list[bool] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        answers.extend(
            [
                is_active(environ),
                is_active(environ, registry),
                is_active(environ, other),
            ]
        )
        start_response("200 OK", [])
        return [b""]

    assert not is_active(environ)
    ScopedSessionMiddleware(app, registry)(environ, start_response)
    assert answers == [True, True, False]


@pytest.mark.parametrize(
    "leak",
    [
        pytest.param("outside", id="registry used outside a request"),
        pytest.param("unclosed", id="upstream dropped close()"),
    ],
)
def test_stale_session_warned_and_ended(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    leak: str,
) -> None:
    stale_observed = Observed()
    if leak == "outside":
        stale = registry()
        stale.execute(text("INSERT INTO item (name) VALUES ('stale')"))
    else:
        inner = make_app(registry, "generator", stale_observed)
        body = ScopedSessionMiddleware(inner, registry)(dict(environ), start_response)
        next(iter(body))  # the response is never closed
        stale = stale_observed.sessions[0]

    observed = Observed()
    app = ScopedSessionMiddleware(make_app(registry, "list", observed), registry)
    warning_line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(WsgiScopedWarning, match="did not call close") as record:
        app(environ, start_response)
    [warning] = record
    assert str(warning.message) == middleware._STALE
    assert "used the registry without calling remove()" in middleware._STALE
    assert "Fix:" in middleware._STALE
    # It points at the caller of the middleware: the server, here this test.
    assert (warning.filename, warning.lineno) == (__file__, warning_line)
    assert stale.closed == 1  # type: ignore[attr-defined]
    assert observed.sessions[0] is not stale
    assert_ended(registry, engine, observed)


def test_stale_session_close_failure_logged_and_request_served(
    broken_registry: scoped_session[BrokenCloseSession],
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken_registry().execute(text("SELECT 1"))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return [b"served"]

    with pytest.warns(WsgiScopedWarning):
        body = ScopedSessionMiddleware(app, broken_registry)(environ, start_response)
    assert body == [b"served"]
    assert "Ending the session failed" in caplog.records[0].getMessage()


def noop_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
    start_response("204 No Content", [])
    return []


def test_request_without_session_use_creates_none(
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """A request that never calls the registry creates no session at all."""
    created: list[Session] = []

    class Recording(Session):
        def __init__(self, **kw: t.Any) -> None:
            super().__init__(**kw)
            created.append(self)

    registry = scoped_session(sessionmaker(engine, class_=Recording))
    assert ScopedSessionMiddleware(noop_app, registry)(environ, start_response) == []
    assert created == []


@pytest.mark.parametrize("body_kind", BODY_KINDS)
@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
def test_injected_session_used_and_kept(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
    commit: bool,
) -> None:
    """A test hands its session through ``wsgi_scoped.session``: the request
    uses it, the commit policy applies to it, and it is neither closed nor
    unregistered; what the request left uncommitted is rolled back."""
    session = registry()  # the test's own session, registered for its thread
    environ["wsgi_scoped.session"] = session
    observed = Observed()
    inner = make_app(registry, body_kind, observed)
    serve(
        ScopedSessionMiddleware(inner, registry, commit=commit), environ, start_response
    )
    assert all(s is session for s in observed.sessions)
    assert session.closed == 0
    assert registry() is session
    assert not session.in_transaction()
    assert count_items(engine) == (1 if commit else 0)


def test_injected_session_registered_in_other_thread(
    registry: Registry, environ: WSGIEnvironment, start_response: StartResponseRecorder
) -> None:
    import threading

    session = registry()
    environ["wsgi_scoped.session"] = session
    seen: list[object] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        seen.append(registry())
        start_response("200 OK", [])
        return [b""]

    wrapped = ScopedSessionMiddleware(app, registry)
    thread = threading.Thread(target=wrapped, args=(environ, start_response))
    thread.start()
    thread.join(timeout=10)
    assert seen == [session]


@pytest.mark.parametrize(
    ("outer_options", "inner_options", "refused"),
    [
        pytest.param({}, {"commit": True}, True, id="inner commit=True, outer not"),
        pytest.param(
            {"commit": True}, {"commit": True, "retries": 2}, True, id="inner retries"
        ),
        pytest.param({"commit": True}, {"commit": True}, False, id="same options"),
        pytest.param({"commit": True}, {}, False, id="inner defaults"),
        pytest.param({}, {"stats": True}, True, id="inner statistics"),
    ],
)
def test_nested_layer_never_drops_its_options_silently(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    outer_options: dict[str, t.Any],
    inner_options: dict[str, t.Any],
    refused: bool,
) -> None:
    """The outer layer owns the session, so an inner layer of the same
    registry that asks for something else is refused, loudly; one with the
    defaults or the same options passes through."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("201 Created", [])
        return [b"created"]

    inner = ScopedSessionMiddleware(app, registry, **inner_options)
    outer = ScopedSessionMiddleware(inner, registry, **outer_options)
    start_response = StartResponseRecorder()
    if refused:
        with pytest.raises(ValueError, match="is wrapped inside") as caught:
            outer(environ, start_response)
        assert "<ScopedSessionMiddleware(" in str(caught.value)
        assert start_response.calls == []
        assert count_items(engine) == 0
    else:
        assert serve(outer, environ, start_response) == b"created"
        assert count_items(engine) == int(outer_options.get("commit", False))
    assert not registry.registry.has()
    assert "wsgi_scoped.active" not in environ


@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
@pytest.mark.parametrize(
    "returned",
    [None, "a str", b"bytes", 42],
    ids=["None", "str", "bytes", "int"],
)
def test_unusable_body_refused_before_anything_is_committed(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    commit: bool,
    returned: t.Any,
) -> None:
    def forgetful_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("200 OK", [])
        return returned

    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(forgetful_app, registry, commit=commit)
    with pytest.raises(
        TypeError, match="forgetful_app.* must return an iterable"
    ) as caught:
        wrapped(environ, start_response)
    assert f" returned {returned!r}, which is not a response body" in str(caught.value)
    assert count_items(engine) == 0
    assert start_response.calls == ([] if commit else [("200 OK", [], None)])
    assert not registry.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "sqlite, binds"])
def test_exhausted_pool_answers_503_with_retry_after(
    backend: str,
    tmp_path: t.Any,
    environ: WSGIEnvironment,
    caplog: pytest.LogCaptureFixture,
    commit: bool,
) -> None:
    """The only connection is taken: the request waits ``pool_timeout``, then
    is told to come back, not given a server error; the log names the pool."""
    from conftest import server_url
    from conftest import unavailable

    url = None if backend == "postgresql" else f"sqlite:///{tmp_path / 'pool.db'}"
    engine = create_engine(
        url or server_url("postgresql"), pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    # A registry bound per table has no one pool to report.
    bound = backend != "sqlite, binds"
    registry = scoped_session(sessionmaker(engine if bound else None))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])  # already called: exc_info replaces it
        registry().execute(text("SELECT 1"), bind_arguments={"bind": engine})
        return [b"never"]

    start_response = StartResponseRecorder()
    wrapped = ScopedSessionMiddleware(app, registry, commit=commit)
    try:
        with engine.connect():
            body = serve(wrapped, environ, start_response)
        status, headers, exc_info = start_response.calls[-1]
        assert status == "503 Service Unavailable"
        assert (
            body
            == b"Service Unavailable: no database connection is free. Retry later.\n"
        )
        assert headers == unavailable(body)
        assert exc_info is not None  # replaces a status the app may have set
        [record] = caplog.records
        figures = "Pool size: 1  Connections in pool: 0" if bound else "the registry"
        assert record.getMessage().startswith(f"Getting a pooled connection ({figures}")
        assert record.getMessage().endswith("failed for GET /")
        assert "QueuePool limit of size 1 overflow 0 reached" in caplog.text
        assert not registry.registry.has()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        registry.remove()
        engine.dispose()


def test_other_errors_still_reach_the_server(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT * FROM missing"))
        return []

    for commit in (False, True):
        wrapped = ScopedSessionMiddleware(app, registry, commit=commit)
        with pytest.raises(Exception, match="no such table"):
            wrapped(environ, StartResponseRecorder())


@pytest.mark.parametrize(
    "options",
    [{}, {"commit": True}, {"server_timing": True}],
    ids=["commit=False", "commit=True", "server_timing"],
)
def test_second_start_response_without_exc_info_is_an_error(
    registry: Registry, environ: WSGIEnvironment, options: dict[str, t.Any]
) -> None:
    """PEP 3333: a fatal error, whether the server's start_response is
    called directly (commit=False) or held by the middleware."""
    import wsgiref.handlers

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"which?"]

    handler = wsgiref.handlers.SimpleHandler(
        io.BytesIO(), io.BytesIO(), io.StringIO(), environ
    )
    wrapped = ScopedSessionMiddleware(app, registry, **options)
    with pytest.raises(AssertionError, match="(?i)headers already set|second time"):
        wrapped(environ, handler.start_response)
    assert not registry.registry.has()


def test_nested_refusal_names_both_layers(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    """The error says which layer sits inside which, each with its options,
    so the duplicate wrapping can be found in the app's set-up."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return [b"ok"]

    inner = ScopedSessionMiddleware(app, registry, commit=True, retries=2)
    outer = ScopedSessionMiddleware(inner, registry, commit=True)
    expected = (
        f"{inner!r} is wrapped inside {outer!r} for the same registry."
        " The outer layer manages this request's session"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        outer(environ, StartResponseRecorder())
    assert not registry.registry.has()


def test_inner_layer_with_options_refused_under_a_hand_made_marker(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    """An environ marked active by other code (no layer recorded) still gets
    the clear refusal for an inner layer with options, not an AttributeError."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return [b"ok"]

    environ["wsgi_scoped.active"] = (registry,)
    inner = ScopedSessionMiddleware(app, registry, commit=True)
    with pytest.raises(
        ValueError, match=re.escape(f"{inner!r} is wrapped inside None")
    ):
        inner(environ, StartResponseRecorder())


def test_repr_shows_the_app_and_the_options_that_differ_from_the_defaults(
    registry: Registry,
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        raise NotImplementedError

    def veto(environ: WSGIEnvironment, status: str, headers: t.Any) -> bool:
        return False

    assert repr(ScopedSessionMiddleware(app, registry)) == (
        f"<ScopedSessionMiddleware({app!r})>"
    )
    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, commit_veto=veto, retries=2, trace="X-Request-Id"
    )
    assert repr(wrapped) == (
        f"<ScopedSessionMiddleware({app!r}, commit=True,"
        f" commit_veto={veto.__qualname__!r}, retries=2, trace='X-Request-Id')>"
    )


@pytest.mark.parametrize(
    "options", [{"commit": True}, {"server_timing": True}], ids=["commit", "timing"]
)
def test_held_second_start_response_error_says_what_pep_3333_allows(
    registry: Registry, environ: WSGIEnvironment, options: dict[str, t.Any]
) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        start_response("201 Created", [])
        return [b"which?"]

    start_response = StartResponseRecorder()
    message = (
        "start_response() was called a second time without exc_info: PEP 3333"
        " allows a second call only to replace the status of an error, with"
        " exc_info=sys.exc_info()."
    )
    with pytest.raises(AssertionError, match=f"^{re.escape(message)}$"):
        ScopedSessionMiddleware(app, registry, **options)(environ, start_response)
    assert start_response.calls == []
    assert not registry.registry.has()


def test_error_after_the_status_went_out_reaches_the_server_as_given(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    """Under commit=True, a body that fails after its status was sent and
    calls start_response with exc_info: the server gets that call as made
    (status, headers and exc_info), so it can re-raise and drop the
    connection (PEP 3333)."""
    seen: list[t.Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> t.Iterator[bytes]:
            yield b"half"
            try:
                raise RuntimeError("the body failed")
            except RuntimeError:
                seen.append(sys.exc_info())
                start_response("500 Internal Server Error", [("X-Error", "1")], seen[0])
            yield b"never"

        return body()

    start_response = StartResponseRecorder()
    served = ScopedSessionMiddleware(app, registry, commit=True)(
        environ, start_response
    )
    try:
        assert list(served) == [b"half", b"never"]
    finally:
        served.close()  # type: ignore[attr-defined]
    assert start_response.calls == [
        ("200 OK", [("Content-Type", "text/plain")], None),
        ("500 Internal Server Error", [("X-Error", "1")], seen[0]),
    ]
    assert not registry.registry.has()


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize(
    "options", [{}, {"commit": True}], ids=["commit=False", "commit=True"]
)
def test_inner_layer_of_another_registry_leaves_the_outer_marker(
    registry: Registry,
    engine: Engine,
    environ: WSGIEnvironment,
    options: dict[str, t.Any],
    raises: bool,
) -> None:
    """A sub-application with its own registry, mounted inside a wrapped
    app: when it is done, by returning or raising, the outer layer's
    request is still marked as managed, with only its own layer recorded."""
    other = scoped_session(sessionmaker(engine))
    after: list[object] = []

    def sub_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        other().execute(text("SELECT 1"))
        if raises:
            raise RuntimeError("the sub-application failed")
        start_response("200 OK", [])
        return [b"sub"]

    inner = ScopedSessionMiddleware(sub_app, other, **options)

    def dispatcher(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        try:
            body = serve(inner, environ, start_response)
        except RuntimeError:
            start_response("500 Internal Server Error", [])
            body = b"failed"
        after.append(environ["wsgi_scoped.active"])
        after.append(environ["wsgi_scoped.layers"])
        return [body]

    outer = ScopedSessionMiddleware(dispatcher, registry)
    serve(outer, environ, StartResponseRecorder())
    assert after == [(registry,), (outer,)]
    assert not registry.registry.has() and not other.registry.has()


def test_generator_app_is_pulled_only_to_its_first_chunk_before_the_status(
    registry: Registry, environ: WSGIEnvironment
) -> None:
    """Under commit=True, a generator that calls start_response when first
    iterated is advanced to its first chunk to learn the status, and no
    further: what it does for later chunks runs after the status went out
    (and in the body's own transaction)."""
    events: list[str] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        events.append("first chunk")
        yield b"first"
        events.append("second chunk")
        yield b"second"

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> t.Any:
        events.append(f"status {status}")
        return lambda data: None

    body = ScopedSessionMiddleware(app, registry, commit=True)(environ, start_response)
    try:
        assert list(body) == [b"first", b"second"]
    finally:
        body.close()  # type: ignore[attr-defined]
    assert events == ["first chunk", "status 200 OK", "second chunk"]


def test_server_timing_alone_commits_nothing(
    registry: Registry, engine: Engine, environ: WSGIEnvironment
) -> None:
    """server_timing holds the status line only to add its header: without
    commit=True the handler's uncommitted work is rolled back as usual."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('x')"))
        start_response("201 Created", [])
        return [b"created"]

    wrapped = ScopedSessionMiddleware(app, registry, server_timing=True)
    start_response = StartResponseRecorder()
    assert serve(wrapped, environ, start_response) == b"created"
    assert start_response.status == "201 Created"
    assert count_items(engine) == 0
