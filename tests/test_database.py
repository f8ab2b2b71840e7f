"""Database: URL handling, options, per-dialect defaults, in-memory SQLite
shared between threads, and fork safety on real servers."""

from __future__ import annotations

import gc
import os
import threading
import typing as t
import uuid

import pytest
from conftest import StartResponseRecorder
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from support import in_child

from wsgi_scoped import SQLITE_BUSY_TIMEOUT
from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped._sockets import _closed_while_idle

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment


@pytest.fixture
def memory_db() -> t.Iterator[Database]:
    db = Database("sqlite://")
    with db.engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    yield db
    db.remove()
    db.engine.dispose()


def connect_params(engine: Engine) -> dict[str, t.Any]:
    """The keyword arguments the driver's connect() really received."""
    seen: dict[str, t.Any] = {}

    @event.listens_for(engine, "do_connect")
    def capture(dialect: t.Any, record: t.Any, cargs: t.Any, cparams: t.Any) -> None:
        seen.update(cparams)

    engine.connect().close()
    return seen


def test_database_is_a_scoped_session(memory_db: Database) -> None:
    assert isinstance(memory_db, scoped_session)
    assert isinstance(memory_db.engine, Engine)
    session = memory_db()
    assert isinstance(session, Session)
    assert memory_db() is session
    assert session.get_bind() is memory_db.engine


def test_url_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: t.Any) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    db = Database()
    assert db.engine.url.database == str(tmp_path / "env.db")
    db.engine.dispose()


@pytest.mark.parametrize("value", [None, ""])
def test_missing_url_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    if value is not None:
        monkeypatch.setenv("DATABASE_URL", value)
    with pytest.raises(
        TypeError,
        match=r"No database URL: pass one to Database\(\), e.g. Database\('sqlite:///app.db'\),"
        r" or set the DATABASE_URL environment variable.",
    ):
        Database()


def test_unknown_option_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="pool_sise"):
        Database("sqlite://", pool_sise=3)


def test_repr_hides_password() -> None:
    db = Database("postgresql+psycopg://app:secret@127.0.0.1/app")
    assert "secret" not in repr(db)
    assert repr(db) == "<Database 'postgresql+psycopg://app:***@127.0.0.1/app'>"


def test_session_and_engine_options_pass_through(tmp_path: t.Any) -> None:
    class AppSession(Session):
        pass

    db = Database(
        f"sqlite:///{tmp_path / 'options.db'}",
        expire_on_commit=False,
        class_=AppSession,
        pool_size=3,
        echo_pool=True,
    )
    session = db()
    assert isinstance(session, AppSession)
    assert session.expire_on_commit is False
    assert db.engine.pool.size() == 3  # type: ignore[attr-defined]
    assert db.engine.pool.echo is True
    db.remove()
    db.engine.dispose()


def test_sqlite_file_has_busy_timeout(tmp_path: t.Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'busy.db'}")
    assert connect_params(db.engine)["timeout"] == SQLITE_BUSY_TIMEOUT
    db.engine.dispose()


def test_connect_args_merge_with_defaults(tmp_path: t.Any) -> None:
    db = Database(
        f"sqlite:///{tmp_path / 'busy.db'}",
        connect_args={"timeout": 2, "isolation_level": None},
    )
    params = connect_params(db.engine)
    assert params["timeout"] == 2
    assert params["isolation_level"] is None
    db.engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_server_databases_check_sockets_not_ping(backend: str) -> None:
    """psycopg, psycopg2 and PyMySQL: a dead pooled connection is found by
    looking at its socket at checkout (tests/test_roundtrips.py), so no ping;
    ``pool_pre_ping=True`` is still honoured when asked for."""
    db = Database(server_url(backend))
    assert db.engine.pool._pre_ping is False  # type: ignore[attr-defined]
    assert event.contains(db.engine, "checkout", _closed_while_idle)
    with db.engine.connect() as connection:
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    db.engine.dispose()
    asked = Database(server_url(backend), pool_pre_ping=True).engine
    assert asked.pool._pre_ping is True  # type: ignore[attr-defined]


def test_drivers_without_a_socket_to_look_at_pre_ping() -> None:
    """A driver whose connection hides its socket (here the mysqlclient
    dialect, given PyMySQL's module so that it builds) keeps the ping."""
    import pymysql

    db = Database("mysql+mysqldb://root@127.0.0.1/test", module=pymysql)
    assert db.engine.pool._pre_ping is True  # type: ignore[attr-defined]
    assert not event.contains(db.engine, "checkout", _closed_while_idle)


def test_memory_database_shared_by_threads(memory_db: Database) -> None:
    def write() -> None:
        memory_db().execute(text("INSERT INTO item VALUES ('from a thread')"))
        memory_db().commit()
        memory_db.remove()

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(timeout=10)
    names = memory_db().execute(text("SELECT name FROM item")).scalars().all()
    assert names == ["from a thread"]


def test_memory_database_never_shares_a_transaction(memory_db: Database) -> None:
    """A second request waits for the connection instead of reading the
    first request's uncommitted row."""
    holding, reader_started = threading.Event(), threading.Event()
    counts: list[int] = []

    def first_request() -> None:
        memory_db().execute(text("INSERT INTO item VALUES ('uncommitted')"))
        holding.set()
        reader_started.wait(timeout=10)
        # Give the reader time to ask for the connection while it is held.
        threading.Event().wait(0.2)
        memory_db.remove()

    def second_request() -> None:
        holding.wait(timeout=10)
        reader_started.set()
        counts.append(
            memory_db().execute(text("SELECT count(*) FROM item")).scalar_one()
        )
        memory_db.remove()

    threads = [
        threading.Thread(target=first_request),
        threading.Thread(target=second_request),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert counts == [0]
    assert memory_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_memory_database_survives_pool_dispose(memory_db: Database) -> None:
    with memory_db.engine.begin() as connection:
        connection.execute(text("INSERT INTO item VALUES ('kept')"))
    memory_db.engine.dispose()
    with memory_db.engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM item")).scalar_one() == "kept"


def test_memory_databases_are_separate(memory_db: Database) -> None:
    other = Database("sqlite://")
    with other.engine.connect() as connection:
        tables = connection.execute(text("SELECT name FROM sqlite_master")).all()
    assert tables == []
    other.engine.dispose()


def test_custom_scopefunc(tmp_path: t.Any) -> None:
    scope = ["a"]
    db = Database(f"sqlite:///{tmp_path / 'scope.db'}", scopefunc=lambda: scope[0])
    first = db()
    scope[0] = "b"
    assert db() is not first
    scope[0] = "a"
    assert db() is first
    assert set(db.registry.registry) == {"a", "b"}
    db.remove()
    db.engine.dispose()


def test_middleware_drives_this_registry(
    memory_db: Database, start_response: StartResponseRecorder
) -> None:
    sessions: list[Session] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        sessions.append(memory_db())
        memory_db().execute(text("INSERT INTO item VALUES ('rolled back')"))
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = memory_db.middleware(app)
    assert isinstance(wrapped, ScopedSessionMiddleware)
    assert wrapped.registry is memory_db
    assert wrapped({"PATH_INFO": "/"}, start_response) == [b"ok"]
    assert not memory_db.registry.has()
    with memory_db.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM item")).scalar_one() == 0
    with pytest.raises(TypeError, match="unexpected keyword argument 'comit'"):
        memory_db.middleware(app, comit=True)


BACKEND_PID = {
    "postgresql": "SELECT pg_backend_pid()",
    "mysql": "SELECT CONNECTION_ID()",
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
@pytest.mark.parametrize(
    "held", [pytest.param(False, id="pool idle"), pytest.param(True, id="session open")]
)
@pytest.mark.parametrize("first", ["session", "engine"])
def test_forked_child_never_uses_parent_connections(
    backend: str, held: bool, first: str
) -> None:
    """gunicorn --preload: the child gets connections of its own, whether
    it first uses a session or the engine itself (os.fork's at-fork hook
    has replaced the pool), and the parent's (pooled, or held by an open
    session) keep working afterwards."""
    db = Database(server_url(backend))
    query = text(BACKEND_PID[backend])
    with db.engine.connect() as connection:
        pooled_pid = connection.execute(query).scalar_one()
    if held:
        held_pid = db().execute(query).scalar_one()  # the transaction stays open

    def child() -> object:
        if first == "engine":
            with db.engine.connect() as connection:
                engine_pid = connection.execute(query).scalar_one()
        pid = db().execute(query).scalar_one()
        db.remove()
        gc.collect()  # the parent's connections, now unreferenced, are collected
        return engine_pid if first == "engine" else pid

    child_pid = in_child(child)
    assert child_pid not in (pooled_pid, held_pid if held else None)
    if held:
        assert db().execute(query).scalar_one() == held_pid
        db.remove()
    with db.engine.connect() as connection:
        assert connection.execute(query).scalar_one() in (
            pooled_pid,
            held_pid if held else None,
        )
    db.engine.dispose()


#: A parent with uncommitted work in its session forks; the child uses the
#: database, collects garbage and exits; the parent then commits. ``fork`` is
#: os.fork (at-fork hooks run), or libc's fork() called with the GIL held,
#: as uWSGI forks its workers (no at-fork hook runs).
FORK_SCRIPT = """
import ctypes, gc, json, os, sys, time

from sqlalchemy import text
from wsgi_scoped import Database

scopes = {{"default": None, "custom": lambda: "one scope"}}
db = Database({url!r}, scopefunc=scopes[{scope!r}])
table = {table!r}
db().execute(text(f"INSERT INTO {{table}} VALUES ('parent')"))  # not committed
fork = os.fork if {kind!r} == "os.fork" else ctypes.PyDLL(None).fork
pid = fork()
if pid == 0:
    code = 1
    try:
        db().execute(text(f"INSERT INTO {{table}} VALUES ('child')"))
        db().commit()
        db.remove()
        gc.collect()
        code = 0
    finally:
        sys.stdout.flush()
        os._exit(code)
deadline = time.monotonic() + 30
while not (waited := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
    time.sleep(0.01)
child = os.waitstatus_to_exitcode(waited[1]) if waited[0] else "hung"
if not waited[0]:
    os.kill(pid, 9)


def names():
    with db.engine.connect() as connection:  # another connection
        rows = connection.execute(text(f"SELECT name FROM {{table}} ORDER BY name"))
        return rows.scalars().all()


before = names()
db().commit()
db.remove()
print(json.dumps({{"child": child, "before": before, "after": names()}}))
db.engine.dispose()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
@pytest.mark.parametrize(
    ("kind", "scope"),
    [
        pytest.param("os.fork", "default", id="os.fork"),
        pytest.param("libc fork", "default", id="no at-fork hooks"),
        pytest.param("libc fork", "custom", id="no at-fork hooks, custom scopefunc"),
    ],
)
def test_forked_child_never_disturbs_the_parents_transaction(
    backend: str, kind: str, scope: str, tmp_path: t.Any
) -> None:
    """The parent's uncommitted work survives a child that forked while it
    was open, used the database and collected garbage, and is committed
    when the parent commits: the child never closes, rolls back, commits or
    talks on the parent's connection (#14). In a fresh
    interpreter, since forking without Python's hooks is only safe in a
    process with one thread."""
    from test_scope import run_script

    url = server_url(backend)
    admin = Database(url)
    table = f"ws_fork_{uuid.uuid4().hex[:8]}"
    with admin.engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (name VARCHAR(50))"))
    try:
        script = FORK_SCRIPT.format(url=url, scope=scope, table=table, kind=kind)
        report = run_script(script)
    finally:
        with admin.engine.begin() as connection:
            connection.execute(text(f"DROP TABLE {table}"))
        admin.engine.dispose()
    # The parent's row is committed by the parent's commit, not before.
    assert report == {"child": 0, "before": ["child"], "after": ["child", "parent"]}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_fork_is_handled_once_per_child(tmp_path: t.Any) -> None:
    """Threads of a child that notice the fork at once (uWSGI with threads)
    handle it once: a second handling forgets nothing the child made."""
    db = Database(f"sqlite:///{tmp_path / 'once.db'}")

    def child() -> object:
        session = db()
        session.execute(text("SELECT 1"))
        db._forget_parent()  # as a second thread of the child would
        return db() is session and db._forked_sessions == []

    assert in_child(child) is True
    db.engine.dispose()


def test_database_sessions_refuse_an_aborted_commit_outside_requests() -> None:
    """A script or CLI command using ``db()`` directly: committing a
    PostgreSQL transaction that a caught error aborted raises, instead of
    PostgreSQL's silent rollback."""
    from sqlalchemy.exc import ProgrammingError

    from wsgi_scoped import AbortedTransactionError

    db = Database(server_url("postgresql"))
    table = f"ws_aborted_{uuid.uuid4().hex[:8]}"
    with db.engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (name VARCHAR(50))"))
    try:
        db().execute(text(f"INSERT INTO {table} VALUES ('lost')"))
        with pytest.raises(ProgrammingError):
            db().execute(text("SELECT * FROM no_such_table"))
        with pytest.raises(AbortedTransactionError, match="begin_nested"):
            db().commit()
        db.remove()
        with db.engine.connect() as connection:
            rows = connection.execute(text(f"SELECT count(*) FROM {table}"))
            assert rows.scalar_one() == 0
    finally:
        db.remove()
        with db.engine.begin() as connection:
            connection.execute(text(f"DROP TABLE {table}"))
        db.engine.dispose()
