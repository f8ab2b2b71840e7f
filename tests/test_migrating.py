"""docs/migrating.rst, proven on a real application (#14): a Flask-SQLAlchemy
application (``tests/migrated_app/before``) and its port to wsgi_scoped
(``tests/migrated_app/after``) pass the same HTTP tests; the guide's code is
quoted from them or run as written, so the guide cannot drift.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import typing as t
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import support
from conftest import serve
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import inspect
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import WsgiScopedWarning

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

flask = pytest.importorskip("flask", reason="Flask is not installed")
flask_sqlalchemy = pytest.importorskip(
    "flask_sqlalchemy", reason="Flask-SQLAlchemy is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
MIGRATED = Path(__file__).resolve().parent / "migrated_app"
GUIDE = (ROOT / "docs" / "migrating.rst").read_text()


def guide_section(title: str) -> str:
    """The text of the guide's top-level section ``title``."""
    match = re.search(
        rf"(?ms)^{re.escape(title)}\n-+\n(.*?)(?=^[^\n]+\n-+\n|\Z)", GUIDE
    )
    assert match is not None, title
    return match[1]


FLASK = guide_section("From Flask-SQLAlchemy's ``db.session``")


def code_blocks(rst: str) -> list[str]:
    """The ``.. code-block:: python`` blocks of ``rst``, unindented once."""
    blocks = re.findall(r"(?m)^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", rst)
    return [re.sub(r"(?m)^    ", "", block).strip("\n") + "\n" for block in blocks]


def block_named(name: str) -> str:
    """The guide's block whose first line is ``# name``, without that line."""
    for block in code_blocks(FLASK):
        first, _, rest = block.partition("\n")
        if first == f"# {name}":
            return rest
    raise LookupError(f"docs/migrating.rst has no block starting '# {name}'")


def source(kind: str, path: str = "notes.py") -> str:
    """The text of ``migrated_app/<kind>/<path>``."""
    return (MIGRATED / kind / path).read_text()


def load(kind: str) -> ModuleType:
    """Import ``migrated_app/<kind>/notes.py`` afresh, under a unique name."""
    name = f"_migrated_{kind}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, MIGRATED / kind / "notes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # declarative mapping looks modules up there
    spec.loader.exec_module(module)
    return module


class Notes:
    """One of the two applications, built by its factory for ``url``, with
    its tables created, and Flask's test client."""

    def __init__(self, kind: str, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kind = kind
        if kind == "before":
            self.module = load("before")
            self.app = self.module.create_app({"SQLALCHEMY_DATABASE_URI": url})
            with self.app.app_context():
                self.module.db.create_all()
        else:
            monkeypatch.setenv("DATABASE_URL", url)
            self.module = load("after")
            self.app = self.module.create_app()
            self.module.Base.metadata.create_all(self.module.db.engine)
        self.client = self.app.test_client()
        self.errors: list[BaseException] = []
        flask.got_request_exception.connect(self._record, self.app)

    def _record(self, sender: t.Any, exception: BaseException, **extra: t.Any) -> None:
        self.errors.append(exception)

    def post(self, text: str, tags: tuple[str, ...] = ()) -> int:
        response = self.client.post("/notes", json={"text": text, "tags": list(tags)})
        assert response.status_code == 201, response.json
        return int(response.json["id"])

    def close(self) -> None:
        sys.modules.pop(self.module.__name__, None)
        if self.kind == "before":
            with self.app.app_context():
                self.module.db.drop_all()
                self.module.db.engine.dispose()
        else:
            self.module.db.remove()
            self.module.Base.metadata.drop_all(self.module.db.engine)
            self.module.db.engine.dispose()


@pytest.fixture
def build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> t.Iterator[t.Callable[[str, str | None], Notes]]:
    built: list[Notes] = []

    def build(kind: str, url: str | None = None) -> Notes:
        url = url or f"sqlite:///{tmp_path / f'{kind}.sqlite3'}"
        built.append(Notes(kind, url, monkeypatch))
        return built[-1]

    yield build
    for notes in built:
        notes.close()


KINDS = [
    pytest.param("before", id="Flask-SQLAlchemy"),
    pytest.param("after", id="port"),
]


@pytest.mark.parametrize("kind", KINDS)
def test_create_list_and_get(kind: str, build: t.Callable[..., Notes]) -> None:
    """POST writes a note with its tags; GET lists them through ``Note.query``
    (``?after=`` a text id included) and gets one."""
    notes = build(kind)
    first = notes.post("milk", ("shop",))
    second = notes.post("bread", ("shop", "bakery"))
    listed = notes.client.get("/notes").json["notes"]
    assert [(n["text"], n["tags"]) for n in listed] == [
        ("milk", ["shop"]),
        ("bread", ["shop", "bakery"]),
    ]
    later = notes.client.get(f"/notes?after={first}").json["notes"]
    assert [n["id"] for n in later] == [second]
    assert notes.client.get(f"/notes/{second}").json["text"] == "bread"


@pytest.mark.parametrize("kind", KINDS)
def test_get_or_404(kind: str, build: t.Callable[..., Notes]) -> None:
    """``db.get_or_404`` and ``first_or_404()``, and their ports, answer
    404 through the application's error handler."""
    notes = build(kind)
    notes.post("milk", ("shop",))
    for path in ["/notes/999", "/tags/nothing"]:
        response = notes.client.get(path)
        assert response.status_code == 404
        assert "not found" in response.json["error"]


@pytest.mark.parametrize("kind", KINDS)
def test_association_table_and_backref(
    kind: str, build: t.Callable[..., Notes]
) -> None:
    """The ``db.Table`` association table, translated to ``Table(name,
    Base.metadata, ...)``, links notes and tags both ways (the backref)."""
    notes = build(kind)
    first = notes.post("milk", ("shop",))
    second = notes.post("bread", ("shop", "bakery"))
    assert notes.client.get("/tags/shop").json["notes"] == [first, second]
    assert notes.client.get("/tags/bakery").json["notes"] == [second]
    with create_engine(notes_url(notes)).connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM note_tags")) == 3


def notes_url(notes: Notes) -> str:
    if notes.kind == "before":
        with notes.app.app_context():
            url = notes.module.db.engine.url
    else:
        url = notes.module.db.engine.url
    return t.cast(str, url.render_as_string(hide_password=False))


@pytest.mark.parametrize("kind", KINDS)
def test_failing_request_rolls_back(kind: str, build: t.Callable[..., Notes]) -> None:
    """A handler that flushed a change and then raised answers 500, and its
    change is rolled back; the same edit without the bug is kept."""
    notes = build(kind)
    note = notes.post("milk")
    response = notes.client.put(f"/notes/{note}", json={"text": "MILK!"})
    assert response.status_code == 500
    assert [type(error) for error in notes.errors] == [ValueError]
    assert notes.client.get(f"/notes/{note}").json["text"] == "milk"
    assert (
        notes.client.put(f"/notes/{note}", json={"text": "oat milk"}).status_code == 200
    )
    assert notes.client.get(f"/notes/{note}").json["text"] == "oat milk"


@pytest.mark.parametrize("kind", KINDS)
def test_factory_uses_the_configured_url(
    kind: str, build: t.Callable[..., Notes], tmp_path: Path
) -> None:
    """The factory's application writes to the database its configuration
    names: ``SQLALCHEMY_DATABASE_URI`` before, ``DATABASE_URL`` after."""
    url = f"sqlite:///{tmp_path / 'configured.sqlite3'}"
    notes = build(kind, url)
    notes.post("milk")
    with create_engine(url).connect() as connection:
        assert connection.scalars(text("SELECT text FROM notes")).all() == ["milk"]


@pytest.mark.parametrize("kind", KINDS)
def test_model_query_outside_a_request(
    kind: str, build: t.Callable[..., Notes]
) -> None:
    """``Note.query`` works in an application context too (a CLI command, a
    shell); with wsgi_scoped, ``db.query_property()`` gives a ``Query`` on
    ``db()``, ended with the context."""
    notes = build(kind)
    notes.post("milk")
    notes.post("bread")
    Note = notes.module.Note
    with notes.app.app_context():
        assert [n.text for n in Note.query.order_by(Note.id)] == ["milk", "bread"]
        if kind == "after":
            assert Note.query.session is notes.module.db()
    if kind == "after":
        assert not notes.module.db.registry.has()


def postgresql_url(driver: str) -> str:
    url = make_url(server_url("postgresql")).set(drivername=f"postgresql+{driver}")
    return t.cast(str, url.render_as_string(hide_password=False))


@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("kind", "driver", "status"),
    [
        pytest.param("before", "psycopg2", 200, id="Flask-SQLAlchemy, psycopg2"),
        pytest.param("before", "psycopg", 500, id="Flask-SQLAlchemy, psycopg 3"),
        pytest.param("after", "psycopg", 200, id="port, psycopg 3"),
        pytest.param("after", "psycopg2", 200, id="port, psycopg2"),
    ],
)
def test_psycopg3_refuses_a_text_id_for_an_integer_column(
    kind: str, driver: str, status: int, build: t.Callable[..., Notes]
) -> None:
    """The guide's psycopg 3 sentence: ``Note.id > request.args.get("after",
    0)`` compares an integer column with a string, which psycopg2 quoted
    into the SQL and psycopg 3 sends typed; ``type=int`` fixes it."""
    notes = build(kind, postgresql_url(driver))
    first = notes.post("milk")
    response = notes.client.get(f"/notes?after={first - 1}")
    assert response.status_code == status
    if status == 500:
        (error,) = notes.errors
        assert "operator does not exist: integer > character varying" in str(error)
    else:
        assert [n["id"] for n in response.json["notes"]] == [first]
    sentence = "operator does not exist: integer > character varying"
    assert sentence in FLASK and 'get("after", 0, type=int)``' in FLASK


# -- the testing point: the test's thread is the request's thread --


@pytest.mark.parametrize("client", ["Flask", "WebTest"])
def test_test_client_request_ends_the_tests_own_session(
    client: str, build: t.Callable[..., Notes]
) -> None:
    """Without the plugin, Flask's test client and WebTest run the request in
    the test's thread: the session the test opened with ``db()`` is the
    request's, which ends it, rolling back the test's setup, with a warning."""
    notes = build("after")
    app = notes.client if client == "Flask" else support.webtest.TestApp(notes.app)
    db = notes.module.db
    session = db()
    session.add(notes.module.Note(text="setup"))
    session.flush()
    with pytest.warns(WsgiScopedWarning, match="A session was still registered"):
        response = app.get("/notes")
    assert response.json["notes"] == []  # the request did not see it
    assert db() is not session
    assert db().scalar(text("SELECT count(*) FROM notes")) == 0
    assert "WsgiScopedWarning: A session was still registered" in guide_subsection(
        "Tests"
    )


def guide_subsection(title: str) -> str:
    """The text of the Flask section's subsection ``title``."""
    match = re.search(rf"(?ms)^{title}\n~+\n(.*?)(?=^[^\n]+\n~+\n|\Z)", FLASK)
    assert match is not None, title
    return match[1]


def test_guide_testing_recipe_passes(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's ``conftest.py`` and ``test_notes.py``, as written, against
    the port: Flask's test client and WebTest use the test's session, and
    nothing outlives the tests."""
    url = f"sqlite:///{tmp_path / 'recipe.sqlite3'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(MIGRATED / "after")]))
    pytester.makepyfile(
        conftest=block_named("conftest.py"), test_notes=block_named("test_notes.py")
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error", timeout=120
    )
    result.assert_outcomes(passed=2)
    with create_engine(url).connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM notes")) == 0


# -- Alembic --


def alembic(*args: str, url: str) -> str:
    """Run the ``alembic`` command in the port's directory, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=MIGRATED / "after",
        env={**os.environ, "DATABASE_URL": url, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_alembic_env_migrates_with_db_engine_and_metadata(
    build: t.Callable[..., Notes], tmp_path: Path
) -> None:
    """``alembic upgrade head`` through the guide's ``env.py`` creates the
    tables on ``db.engine``; ``alembic check`` compares them with the
    models' metadata and finds nothing to do; the application then runs
    on the migrated database, and ``downgrade`` drops the tables."""
    url = f"sqlite:///{tmp_path / 'migrated.sqlite3'}"
    engine = create_engine(url)
    assert "CREATE TABLE note_tags" in alembic("upgrade", "head", "--sql", url=url)
    assert inspect(engine).get_table_names() == []  # --sql only prints
    alembic("upgrade", "head", url=url)
    tables = {"alembic_version", "note_tags", "notes", "tags"}
    assert set(inspect(engine).get_table_names()) == tables
    assert "No new upgrade operations detected" in alembic("check", url=url)
    notes = build("after", url)
    notes.post("milk", ("shop",))
    alembic("downgrade", "base", url=url)
    engine.dispose()
    assert inspect(engine).get_table_names() == ["alembic_version"]
    assert block_named("After: migrations/env.py") == source(
        "after", "migrations/env.py"
    )


# -- the guide quotes the tested files --


#: A block may quote a function's body, or lines of it, unindented.
INDENTS = ["", "    "]


def test_guide_blocks_are_quoted_from_the_tested_applications() -> None:
    """Every ``# Before: file`` / ``# After: file`` block of the Flask
    section is, line for line, in that file of the application it names,
    and every Python block of the section is one of those or is run."""
    blocks = code_blocks(FLASK)
    checked = 0
    for block in blocks:
        first, _, rest = block.partition("\n")
        match = re.fullmatch(r"# (Before|After): (\S+)", first)
        if match is None:
            assert first in {"# conftest.py", "# test_notes.py"}, block
            continue
        quoted = "\n" + source(match[1].lower(), match[2])
        assert any(
            f"\n{textwrap.indent(rest, indent)}" in quoted for indent in INDENTS
        ), f"not in {match[1].lower()}/{match[2]}:\n{rest}"
        checked += 1
    assert checked >= 10


def shortcut_rows() -> list[tuple[str, str, str]]:
    """(``db.`` name, SQLAlchemy name, note) for each row of the guide's table
    of shortcuts, cut at its columns."""
    rule = re.search(r"\n(=+)  (=+)  =+\n", FLASK)
    assert rule is not None
    first, second = len(rule[1]) + 2, len(rule[1]) + len(rule[2]) + 4
    rows = []
    for line in FLASK.splitlines():
        if line.startswith("``db."):
            cells = line[:first].strip(), line[first:second].strip(), line[second:]
            rows.append(tuple(cell.strip().strip("`") for cell in cells))
    return rows  # type: ignore[return-value]


def resolve(dotted: str) -> t.Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_shortcut_table_names_what_flask_sqlalchemy_aliases() -> None:
    """Each ``db.Name`` of the table is the SQLAlchemy object beside it, or
    a wrapper the row's note explains; every ``db.`` name the
    Flask-SQLAlchemy application uses is in the guide."""
    rows = shortcut_rows()
    shortcuts = {shortcut for shortcut, _, _ in rows}
    assert {"db.Table", "db.Column", "db.String", "db.backref"} <= shortcuts
    db = flask_sqlalchemy.SQLAlchemy()
    for shortcut, name, note in rows:
        if name.startswith("sqlalchemy."):
            attribute = getattr(db, shortcut.removeprefix("db."))
            assert attribute is resolve(name) or note, (
                f"{shortcut} is not {name}: the row needs a note saying how they differ"
            )
    used = {
        f"db.{node.attr}"
        for node in ast.walk(ast.parse(source("before")))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "db"
    }
    assert {name for name in used if f"``{name}" not in FLASK} == set()


# -- the other sections' "After" code, run as written --


def after_code(title: str) -> str:
    """The code following the ``# After`` line in the guide's section ``title``."""
    for block in code_blocks(guide_section(title)):
        _, marker, after = block.partition("# After")
        if marker:
            return after.partition("\n")[2]
    raise LookupError(f"docs/migrating.rst: no '# After' block under {title!r}")


def test_pyramid_after_code_commits_and_vetoes(tmp_path: Path) -> None:
    """The pyramid_tm section's replacement, run as written: views keep
    ``request.dbsession``; a 200 is committed, a returned 404 rolled back."""
    pyramid_config = pytest.importorskip("pyramid.config")
    from pyramid.httpexceptions import HTTPNotFound
    from pyramid.response import Response

    url = f"sqlite:///{tmp_path / 'pyramid.sqlite3'}"
    with create_engine(url).begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))

    def view(request: t.Any) -> t.Any:
        insert = text("INSERT INTO item (name) VALUES (:name)")
        request.dbsession.execute(insert, {"name": request.path})
        return HTTPNotFound() if request.path == "/missing" else Response("ok")

    config = pyramid_config.Configurator()
    config.add_route("any", "/{name}")
    config.add_view(view, route_name="any")
    settings = {"sqlalchemy.url": url}
    namespace = {"Database": Database, "config": config, "settings": settings}
    exec(after_code("From pyramid_tm and zope.sqlalchemy"), namespace)
    client = support.webtest.TestApp(namespace["app"])
    try:
        client.get("/kept", status=200)
        client.get("/missing", status=404)
        with namespace["db"].engine.connect() as connection:
            names = connection.scalars(text("SELECT name FROM item")).all()
        assert names == ["/kept"]
    finally:
        namespace["db"].engine.dispose()


def test_try_finally_before_leaks_a_streamed_session_and_after_does_not(
    engine: Engine, environ: WSGIEnvironment, start_response: t.Any
) -> None:
    """The hand-written middleware section's block, run as written: its
    ``try/finally`` leaves the session a generator body opened registered;
    ``ScopedSessionMiddleware(app, Session)`` ends it in ``close()``."""
    Session = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: t.Any) -> t.Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield from [Session().execute(text("SELECT 'streamed'")).scalar_one().encode()]

    section = guide_section("From a hand-written ``try/finally`` middleware")
    (block,) = code_blocks(section)
    namespace = {"ScopedSessionMiddleware": ScopedSessionMiddleware}
    namespace.update(Session=Session, app=app)
    exec(block, namespace)
    before = namespace["SessionMiddleware"](app)
    assert serve(before, dict(environ), start_response) == b"streamed"
    assert Session.registry.has()  # left to the thread's next request
    Session.remove()
    assert serve(namespace["app"], dict(environ), start_response) == b"streamed"
    assert not Session.registry.has()
    assert engine.pool.checkedout() == 0
