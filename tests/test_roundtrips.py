"""Round trips on the wire: ``Database`` costs what a bare engine costs, and
a connection that died while pooled never fails a request."""

from __future__ import annotations

import time
import typing as t
import uuid
import wsgiref.util

import pytest
from conftest import StartResponseRecorder
from conftest import serve
from conftest import server_url
from proxy import Proxy
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import is_transient

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

DRIVERS = {
    "psycopg": ("postgresql", "postgresql+psycopg"),
    "psycopg2": ("postgresql", "postgresql+psycopg2"),
    "pymysql": ("mysql", "mysql+pymysql"),
}


def driver_url(driver: str) -> str:
    backend, drivername = DRIVERS[driver]
    if driver == "psycopg2":
        pytest.importorskip("psycopg2")
    return (
        make_url(server_url(backend))
        .set(drivername=drivername)
        .render_as_string(hide_password=False)
    )


@pytest.fixture
def table(request: pytest.FixtureRequest) -> t.Iterator[tuple[str, str]]:
    """A fresh table on the driver's server: ``(url, name)``."""
    url = driver_url(request.param)
    name = f"ws_rt_{uuid.uuid4().hex[:8]}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (n INTEGER)"))
    yield url, name
    with engine.begin() as connection:
        connection.execute(text(f"DROP TABLE {name}"))
    engine.dispose()


def app_for(registry: scoped_session[t.Any], table: str) -> WSGIApplication:
    """GET reads one row count; POST inserts one row."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        if environ["REQUEST_METHOD"] == "POST":
            session.execute(text(f"INSERT INTO {table} (n) VALUES (1)"))
            if environ.get("HTTP_X_COMMIT"):
                session.commit()
        else:
            session.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        start_response("200 OK", [])
        return [b"ok"]

    return app


def request(app: WSGIApplication, method: str, handler_commits: bool) -> str:
    environ: WSGIEnvironment = {"REQUEST_METHOD": method}
    wsgiref.util.setup_testing_defaults(environ)
    if handler_commits:
        environ["HTTP_X_COMMIT"] = "1"
    start_response = StartResponseRecorder()
    serve(app, environ, start_response)
    return start_response.status


def count_rows(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            )
    finally:
        engine.dispose()


def trips_per_request(
    proxy: Proxy, registry: scoped_session[t.Any], app: WSGIApplication, method: str
) -> int:
    """Round trips of one request on a warm pool (the connection made and
    pooled by a first request that is not counted)."""
    commit = not isinstance(app, ScopedSessionMiddleware) or not app.commit
    request(app, method, handler_commits=commit and method == "POST")
    before = proxy.round_trips
    request(app, method, handler_commits=commit and method == "POST")
    return proxy.round_trips - before


@pytest.mark.parametrize("table", list(DRIVERS), indirect=True)
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
def test_database_costs_the_round_trips_of_a_bare_engine(
    table: tuple[str, str], method: str, commit: bool
) -> None:
    """Counted on the wire: ``Database`` defaults send no more exchanges than
    a bare ``create_engine(url)``; ``pool_pre_ping`` sends one more, which
    shows the count sees a ping."""
    url, name = table
    target = make_url(url)
    counted: dict[str, int] = {}
    with Proxy((str(target.host), int(target.port or 0))) as proxy:
        for wiring in ("bare", "pre_ping", "Database"):
            if wiring == "Database":
                registry: scoped_session[t.Any] = Database(proxy.url(url))
                engine: Engine = registry.engine  # type: ignore[attr-defined]
            else:
                engine = create_engine(
                    proxy.url(url), pool_pre_ping=wiring == "pre_ping"
                )
                registry = scoped_session(sessionmaker(engine))
            app = ScopedSessionMiddleware(
                app_for(registry, name), registry, commit=commit
            )
            try:
                counted[wiring] = trips_per_request(proxy, registry, app, method)
            finally:
                registry.remove()
                engine.dispose()
    assert counted["Database"] == counted["bare"]
    assert counted["pre_ping"] == counted["bare"] + 1


@pytest.mark.parametrize("table", list(DRIVERS), indirect=True)
@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
def test_connections_closed_while_pooled_never_fail_a_request(
    table: tuple[str, str], commit: bool
) -> None:
    """A restart, or a proxy's idle timeout, closes every pooled connection:
    the next requests, reads and writes, all succeed on new connections,
    and each write is committed exactly once."""
    url, name = table
    target = make_url(url)
    with Proxy((str(target.host), int(target.port or 0))) as proxy:
        db = Database(proxy.url(url), pool_size=2)
        app = ScopedSessionMiddleware(app_for(db, name), db, commit=commit)
        try:
            assert request(app, "POST", handler_commits=not commit) == "200 OK"
            accepted = proxy.accepted
            for method in ("POST", "GET", "POST"):
                proxy.close_all()
                assert request(app, method, handler_commits=not commit) == "200 OK"
            assert proxy.accepted == accepted + 3  # each time a new connection
            assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        finally:
            db.remove()
            db.engine.dispose()
    assert count_rows(url, name) == 3


@pytest.mark.parametrize("table", list(DRIVERS), indirect=True)
def test_backends_killed_while_pooled_never_fail_a_request(
    table: tuple[str, str],
) -> None:
    """The server itself ends the pooled connections (``pg_terminate_backend``,
    MariaDB's ``KILL``): the next request gets a new connection."""
    url, name = table
    db = Database(url, pool_size=2)
    app = ScopedSessionMiddleware(app_for(db, name), db, commit=True)
    mysql = url.startswith("mysql")
    own = "SELECT connection_id()" if mysql else "SELECT pg_backend_pid()"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        for _ in range(3):
            with db.engine.connect() as connection:
                victim = connection.execute(text(own)).scalar_one()
            with admin.connect() as connection:
                if mysql:
                    connection.execute(text(f"KILL {int(victim)}"))
                    alive = "SELECT count(*) FROM information_schema.processlist"
                    alive += " WHERE id = :pid"
                else:
                    connection.execute(
                        text("SELECT pg_terminate_backend(:pid)"), {"pid": victim}
                    )
                    alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"
                # Killing is asynchronous: the connection died "while idle"
                # once the server no longer lists it.
                deadline = time.monotonic() + 10
                while connection.execute(text(alive), {"pid": victim}).scalar_one():
                    assert time.monotonic() < deadline, "the backend did not end"
                    time.sleep(0.01)
            assert request(app, "POST", handler_commits=False) == "200 OK"
            with db.engine.connect() as connection:
                assert connection.execute(text(own)).scalar_one() != victim
    finally:
        db.remove()
        db.engine.dispose()
        admin.dispose()
    assert count_rows(url, name) == 3


def test_connection_lost_in_a_statement_is_retried_once(tmp_path: t.Any) -> None:
    """retries: a connection lost while a statement ran is transient (the
    server rolled that transaction back); the retry commits the row once."""
    url = server_url("postgresql")
    name = f"ws_rt_{uuid.uuid4().hex[:8]}"
    db = Database(url)
    with db.engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (n INTEGER)"))
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        attempts.append(environ["wsgi_scoped.attempt"])
        db().execute(text(f"INSERT INTO {name} (n) VALUES (1)"))
        if len(attempts) == 1:  # the server goes away mid-request
            db().execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        start_response("201 Created", [])
        return [b"made"]

    try:
        for retries, outcome in ((1, "201 Created"), (0, DBAPIError)):
            attempts.clear()
            wrapped = ScopedSessionMiddleware(app, db, commit=True, retries=retries)
            if outcome is DBAPIError:
                with pytest.raises(DBAPIError) as caught:
                    request(wrapped, "POST", handler_commits=False)
                assert caught.value.connection_invalidated
                assert is_transient(caught.value)
                assert attempts == [1]
            else:
                assert request(wrapped, "POST", handler_commits=False) == outcome
                assert attempts == [1, 2]
        assert count_rows(url, name) == 1
    finally:
        db.remove()
        with db.engine.begin() as connection:
            connection.execute(text(f"DROP TABLE {name}"))
        db.engine.dispose()


@pytest.mark.parametrize("table", ["psycopg", "pymysql"], indirect=True)
def test_connection_lost_during_commit_is_never_retried(
    table: tuple[str, str],
) -> None:
    """Whether a COMMIT whose answer never came happened is unknown: the
    error propagates and the application is not run again."""
    url, name = table
    target = make_url(url)
    attempts: list[int] = []
    with Proxy((str(target.host), int(target.port or 0))) as proxy:
        db = Database(proxy.url(url))

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
            attempts.append(environ["wsgi_scoped.attempt"])
            db().execute(text(f"INSERT INTO {name} (n) VALUES (1)"))
            start_response("201 Created", [])
            return [b"made"]

        wrapped = ScopedSessionMiddleware(app, db, commit=True, retries=2)
        proxy.cut_on = b"COMMIT"
        try:
            with pytest.raises(DBAPIError) as caught:
                request(wrapped, "POST", handler_commits=False)
        finally:
            db.remove()
            db.engine.dispose()
    assert proxy.cuts == 1
    assert caught.value.connection_invalidated and caught.value.statement is None
    assert not is_transient(caught.value)
    assert attempts == [1]
    assert count_rows(url, name) == 0  # here the COMMIT never reached the server


@pytest.mark.parametrize("table", ["psycopg", "pymysql"], indirect=True)
def test_isolation_levels_survive_a_replaced_connection(table: tuple[str, str]) -> None:
    """An engine-wide AUTOCOMMIT, and a level asked for one request's
    connection, apply on the connection that replaced a dead one."""
    url, name = table
    target = make_url(url)
    mysql = url.startswith("mysql")
    show = "SELECT @@tx_isolation" if mysql else "SHOW transaction_isolation"
    with Proxy((str(target.host), int(target.port or 0))) as proxy:
        autocommit = Database(proxy.url(url), isolation_level="AUTOCOMMIT")
        per_request = Database(proxy.url(url))
        try:
            autocommit().execute(text(f"INSERT INTO {name} (n) VALUES (1)"))
            autocommit.remove()  # nothing committed by hand: AUTOCOMMIT did
            proxy.close_all()
            autocommit().execute(text(f"INSERT INTO {name} (n) VALUES (2)"))
            autocommit.remove()
            per_request().execute(text("SELECT 1"))
            per_request.remove()
            proxy.close_all()
            connection = per_request().connection(
                execution_options={"isolation_level": "SERIALIZABLE"}
            )
            level = connection.execute(text(show)).scalar_one()
            per_request.remove()
        finally:
            for db in (autocommit, per_request):
                db.remove()
                db.engine.dispose()
    assert level.upper().replace("-", " ") == "SERIALIZABLE"
    assert count_rows(url, name) == 2
