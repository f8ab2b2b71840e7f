"""Scope: concurrent requests on threads and greenlets never share a session,
and nothing stays registered or checked out afterwards."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
import threading
import typing as t

import pytest
from conftest import CountingSession
from conftest import StartResponseRecorder
from conftest import serve
from sqlalchemy import Engine
from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import get_ident
from wsgi_scoped import scope

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment


def switching_app(
    registry: scoped_session[Session],
    seen: list[tuple[str, Session]],
    switch: t.Callable[[], None],
) -> WSGIApplication:
    """An app that yields control between uses of the session, in the handler
    and in its lazy body, recording which session each use got."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        request = environ["PATH_INFO"]
        session = registry()
        session.execute(text("SELECT 1"))
        switch()
        seen.append((request, registry()))
        start_response("200 OK", [])
        if environ["QUERY_STRING"] == "list":
            return [b"done"]

        def body() -> t.Iterator[bytes]:
            switch()
            seen.append((request, registry()))
            yield b"done"

        return body()

    return app


def check_isolated(seen: list[tuple[str, Session]], requests: int) -> None:
    """Each request saw one session of its own all through."""
    by_request: dict[str, set[int]] = {}
    for request, session in seen:
        by_request.setdefault(request, set()).add(id(session))
    assert len(by_request) == requests
    assert all(len(ids) == 1 for ids in by_request.values())
    # The sessions are kept alive in ``seen``, so equal ids mean one object.
    assert len({id(session) for _, session in seen}) == requests


def run_script(script: str) -> t.Any:
    """Run ``script`` in a fresh interpreter and return the JSON it printed."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def get(app: WSGIApplication, path: str, kind: str) -> bytes:
    environ = {"PATH_INFO": path, "QUERY_STRING": kind, "REQUEST_METHOD": "GET"}
    return serve(app, environ, StartResponseRecorder())


@pytest.mark.parametrize(
    "scopefunc", [None, get_ident], ids=["threading.local", "get_ident"]
)
def test_concurrent_threads_get_distinct_sessions(
    engine: Engine, scopefunc: t.Callable[[], t.Any] | None
) -> None:
    threads, per_thread = 16, 10
    registry = scoped_session(sessionmaker(engine), scopefunc=scopefunc)
    seen: list[tuple[str, Session]] = []
    barrier = threading.Barrier(threads)
    app = ScopedSessionMiddleware(switching_app(registry, seen, lambda: None), registry)
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            barrier.wait(timeout=10)
            for request in range(per_thread):
                kind = "list" if request % 2 else "generator"
                assert get(app, f"/{number}/{request}", kind) == b"done"
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=30)
    assert not errors
    check_isolated(seen, threads * per_thread)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if scopefunc is not None:
        assert registry.registry.registry == {}


def test_greenlets_in_one_thread_get_distinct_sessions(engine: Engine) -> None:
    """Greenlets switched by hand, with no gevent and no monkey-patching."""
    greenlet = pytest.importorskip("greenlet")
    registry = scoped_session(sessionmaker(engine), scopefunc=get_ident)
    seen: list[tuple[str, Session]] = []
    hub = greenlet.getcurrent()
    app = ScopedSessionMiddleware(
        switching_app(registry, seen, lambda: hub.switch()), registry
    )
    workers = [
        greenlet.greenlet(lambda n=n: get(app, f"/{n}", ("list", "gen")[n % 2]))
        for n in range(6)
    ]
    # Round-robin until every greenlet has finished its request.
    while any(not g.dead for g in workers):
        for g in workers:
            if not g.dead:
                g.switch()
    check_isolated(seen, 6)
    assert registry.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_gevent_greenlets_unpatched_get_distinct_sessions(engine: Engine) -> None:
    """Without monkey-patching, a greenlet waiting for a pooled connection
    would block the whole thread: stay within the pool (5 + 10 overflow)."""
    gevent = pytest.importorskip("gevent")
    registry = scoped_session(sessionmaker(engine), scopefunc=get_ident)
    seen: list[tuple[str, Session]] = []
    app = ScopedSessionMiddleware(
        switching_app(registry, seen, lambda: gevent.sleep(0)), registry
    )
    jobs = [gevent.spawn(get, app, f"/{n}", ("list", "gen")[n % 2]) for n in range(12)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [job.value for job in jobs] == [b"done"] * 12
    check_isolated(seen, 12)
    assert registry.registry.registry == {}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


GEVENT_SERVER = """
from gevent import monkey

monkey.patch_all()

import json
import urllib.request

import gevent
from gevent.pywsgi import WSGIServer
from sqlalchemy import text

from wsgi_scoped import Database

db = Database({url!r})
seen = []


def app(environ, start_response):
    session = db()
    session.execute(text("SELECT 1"))
    gevent.sleep(0.01)
    seen.append((environ["PATH_INFO"], id(db()), db() is session))
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        gevent.sleep(0.01)
        seen.append((environ["PATH_INFO"], id(db()), db() is session))
        yield b"ok"

    return body()


server = WSGIServer(("127.0.0.1", 0), db.middleware(app), log=None)
server.start()
port = server.server_port


def get(n):
    with urllib.request.urlopen(f"http://127.0.0.1:{{port}}/{{n}}", timeout=10) as r:
        return r.read()


jobs = [gevent.spawn(get, n) for n in range(20)]
gevent.joinall(jobs, timeout=30, raise_error=True)
server.stop(timeout=5)
print(json.dumps({{
    "bodies": [job.value.decode() for job in jobs],
    "seen": seen,
    "registered": len(db.registry.registry),
    "checkedout": db.engine.pool.checkedout(),
}}))
"""


def test_gevent_monkey_patched_server_gets_distinct_sessions(tmp_path: t.Any) -> None:
    """A real gevent WSGI server after patch_all(), in a fresh interpreter
    (patching inside pytest's process would patch pytest)."""
    pytest.importorskip("gevent")
    script = GEVENT_SERVER.format(url=f"sqlite:///{tmp_path / 'gevent.db'}")
    report = run_script(script)
    assert report["bodies"] == ["ok"] * 20
    sessions: dict[str, set[int]] = {}
    for path, session_id, same in report["seen"]:
        assert same
        sessions.setdefault(path, set()).add(session_id)
    assert len(sessions) == 20
    assert all(len(ids) == 1 for ids in sessions.values())
    assert report["registered"] == 0
    assert report["checkedout"] == 0


@pytest.mark.parametrize(
    "scopefunc", [None, get_ident], ids=["threading.local", "get_ident"]
)
def test_fast_registry_check_agrees_with_has(
    engine: Engine, scopefunc: t.Callable[[], t.Any] | None
) -> None:
    """The middleware reads ThreadLocalRegistry's storage directly (a
    SQLAlchemy internal): this pins it to what has() says."""
    from wsgi_scoped.scope import _has_session

    registry = scoped_session(sessionmaker(engine), scopefunc=scopefunc)
    answers = [(_has_session(registry.registry), registry.registry.has())]
    registry()
    answers.append((_has_session(registry.registry), registry.registry.has()))
    registry.remove()
    answers.append((_has_session(registry.registry), registry.registry.has()))
    assert answers == [(False, False), (True, True), (False, False)]


def test_greenlets_sharing_a_thread_local_registry_are_warned(engine: Engine) -> None:
    """Unpatched gevent with a plain scoped_session: every greenlet of the
    thread would get the same session."""
    gevent = pytest.importorskip("gevent")
    from wsgi_scoped import WsgiScopedWarning

    registry = scoped_session(sessionmaker(engine))
    app = ScopedSessionMiddleware(switching_app(registry, [], lambda: None), registry)
    with pytest.warns(WsgiScopedWarning) as record:
        job = gevent.spawn(get, app, "/shared", "list")
        job.join(timeout=10)
    assert job.value == b"done"
    [warning] = record
    assert str(warning.message) == scope._SHARED
    assert scope._SHARED.startswith("This request runs in a greenlet, but the registry")
    # It points at the code that called the middleware: the server's.
    lines, first = inspect.getsourcelines(serve)
    call = first + next(i for i, line in enumerate(lines) if "app(environ" in line)
    assert (warning.filename, warning.lineno) == (serve.__code__.co_filename, call)
    # Checked once per middleware: the next request is quiet.
    job = gevent.spawn(get, app, "/again", "list")
    job.join(timeout=10)
    assert job.successful()


GEVENT_DIAGNOSTICS = """
import json
import warnings

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

engine = create_engine("sqlite://")
before_patching = scoped_session(sessionmaker(engine))  # gunicorn --preload

from gevent import monkey

monkey.patch_all()

import gevent

import psycopg2.extensions  # noqa: F401
from wsgi_scoped import ScopedSessionMiddleware, get_ident

if {psycogreen!r}:
    import psycogreen.gevent

    psycogreen.gevent.patch_psycopg()

registries = {{
    "made before patching": before_patching,
    "made after patching": scoped_session(sessionmaker(engine)),
    "keyed by get_ident": scoped_session(sessionmaker(engine), scopefunc=get_ident),
}}


def app(environ, start_response):
    start_response("200 OK", [])
    return [b"ok"]


report = {{}}
for name, registry in registries.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = ScopedSessionMiddleware(app, registry)
        gevent.spawn(wrapped, {{}}, lambda *a: None).join(timeout=10)
    report[name] = [[w.category.__name__, str(w.message)] for w in caught]
print(json.dumps(report))
"""


@pytest.mark.parametrize(
    "psycogreen", [False, True], ids=["no wait callback", "psycogreen"]
)
def test_gevent_diagnostics_after_monkey_patching(psycogreen: bool) -> None:
    """In a fresh interpreter: a registry made before patch_all() is warned
    about, the others are not; psycopg2 without a wait callback is warned
    about until psycogreen installs one."""
    pytest.importorskip("gevent")
    pytest.importorskip("psycopg2")
    script = GEVENT_DIAGNOSTICS.format(psycogreen=psycogreen)
    report = run_script(script)
    shared = ["WsgiScopedWarning", scope._SHARED]
    blocking = [] if psycogreen else [["WsgiScopedWarning", scope._PSYCOPG2]]
    assert scope._PSYCOPG2.startswith("psycopg2 is used under gevent without a")
    assert report["made before patching"] == [shared, *blocking]
    assert report["made after patching"] == blocking
    assert report["keyed by get_ident"] == blocking


def run_sequentially(works: t.Iterable[t.Callable[[], object]]) -> list[BaseException]:
    """Run each of ``works`` in a thread of its own, one after the other,
    keeping the finished Thread objects; return the errors they raised."""
    errors: list[BaseException] = []

    def run(work: t.Callable[[], object]) -> None:
        try:
            work()
        except BaseException as error:  # reported in the test's thread
            errors.append(error)

    threads = []
    for work in works:
        thread = threading.Thread(target=run, args=(work,))
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive()
        threads.append(thread)
    return errors


@pytest.fixture
def small_pool(backend_url: str) -> t.Iterator[Database]:
    """A Database whose pool holds 2 connections and waits 2 s for one."""
    db = Database(
        backend_url,
        pool_size=2,
        max_overflow=0,
        pool_timeout=2,
        class_=CountingSession,
    )
    yield db
    db.remove()
    db.engine.dispose()


def test_ended_threads_release_their_connections(small_pool: Database) -> None:
    """Three threads in turn use ``db()`` and end without ``remove()`` (a
    background job, a thread-per-request server): each one's session is
    closed, so neither the third thread nor the next caller waits out the
    pool of 2."""
    db = small_pool
    sessions: list[Session] = []

    def job() -> None:
        sessions.append(db())
        db().execute(text("SELECT 1"))

    assert run_sequentially([job] * 3) == []
    assert db().execute(text("SELECT 1")).scalar_one() == 1
    assert [s.closed for s in sessions] == [1, 1, 1]  # type: ignore[attr-defined]
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    db.remove()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert db.registry.registry == {}


@pytest.mark.parametrize(
    "keep", [True, False], ids=["dead greenlets kept", "greenlets freed"]
)
def test_ended_greenlets_release_their_connections(
    small_pool: Database, keep: bool
) -> None:
    """Greenlets switched by hand, in one thread, that used ``db()`` and
    finished without ``remove()``: whether something still holds the dead
    greenlet or not, its session is closed."""
    greenlet = pytest.importorskip("greenlet")
    db = small_pool
    sessions: list[Session] = []
    kept = []

    def job() -> None:
        sessions.append(db())
        db().execute(text("SELECT 1"))

    for _ in range(3):
        worker = greenlet.greenlet(job)
        worker.switch()
        assert worker.dead
        if keep:
            kept.append(worker)
        del worker
    assert db().execute(text("SELECT 1")).scalar_one() == 1
    assert [s.closed for s in sessions] == [1, 1, 1]  # type: ignore[attr-defined]
    db.remove()
    assert db.registry.registry == {}
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_ended_gevent_greenlets_release_their_connections(
    small_pool: Database,
) -> None:
    """gevent greenlets (the jobs of a gevent worker) that used ``db()`` and
    finished without ``remove()``: their sessions are closed."""
    gevent = pytest.importorskip("gevent")
    db = small_pool
    sessions: list[Session] = []

    def job() -> int:
        sessions.append(db())
        return int(db().execute(text("SELECT 1")).scalar_one())

    jobs = []
    for _ in range(3):
        jobs.append(gevent.spawn(job))
        jobs[-1].join(timeout=10)
    assert [j.value for j in jobs] == [1, 1, 1]
    assert db().execute(text("SELECT 1")).scalar_one() == 1
    assert [s.closed for s in sessions] == [1, 1, 1]  # type: ignore[attr-defined]
    db.remove()
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_only_ended_scopes_lose_their_sessions(tmp_path: t.Any) -> None:
    """Five threads hold sessions while the test thread creates one: none of
    theirs is touched. Then the first removes its own and all end: the next
    sessions created close the four left behind, and nothing else stays
    registered."""
    db = Database(f"sqlite:///{tmp_path / 'live.db'}", class_=CountingSession)
    sessions: list[Session] = []
    registered, done = threading.Semaphore(0), threading.Event()

    def job(number: int) -> None:
        sessions.append(db())
        db().execute(text("SELECT 1"))
        registered.release()
        done.wait(timeout=10)
        if number == 0:
            db.remove()

    threads = []
    for number in range(5):  # one at a time, so sessions[n] is thread n's
        threads.append(threading.Thread(target=job, args=(number,)))
        threads[-1].start()
        assert registered.acquire(timeout=10)
    db().execute(text("SELECT 1"))
    assert [s.closed for s in sessions] == [0] * 5  # type: ignore[attr-defined]
    db.remove()
    done.set()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    # Each new session looks at a few of the others (see _ScopeRegistry).
    for _ in range(2):
        db().execute(text("SELECT 1"))
        db.remove()
    assert [s.closed for s in sessions] == [1] * 5  # type: ignore[attr-defined]
    assert db.registry.registry == {}
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    db.engine.dispose()


def test_failure_closing_an_ended_scopes_session_is_logged(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller that finds the ended thread's session is another request:
    a failure to close that session is logged, not raised into it."""

    class FailingClose(Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    db = Database(f"sqlite:///{tmp_path / 'fail.db'}", class_=FailingClose)
    assert run_sequentially([lambda: db().execute(text("SELECT 1"))]) == []
    session = db()
    assert session.execute(text("SELECT 1")).scalar_one() == 1
    [record] = caplog.records
    assert record.name == "wsgi_scoped.scope"
    assert record.getMessage() == (
        "Closing the session of a thread or greenlet that ended without remove() failed"
    )
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "close failed"
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    db.registry.clear()
    session.close = lambda: Session.close(session)  # type: ignore[method-assign]
    session.close()
    db.engine.dispose()
