"""The pytest plugin, run through pytester: paired inner tests prove that
what one test wrote is gone in the next, on every backend."""

from __future__ import annotations

import typing as t

import pytest
from conftest import server_url
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import text

from wsgi_scoped.pytest_plugin import count_queries

CONFTEST = """
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, text

from wsgi_scoped import Database

metadata = MetaData()
notes = Table(
    "plugin_notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("body", String(50)),
)


@pytest.fixture(scope="session")
def wsgi_scoped_registry():
    db = Database({url!r})
    metadata.drop_all(db.engine)
    metadata.create_all(db.engine)
    yield db
    metadata.drop_all(db.engine)
    db.engine.dispose()


def app(environ, start_response):
    from wsgi_scoped import is_active

    db = environ["test.db"]
    if environ["REQUEST_METHOD"] == "POST":
        db().execute(notes.insert().values(body=environ["QUERY_STRING"]))
        if environ["PATH_INFO"] == "/self-commit":
            db().commit()
        if environ["PATH_INFO"] == "/nested":
            with db().begin_nested():
                db().execute(notes.insert().values(body="kept"))
            savepoint = db().begin_nested()
            db().execute(notes.insert().values(body="undone"))
            savepoint.rollback()
        status = "400 Bad Request" if environ["PATH_INFO"] == "/bad" else "201 Created"
        start_response(status, [])
        return [b""]
    count = db().execute(text("SELECT count(*) FROM plugin_notes")).scalar_one()
    start_response("200 OK", [])
    return [str(count).encode()]


@pytest.fixture
def wsgi_scoped_app(wsgi_scoped_registry):
    wrapped = wsgi_scoped_registry.middleware(app, commit={commit!r})

    def with_db(environ, start_response):
        environ["test.db"] = wsgi_scoped_registry
        return wrapped(environ, start_response)

    return with_db
"""

TESTS = """
import pytest
from sqlalchemy import text

from conftest import notes


def count(session):
    return session.execute(text("SELECT count(*) FROM plugin_notes")).scalar_one()


def test_writes(wsgi_scoped_testapp, wsgi_scoped_session, wsgi_scoped_registry):
    wsgi_scoped_session.execute(notes.insert().values(body="from the test"))
    wsgi_scoped_session.commit()
    wsgi_scoped_testapp.post("/{path}?from-the-app", status=201)
    assert wsgi_scoped_testapp.get("/").text == "2"
    assert count(wsgi_scoped_session) == 2
    assert wsgi_scoped_registry() is wsgi_scoped_session


def test_changes_dont_persist(wsgi_scoped_testapp, wsgi_scoped_session):
    assert count(wsgi_scoped_session) == 0
    assert wsgi_scoped_testapp.get("/").text == "0"
"""


@pytest.fixture(params=["sqlite", "sqlite-memory", "postgresql", "mysql"])
def url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'plugin.db'}"
    if request.param == "sqlite-memory":
        return "sqlite://"
    return server_url(request.param)


def run(
    pytester: pytest.Pytester,
    url: str,
    tests: str,
    *,
    commit: bool = True,
    path: str = "notes",
) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.format(url=url, commit=commit))
    pytester.makepyfile(test_inner=tests.replace("{path}", path))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")


@pytest.mark.parametrize("commit", [True, False], ids=["commit=True", "commit=False"])
def test_changes_do_not_persist_between_tests(
    pytester: pytest.Pytester, url: str, commit: bool
) -> None:
    """The test's own commit and the app's (the middleware's, or the
    handler's with commit=False) become savepoints, rolled back at teardown."""
    path = "notes" if commit else "self-commit"
    run(pytester, url, TESTS, commit=commit, path=path).assert_outcomes(passed=2)


def test_vetoed_request_and_nested_savepoints(
    pytester: pytest.Pytester, url: str
) -> None:
    tests = """
from conftest import notes
from sqlalchemy import select


def bodies(session):
    return session.execute(select(notes.c.body).order_by(notes.c.id)).scalars().all()


def test_vetoed_request_rolls_back_only_its_own_work(
    wsgi_scoped_testapp, wsgi_scoped_session
):
    wsgi_scoped_session.execute(notes.insert().values(body="setup"))
    wsgi_scoped_session.commit()
    wsgi_scoped_testapp.post("/bad?lost", status=400)
    assert bodies(wsgi_scoped_session) == ["setup"]


def test_app_savepoints_nest(wsgi_scoped_testapp, wsgi_scoped_session):
    wsgi_scoped_testapp.post("/nested?outer", status=201)
    assert bodies(wsgi_scoped_session) == ["outer", "kept"]


def test_nothing_left(wsgi_scoped_session):
    assert bodies(wsgi_scoped_session) == []
"""
    run(pytester, url, tests).assert_outcomes(passed=3)


def test_failing_test_still_rolled_back(pytester: pytest.Pytester, url: str) -> None:
    tests = """
from conftest import notes
from sqlalchemy import text


def test_fails_after_writing(wsgi_scoped_testapp):
    wsgi_scoped_testapp.post("/notes?x", status=201)
    raise AssertionError("boom")


def test_ends_the_transaction_itself(wsgi_scoped_testapp, wsgi_scoped_connection):
    wsgi_scoped_testapp.post("/notes?y", status=201)
    wsgi_scoped_connection.rollback()


def test_clean(wsgi_scoped_session):
    count = text("SELECT count(*) FROM plugin_notes")
    assert wsgi_scoped_session.execute(count).scalar_one() == 0
"""
    result = run(pytester, url, tests)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: boom*"])


def test_registry_is_the_applications_again_after_a_test(
    pytester: pytest.Pytester, url: str
) -> None:
    """A later test that uses the registry without the fixtures gets real
    sessions on the engine: not bound to the closed test connection, and on
    SQLite a pooled connection whose rollback still undoes its work."""
    tests = """
from conftest import notes
from sqlalchemy import select


def test_with_the_fixtures(wsgi_scoped_testapp):
    wsgi_scoped_testapp.post("/notes?inside", status=201)


def test_without_them(wsgi_scoped_registry):
    session = wsgi_scoped_registry()
    try:
        session.execute(notes.insert().values(body="rolled back"))
        session.rollback()
        session.execute(notes.insert().values(body="committed"))
        session.commit()
        with wsgi_scoped_registry.engine.connect() as connection:
            bodies = connection.execute(select(notes.c.body)).scalars().all()
        assert bodies == ["committed"]
    finally:
        wsgi_scoped_registry.remove()
"""
    run(pytester, url, tests).assert_outcomes(passed=2)


def test_query_counter_stops_recording_after_its_block(tmp_path: t.Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'count.db'}")
    try:
        with engine.connect() as connection:
            with count_queries(engine) as statements:
                connection.execute(text("SELECT 1"))
            connection.execute(text("SELECT 2"))
        assert statements == ["SELECT 1"]
    finally:
        engine.dispose()


def test_query_counter(pytester: pytest.Pytester, tmp_path: t.Any) -> None:
    tests = """
import pytest


def test_within_budget(wsgi_scoped_testapp, wsgi_scoped_queries):
    with wsgi_scoped_queries(max=1) as statements:
        wsgi_scoped_testapp.get("/")
    assert len(statements) == 1
    assert statements[0].startswith("SELECT count(*)")


def test_over_budget_lists_statements(wsgi_scoped_testapp, wsgi_scoped_queries):
    message = r"(?s)3 SQL statements ran, at most 2 expected:.*1\\. SELECT"
    with pytest.raises(AssertionError, match=message):
        with wsgi_scoped_queries(max=2):
            for _ in range(3):
                wsgi_scoped_testapp.get("/")
"""
    url = f"sqlite:///{tmp_path / 'queries.db'}"
    run(pytester, url, tests).assert_outcomes(passed=2)


def test_missing_fixtures_explain_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
def test_registry(wsgi_scoped_session):
    pass


def test_app(wsgi_scoped_app):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*define a fixture named 'wsgi_scoped_registry' in conftest.py*",
            "*define a fixture named 'wsgi_scoped_app' in conftest.py*",
        ]
    )


def test_unbound_registry_explains_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
import pytest
from sqlalchemy.orm import scoped_session, sessionmaker


@pytest.fixture
def wsgi_scoped_registry():
    return scoped_session(sessionmaker())
"""
    )
    pytester.makepyfile(test_inner="def test_it(wsgi_scoped_session):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*The wsgi_scoped fixtures need a wsgi_scoped.Database, a scoped_session*"]
    )


def test_plugin_registered_through_entry_point_only() -> None:
    from importlib.metadata import entry_points

    [entry] = [e for e in entry_points(group="pytest11") if e.name == "wsgi_scoped"]
    assert entry.value == "wsgi_scoped.pytest_plugin"


@pytest.mark.parametrize("level", ["", "DEFERRED", "IMMEDIATE"])
def test_sqlite_workaround_leaves_the_driver_as_it_found_it(
    tmp_path: t.Any, level: str
) -> None:
    """The fixtures make SQLAlchemy send BEGIN on the test's pysqlite
    connection, so that savepoints work; afterwards the pooled connection
    is put back as it was: pysqlite begins transactions itself again, with
    the connection's own isolation level, and a rollback undoes work."""
    from wsgi_scoped.pytest_plugin import _emit_sqlite_begin

    engine = create_engine(f"sqlite:///{tmp_path / 'workaround.db'}")
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with engine.connect() as connection:
            connection.execute(text("CREATE TABLE note (body TEXT)"))
            connection.commit()
            dbapi_connection = connection.connection.dbapi_connection
            assert dbapi_connection is not None
            dbapi_connection.isolation_level = level
            restore = _emit_sqlite_begin(connection)
            sent.clear()
            with connection.begin():
                with connection.begin_nested():
                    connection.execute(text("INSERT INTO note VALUES ('kept')"))
            assert sent[:2] == ["BEGIN", "SAVEPOINT sa_savepoint_1"]
            restore()
            assert dbapi_connection.isolation_level == level
            sent.clear()
            connection.execute(text("INSERT INTO note VALUES ('undone')"))
            connection.rollback()
            assert "BEGIN" not in sent
            bodies = connection.execute(text("SELECT body FROM note")).scalars()
            assert bodies.all() == ["kept"]
    finally:
        engine.dispose()


def test_sqlite_workaround_is_for_pysqlite_only() -> None:
    """Other drivers begin transactions as SQLAlchemy expects: the fixtures
    leave them alone."""
    from wsgi_scoped.pytest_plugin import _emit_sqlite_begin

    engine = create_engine(server_url("postgresql"))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    try:
        with engine.connect() as connection:
            restore = _emit_sqlite_begin(connection)
            sent.clear()
            with connection.begin():
                connection.execute(text("SELECT 1"))
            restore()
        assert sent == ["SELECT 1"]
    finally:
        engine.dispose()
