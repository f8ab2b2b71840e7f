"""pytest fixtures that run each test inside one database transaction, rolled
back at teardown, for any WSGI application using wsgi_scoped; a query
counter; and helpers that hold a read replica back and wait for it, for tests
of routed requests. Loaded through the ``pytest11`` entry point; every fixture
is opt-in.
"""

from __future__ import annotations

import contextlib
import time
import typing as t

import pytest
from sqlalchemy import URL
from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.pool import NullPool

from ._arguments import _engine_of
from ._servers import _autocommit
from ._servers import _position
from ._servers import _replayed

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

#: The environ key through which a test hands its session to the middleware.
SESSION_KEY = "wsgi_scoped.session"

_SAVEPOINTS = ("SAVEPOINT ", "RELEASE SAVEPOINT ", "ROLLBACK TO SAVEPOINT ")
#: Seconds between two looks at a replica's replay position.
_WAIT_POLL = 0.005
_NOT_REPLAYED = (
    "The replica {replica} did not replay the primary's WAL up to {lsn} within"
    " {timeout} s. Is its replay paused (paused_replica() around this call),"
    " and is it a streaming standby of this primary?"
)
_Server = t.Union[Engine, URL, str, "scoped_session[t.Any]"]


@pytest.fixture
def wsgi_scoped_registry() -> scoped_session[t.Any]:
    """The application's registry. Override it in ``conftest.py`` to return
    your :class:`~wsgi_scoped.Database` or ``scoped_session``.
    """
    pytest.fail(
        "No registry for the wsgi_scoped fixtures: define a fixture named"
        " 'wsgi_scoped_registry' in conftest.py that returns your Database or"
        " scoped_session, e.g. 'return myapp.db'.",
        pytrace=False,
    )


@pytest.fixture
def wsgi_scoped_app() -> WSGIApplication:
    """The application under test, for :func:`wsgi_scoped_testapp`. Override
    it in ``conftest.py`` to return your WSGI application.
    """
    pytest.fail(
        "No application for wsgi_scoped_testapp: define a fixture named"
        " 'wsgi_scoped_app' in conftest.py that returns your WSGI application,"
        " wrapped in ScopedSessionMiddleware.",
        pytrace=False,
    )


@pytest.fixture
def wsgi_scoped_connection(
    wsgi_scoped_registry: scoped_session[t.Any],
) -> t.Iterator[Connection]:
    """A connection in a transaction that is rolled back after the test.

    While the test runs, every session the registry makes is bound to this
    connection in ``create_savepoint`` mode: a ``commit()``, the middleware's
    included, only releases a savepoint, so nothing outlives the test.
    """
    registry = wsgi_scoped_registry
    factory = registry.session_factory
    connection = _engine_of(registry, "The wsgi_scoped fixtures").connect()
    restore_sqlite = _emit_sqlite_begin(connection)
    transaction = connection.begin()
    saved = dict(factory.kw)
    factory.kw.update(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield connection
    finally:
        try:
            registry.remove()
        finally:
            factory.kw.clear()
            factory.kw.update(saved)
            if transaction.is_active:  # the test may have ended it itself
                transaction.rollback()
            restore_sqlite()
            connection.close()


@pytest.fixture
def wsgi_scoped_session(
    wsgi_scoped_registry: scoped_session[t.Any], wsgi_scoped_connection: Connection
) -> Session:
    """The test's session: ``db()`` in the test's thread, inside the test's
    rolled-back transaction. Requests sent by :func:`wsgi_scoped_testapp`
    use this same session."""
    return t.cast(Session, wsgi_scoped_registry())


@pytest.fixture
def wsgi_scoped_testapp(
    wsgi_scoped_app: WSGIApplication, wsgi_scoped_session: Session
) -> t.Any:
    """A :class:`webtest.TestApp` around :func:`wsgi_scoped_app` whose
    requests use :func:`wsgi_scoped_session`: the middleware applies its
    commit policy to it, but neither closes it nor ends the test's
    transaction."""
    webtest = pytest.importorskip("webtest")
    return webtest.TestApp(
        wsgi_scoped_app, extra_environ={SESSION_KEY: wsgi_scoped_session}
    )


@pytest.fixture
def wsgi_scoped_queries(
    wsgi_scoped_registry: scoped_session[t.Any],
) -> t.Callable[..., t.ContextManager[list[str]]]:
    """:func:`count_queries` for the registry's engine:
    ``with wsgi_scoped_queries(max=2) as statements: ...``."""
    engine = _engine_of(wsgi_scoped_registry, "The wsgi_scoped fixtures")
    return lambda max=None: count_queries(engine, max=max)


@contextlib.contextmanager
def count_queries(
    engine: Engine | Connection, *, max: int | None = None
) -> t.Iterator[list[str]]:
    """Record the SQL statements run on ``engine`` inside the block, and fail
    if there were more than ``max``, listing them. Savepoint statements are
    not counted: under the test fixtures every commit makes them.

    :param engine: the :class:`~sqlalchemy.Engine` (or connection) to watch.
    :param max: the most statements allowed; ``None`` only records them.
    :raises AssertionError: at the end of the block, over ``max``.

    .. code-block:: python

        with count_queries(db.engine, max=1) as statements:
            testapp.get("/todos")

    .. versionadded:: 0.1
    """
    statements: list[str] = []

    def record(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        if not statement.startswith(_SAVEPOINTS):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)
    if max is not None and len(statements) > max:
        listing = "\n".join(f"  {n}. {s}" for n, s in enumerate(statements, 1))
        raise AssertionError(
            f"{len(statements)} SQL statements ran, at most {max} expected:\n{listing}"
        )


def _emit_sqlite_begin(connection: Connection) -> t.Callable[[], None]:
    """pysqlite begins transactions itself and breaks SAVEPOINT: let
    SQLAlchemy emit BEGIN on this connection instead (SQLAlchemy's recipe).
    Return what puts the driver back as it was."""
    if connection.dialect.driver != "pysqlite":
        return lambda: None
    dbapi_connection = t.cast(t.Any, connection.connection.dbapi_connection)
    level = dbapi_connection.isolation_level
    dbapi_connection.isolation_level = None

    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    event.listen(connection, "begin", begin)

    def restore() -> None:
        event.remove(connection, "begin", begin)
        dbapi_connection.isolation_level = level

    return restore


@contextlib.contextmanager
def paused_replica(replica: Engine | URL | str) -> t.Iterator[None]:
    """Hold a PostgreSQL streaming replica back inside the block: it still
    receives the primary's WAL, but applies none of it
    (``pg_wal_replay_pause()``) until the block ends
    (``pg_wal_replay_resume()``, also when the block raises). A test sees a
    lagging replica without sleeping.

    :param replica: the replica's engine (``db.replicas[0]``) or URL.

    .. code-block:: python

        with paused_replica(db.replicas[0]):
            testapp.post("/todos", {"title": "milk"})  # not on the replica yet

    .. versionadded:: 0.1
    """
    with _engine(replica) as engine:
        with _autocommit(engine) as connection:
            connection.execute(text("SELECT pg_wal_replay_pause()"))
        try:
            yield
        finally:
            with _autocommit(engine) as connection:
                connection.execute(text("SELECT pg_wal_replay_resume()"))


def wait_for_replica(
    primary: _Server, replica: Engine | URL | str | None = None, *, timeout: float = 10
) -> str:
    """Wait until ``replica`` has replayed the primary's WAL up to its
    current position (``pg_current_wal_lsn()``): every write committed
    before the call is then visible on the replica. Return that position.

    :param primary: a :class:`~wsgi_scoped.Database`, or the primary's
        engine or URL.
    :param replica: the replica's engine or URL; ``None`` waits for each of
        the Database's ``replicas``.
    :param timeout: seconds to wait in all.
    :raises TimeoutError: if a replica has not replayed the position in
        time, such as one held back by :func:`paused_replica`.

    .. code-block:: python

        testapp.post("/todos", {"title": "milk"})
        wait_for_replica(db)  # no sleep: the replica now has the new todo

    .. versionadded:: 0.1
    """
    replicas = [replica] if replica is not None else getattr(primary, "replicas", ())
    if not replicas:
        raise TypeError(
            f"wait_for_replica() got no replica to wait for: {primary!r} has no"
            " 'replicas'. Pass a Database with replicas, or the replica's engine"
            " or URL: wait_for_replica(primary, replica)."
        )
    with _engine(primary) as engine:
        lsn = _position(engine)
    deadline = time.monotonic() + timeout
    for each in replicas:
        with _engine(each) as engine:
            left = deadline - time.monotonic()
            if not _replayed(engine, lsn, left, _WAIT_POLL):
                where = engine.url.render_as_string(hide_password=True)
                raise TimeoutError(
                    _NOT_REPLAYED.format(replica=where, lsn=lsn, timeout=timeout)
                )
    return lsn


@contextlib.contextmanager
def _engine(server: _Server) -> t.Iterator[Engine]:
    """The engine of ``server``; for a URL, one without a pool, for the block."""
    if not isinstance(server, (str, URL)):
        yield _engine_of(server, "The replica helpers")
        return
    engine = create_engine(server, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()
