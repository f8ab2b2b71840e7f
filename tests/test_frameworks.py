"""The framework examples (Flask, Bottle, Pyramid, Falcon, and werkzeug's
dispatcher), driven through WebTest: each request's work is committed before
its status line, and rolled back when the framework answers 4xx or 5xx.

Every rollback test checks that the handler's write reached the database (an
INSERT was executed) and is gone afterwards: the framework turned the error
into a response, and the middleware saw that response's status.
"""

from __future__ import annotations

import json
import os
import sys
import typing as t
import urllib.request
import warnings
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import event
from sqlalchemy import text
from support import EXAMPLES
from support import CheckedTestApp
from support import free_port
from support import running
from support import wait_until_ready

from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import WsgiScopedWarning

#: The JSON notes examples, by test id: (example module, framework to import).
NOTES_EXAMPLES = {
    "flask": ("flask_app", "flask"),
    "bottle": ("bottle_app", "bottle"),
    "pyramid": ("pyramid_app", "pyramid"),
    "falcon": ("falcon_app", "falcon"),
}
#: Every framework example, as (name, framework) parameters.
ALL_EXAMPLES = [
    *(pytest.param(*names, id=key) for key, names in NOTES_EXAMPLES.items()),
    pytest.param("dispatcher_app", "werkzeug", id="dispatcher"),
]


def importorskip(framework: str) -> None:
    with warnings.catch_warnings():
        # Pyramid imports WebOb, which imports the deprecated cgi module.
        warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
        pytest.importorskip(framework, reason=f"{framework} is not installed")


@pytest.fixture(params=list(NOTES_EXAMPLES.values()), ids=list(NOTES_EXAMPLES))
def example(
    request: pytest.FixtureRequest,
    load_example: t.Callable[[str], ModuleType],
    database_path: Path,
) -> ModuleType:
    name, framework = request.param
    importorskip(framework)
    return load_example(name)


@pytest.fixture
def client(example: ModuleType) -> CheckedTestApp:
    return CheckedTestApp(example)


def query(module: ModuleType, sql: str) -> list[tuple[t.Any, ...]]:
    """Rows read through the engine, outside any request's session."""
    with module.db.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]


def lookups(module: ModuleType) -> list[str]:
    return [path for (path,) in query(module, "SELECT path FROM lookups ORDER BY id")]


def test_database_url_selects_the_database_file(
    example: ModuleType, database_path: Path
) -> None:
    assert example.db.engine.url.database == str(database_path)
    assert database_path.exists()
    assert not list(Path.cwd().iterdir())


def test_create_is_201_and_committed(
    client: CheckedTestApp, example: ModuleType
) -> None:
    res = client.post_json("/notes", {"text": "Buy milk"})
    assert res.status_int == 201
    assert res.json == {"id": 1, "text": "Buy milk"}
    assert query(example, "SELECT id, text FROM notes") == [(1, "Buy milk")]


def test_list_returns_committed_notes_by_id(client: CheckedTestApp) -> None:
    assert client.get("/notes").json == {"notes": []}
    for note in ("b", "a"):
        client.post_json("/notes", {"text": note}, status=201)
    expected = [{"id": 1, "text": "b"}, {"id": 2, "text": "a"}]
    assert client.get("/notes").json == {"notes": expected}


def test_get_is_200_and_its_lookup_committed(
    client: CheckedTestApp, example: ModuleType
) -> None:
    client.post_json("/notes", {"text": "kept"}, status=201)
    assert client.get("/notes/1").json == {"id": 1, "text": "kept"}
    assert client.inserted("lookups")
    assert lookups(example) == ["/notes/1"]


def test_unknown_id_is_404_and_its_lookup_rolled_back(
    client: CheckedTestApp, example: ModuleType
) -> None:
    """The handler wrote a lookup row, then the framework answered 404 (from
    ``abort``, a raised ``HTTPNotFound``): the middleware rolled it back."""
    client.post_json("/notes", {"text": "exists"}, status=201)
    client.get("/notes/99", status=404)
    assert client.inserted("lookups")
    assert lookups(example) == []
    client.get("/notes/1", status=200)
    assert lookups(example) == ["/notes/1"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no text"),
        pytest.param({"text": "  "}, id="blank"),
        pytest.param({"text": 3}, id="not a string"),
    ],
)
def test_invalid_note_is_400_and_nothing_written(
    client: CheckedTestApp, example: ModuleType, body: object
) -> None:
    client.post_json("/notes", body, status=400)
    assert query(example, "SELECT count(*) FROM notes") == [(0,)]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="malformed JSON"),
        pytest.param(b"\xff", id="not UTF-8"),
        pytest.param(b"", id="empty"),
        pytest.param(b'["text"]', id="array"),
    ],
)
def test_body_that_is_no_json_object_is_400_and_nothing_written(
    client: CheckedTestApp, example: ModuleType, body: bytes
) -> None:
    client.post("/notes", body, content_type="application/json", status=400)
    assert query(example, "SELECT count(*) FROM notes") == [(0,)]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param("POST", "/notes", b"{", 400, id="malformed JSON"),
        pytest.param("POST", "/notes", b"{}", 400, id="invalid note"),
        pytest.param("GET", "/notes/99", None, 404, id="unknown id"),
        pytest.param("GET", "/nowhere", None, 404, id="unknown path"),
    ],
)
def test_error_bodies_are_json(
    client: CheckedTestApp, method: str, path: str, body: bytes | None, status: int
) -> None:
    """As the successes are, whatever a client's ``Accept`` header says."""
    for accept in ("*/*", "text/html,application/xhtml+xml,*/*;q=0.8"):
        res = client.request(
            path,
            method=method,
            body=body or b"",
            headers={"Accept": accept, "Content-Type": "application/json"},
            status=status,
        )
        assert res.content_type == "application/json"
        assert isinstance(res.json, dict) and all(res.json.values()), res.json


def test_pyramid_logs_an_unexpected_exception(
    load_example: t.Callable[[str], ModuleType],
    database_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its exception view answers 500 itself, so it logs the traceback."""
    importorskip("pyramid")
    module = load_example("pyramid_app")
    client = CheckedTestApp(module)
    client.post_json("/notes", {"text": "breaks on load"}, status=201)

    def fail(target: object, context: object) -> None:
        raise RuntimeError("a bug in the handler")

    event.listen(module.Note, "load", fail)
    try:
        res = client.get("/notes/1", status=500)
    finally:
        event.remove(module.Note, "load", fail)
    assert res.json == {"error": "Internal Server Error"}
    (record,) = [r for r in caplog.records if r.name == module.__name__]
    assert record.levelname == "ERROR"
    assert record.getMessage() == "/notes/1 failed"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "a bug in the handler"


def test_unexpected_exception_is_500_page_and_rolled_back(
    client: CheckedTestApp, example: ModuleType
) -> None:
    """The handler wrote a lookup row, then raised: the framework rendered a
    500 page, and the middleware rolled the write back."""
    client.post_json("/notes", {"text": "breaks on load"}, status=201)

    def fail(target: object, context: object) -> None:
        raise RuntimeError("a bug in the handler")

    event.listen(example.Note, "load", fail)
    try:
        # Bottle and Falcon log the traceback to wsgi.errors.
        res = client.get("/notes/1", expect_errors=True)
    finally:
        event.remove(example.Note, "load", fail)
    assert res.status_int == 500
    assert client.inserted("lookups")
    assert lookups(example) == []


@pytest.mark.parametrize(("name", "framework"), ALL_EXAMPLES)
def test_default_database_is_a_file_in_the_current_directory(
    load_example: t.Callable[[str], ModuleType],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    framework: str,
) -> None:
    importorskip(framework)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    module = load_example(name)
    filename = f"{name.removesuffix('_app')}_notes.sqlite3"
    assert module.db.engine.url.database == filename
    assert (tmp_path / filename).exists()
    assert not module.db.registry.has()


def test_flask_error_handler_response_is_what_the_middleware_sees(
    load_example: t.Callable[[str], ModuleType], database_path: Path
) -> None:
    importorskip("flask")
    module = load_example("flask_app")
    assert isinstance(module.app.wsgi_app, ScopedSessionMiddleware)
    assert module.app.wsgi_app.commit is True
    client = CheckedTestApp(module)
    res = client.get("/notes/7", status=404)
    assert res.json == {"error": "No note 7."}
    assert lookups(module) == []


def test_pyramid_app_has_no_pyramid_tm_tween(
    load_example: t.Callable[[str], ModuleType], database_path: Path
) -> None:
    importorskip("pyramid")
    from pyramid.interfaces import ITweens

    module = load_example("pyramid_app")
    assert isinstance(module.app, ScopedSessionMiddleware)
    tweens = module.app.app.registry.queryUtility(ITweens)
    names = [name for name, _ in tweens.implicit()]
    assert not any("pyramid_tm" in name for name in names)


@pytest.fixture
def dispatcher(
    load_example: t.Callable[[str], ModuleType], database_path: Path
) -> ModuleType:
    importorskip("werkzeug")
    return load_example("dispatcher_app")


@pytest.fixture
def sessions(
    dispatcher: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> dict[str, list[object]]:
    """The sessions the dispatcher's ``db`` began a transaction in, committed
    and closed, in order."""
    seen: dict[str, list[object]] = {"began": [], "committed": [], "closed": []}
    factory = dispatcher.db.session_factory
    event.listen(factory, "after_begin", lambda s, *_: seen["began"].append(s))
    event.listen(factory, "after_commit", lambda s: seen["committed"].append(s))
    close = factory.class_.close  # sessionmaker made this subclass for db alone

    def counting_close(self: t.Any) -> None:
        seen["closed"].append(self)
        close(self)

    monkeypatch.setattr(factory.class_, "close", counting_close)
    return seen


def hits(module: ModuleType) -> list[str]:
    return [path for (path,) in query(module, "SELECT path FROM hits ORDER BY id")]


def test_dispatcher_both_mounts_commit(dispatcher: ModuleType) -> None:
    client = CheckedTestApp(dispatcher)
    res = client.post("/notes", {"text": "mounted"}, status=201)
    assert res.json == {"id": 1, "text": "mounted"}
    assert client.get("/notes").json == {"notes": [{"id": 1, "text": "mounted"}]}
    assert client.get("/stats").json == {"notes": 1, "hits": 3}
    assert query(dispatcher, "SELECT id, text FROM notes") == [(1, "mounted")]
    assert hits(dispatcher) == ["/notes", "/notes", "/stats"]


def test_dispatcher_nesting_one_session_per_request_ended_once(
    dispatcher: ModuleType, sessions: dict[str, list[object]]
) -> None:
    """Two layers with the same registry wrap each request, outside the
    dispatcher and around the mount: only the outer one manages the session,
    so the hit logged outside the mount and the mount's own work share one
    session and one transaction, committed once and closed once, and the
    inner layer finds no stale session to warn about."""
    client = CheckedTestApp(dispatcher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.post("/notes", {"text": "one"}, status=201)
        res = client.get("/stats")
    assert not [w for w in caught if issubclass(w.category, WsgiScopedWarning)]
    # The stats mount counts the hit of its own request: flushed by the same
    # session, not yet committed.
    assert res.json == {"notes": 1, "hits": 2}
    for kind in ("began", "committed", "closed"):
        assert len(sessions[kind]) == 2, kind
        assert len({id(s) for s in sessions[kind]}) == 2, kind
    assert sessions["began"] == sessions["committed"] == sessions["closed"]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/notes/1", id="inside a mount"),
        pytest.param("/elsewhere", id="no mount"),
    ],
)
def test_dispatcher_404_rolls_back_the_hit(dispatcher: ModuleType, path: str) -> None:
    client = CheckedTestApp(dispatcher)
    client.get(path, status=404)
    client.post("/notes", {}, status=400)
    assert hits(dispatcher) == []
    assert query(dispatcher, "SELECT count(*) FROM notes") == [(0,)]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as res:
        return json.load(res)


@pytest.mark.server
@pytest.mark.parametrize(("name", "framework"), ALL_EXAMPLES)
def test_example_serves_on_localhost_when_run(
    tmp_path: Path, name: str, framework: str
) -> None:
    """``python examples/<name>.py`` serves on 127.0.0.1:$PORT, with its
    default database in the current directory."""
    importorskip(framework)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PORT"] = str(port)
    log = tmp_path / "server.log"
    command = [sys.executable, str(EXAMPLES / f"{name}.py")]
    with running(command, cwd=tmp_path, env=env, log=log) as proc:
        url = f"http://127.0.0.1:{port}/notes"
        listed = wait_until_ready(partial(get_json, url), proc, log, "The example")
    assert listed == {"notes": []}
    default = tmp_path / f"{name.removesuffix('_app')}_notes.sqlite3"
    assert default.exists(), log.read_text()
