"""``environ["wsgi_scoped.rendered"]`` and the Flask wiring of
``wsgi_scoped.flask.init_app`` (#11): rendered responses end their session
before the body is sent, streamed ones at ``close()``, and sessions used in
CLI commands end with their application context.
"""

from __future__ import annotations

import re
import typing as t
from pathlib import Path
from wsgiref.validate import validator

import pytest
from conftest import ClosingIterable
from conftest import StartResponseRecorder
from conftest import count_items
from sqlalchemy import text

from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

flask = pytest.importorskip("flask", reason="Flask is not installed")

from wsgi_scoped.flask import init_app  # noqa: E402

COMMIT = [pytest.param(False, id="commit=False"), pytest.param(True, id="commit=True")]


@pytest.fixture
def db(tmp_path: Path) -> t.Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'flask.db'}")
    with db.engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    yield db
    db.remove()
    db.engine.dispose()


def insert(db: Database, name: str) -> None:
    db().execute(text("INSERT INTO item (name) VALUES (:name)"), {"name": name})


def rendered_app(db: Database, *, claim: str) -> WSGIApplication:
    """Writes a row, returns a lazy body of rendered bytes, and puts in
    ``wsgi_scoped.rendered`` that body (``claim="body"``) or another one."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        insert(db, "handler")
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = ClosingIterable(lambda: (chunk for chunk in [b"rendered"]))
        environ["wsgi_scoped.rendered"] = body if claim == "body" else object()
        return body

    return app


@pytest.mark.parametrize("commit", COMMIT)
def test_rendered_lazy_body_session_ended_before_return(
    commit: bool,
    db: Database,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """A lazy body the application declared rendered is treated as a list:
    the session is ended, and the connection back, before the middleware
    returns it, unchanged; the server still closes it."""
    middleware = ScopedSessionMiddleware(
        rendered_app(db, claim="body"), db, commit=commit
    )
    body = middleware(environ, start_response)
    assert type(body) is ClosingIterable
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0
    assert count_items(db.engine) == (1 if commit else 0)
    assert b"".join(body) == b"rendered"
    body.close()  # type: ignore[attr-defined]
    assert body.closed == 1
    assert start_response.status == "200 OK"


@pytest.mark.parametrize("commit", COMMIT)
def test_rendered_claim_for_another_body_keeps_session_until_close(
    commit: bool,
    db: Database,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """The claim is by identity: a body other than the one announced (say,
    wrapped by a layer in between) is lazy as before."""
    middleware = ScopedSessionMiddleware(
        rendered_app(db, claim="other"), db, commit=commit
    )
    body = middleware(environ, start_response)
    assert db.registry.has()
    assert b"".join(body) == b"rendered"
    body.close()  # type: ignore[attr-defined]
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("outside", id="validator outside"),
        pytest.param("inside", id="validator inside"),
    ],
)
def test_rendered_body_passes_validator(
    where: str,
    db: Database,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """Outside, the validator sees the rendered body unchanged and the
    session ended; inside, it wraps the body, which voids the claim, and
    the session is ended at ``close()``."""
    app = rendered_app(db, claim="body")
    if where == "outside":
        wrapped = validator(ScopedSessionMiddleware(app, db))
    else:
        wrapped = ScopedSessionMiddleware(validator(app), db)
    body = wrapped(environ, start_response)
    assert db.registry.has() is (where == "inside")
    assert b"".join(body) == b"rendered"
    body.close()  # type: ignore[attr-defined]
    del body  # the validator's iterator checks, when collected, it was closed
    assert not db.registry.has()


def make_flask(db: Database, **options: t.Any) -> t.Any:
    """A Flask application wired with ``init_app``: ``/`` renders JSON after
    a write; ``/stream`` streams rows that its generator writes and reads."""
    app = flask.Flask(__name__)
    init_app(app, db, **options)

    @app.get("/")
    def index() -> dict[str, str]:
        insert(db, "view")
        if options.get("commit") is not True:
            db().commit()
        return {"ok": "yes"}

    @app.get("/stream")
    def stream() -> t.Any:
        sessions = []
        if "lazy" not in flask.request.args:
            sessions.append(db())
            insert(db, "view")

        @flask.stream_with_context
        def generate() -> t.Iterator[bytes]:
            sessions.append(db())
            insert(db, "stream")
            yield b"%d\n" % count_items_in(db)
            yield b"same\n" if sessions[0] is sessions[-1] else b"other\n"

        return flask.Response(generate())

    @app.cli.command("write")
    @flask.cli.click.argument("commit")
    def write(commit: str) -> None:
        insert(db, f"command {commit}")
        if commit == "yes":
            db().commit()

    app.shell_context_processor(lambda: {"db": db, "text": text})
    return app


def count_items_in(db: Database) -> int:
    return int(db().scalar(text("SELECT count(*) FROM item")))


@pytest.mark.parametrize("commit", COMMIT)
def test_rendered_flask_response_session_ended_before_body(
    commit: bool,
    db: Database,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """Flask returns a lazy ``ClosingIterator`` for every response; for a
    rendered one the session, and its connection, are gone before the
    server gets the body, in both commit modes (#11)."""
    app = make_flask(db, commit=commit)
    body = app(environ, start_response)
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0
    assert count_items(db.engine) == 1
    assert b"".join(body) == b'{"ok":"yes"}\n'
    body.close()
    assert start_response.status == "200 OK"


@pytest.mark.parametrize("commit", COMMIT)
@pytest.mark.parametrize(
    "view_uses_db",
    [pytest.param(True, id="view and stream"), pytest.param(False, id="stream only")],
)
def test_streamed_flask_response_keeps_session_until_close(
    commit: bool,
    view_uses_db: bool,
    db: Database,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
) -> None:
    """``stream_with_context``: the generator gets the view's session, which
    lives until ``close()``, though Flask pushes the application context
    again, and tears it down, for the stream; under ``commit=True`` the
    view's row was committed before the status and the stream's after its
    end."""
    app = make_flask(db, commit=commit)
    environ["PATH_INFO"] = "/stream"
    environ["QUERY_STRING"] = "" if view_uses_db else "lazy"
    body = app(environ, start_response)
    assert db.registry.has() is view_uses_db
    rows = 2 if view_uses_db else 1
    assert b"".join(body) == b"%d\nsame\n" % rows
    assert db.registry.has()
    body.close()
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0
    assert count_items(db.engine) == (rows if commit else 0)


@pytest.mark.parametrize("commit", COMMIT)
def test_flask_test_client_leaves_nothing_behind(commit: bool, db: Database) -> None:
    """Flask's test client (unbuffered) never closes a response: each
    request's session is still ended, so the next request finds none and
    does not warn (warnings are errors in this suite)."""
    client = make_flask(db, commit=commit).test_client()
    for _ in range(3):
        assert client.get("/").json == {"ok": "yes"}
        assert not db.registry.has()
        assert db.engine.pool.checkedout() == 0
    assert count_items(db.engine) == 3


def test_cli_command_session_ended_with_its_app_context(db: Database) -> None:
    """A command's session is ended when its application context ends:
    what it committed stays, what it did not is rolled back."""
    runner = make_flask(db).test_cli_runner()
    for commit in ("yes", "no"):
        result = runner.invoke(args=["write", commit])
        assert result.exit_code == 0, result.output
        assert not db.registry.has()
        assert db.engine.pool.checkedout() == 0
    with db.engine.connect() as connection:
        names = connection.scalars(text("SELECT name FROM item")).all()
    assert names == ["command yes"]


def test_flask_shell_session_ended_on_exit(db: Database) -> None:
    runner = make_flask(db).test_cli_runner()
    lines = "db().scalar(text('SELECT 41 + 1'))\n"
    result = runner.invoke(flask.cli.shell_command, input=lines)
    assert result.exit_code == 0, result.output
    assert "42" in result.output
    assert not db.registry.has()
    assert db.engine.pool.checkedout() == 0


def test_session_registered_before_an_app_context_is_left_alone(
    db: Database,
) -> None:
    """A session made before the context was pushed (by a test fixture, an
    outer context) belongs to its maker: the context's end leaves it."""
    app = make_flask(db)
    session = db()
    insert(db, "outside")
    with app.app_context():
        assert db() is session
    assert db() is session
    assert count_items_in(db) == 1


def test_session_used_after_a_request_in_the_same_context_is_ended(
    db: Database,
) -> None:
    """A request served inside an outer application context leaves that
    context in charge of what is used after the request."""
    app = make_flask(db)
    with app.app_context():
        assert app.test_client().get("/").status_code == 200
        insert(db, "after")
    assert not db.registry.has()
    assert count_items(db.engine) == 1


def test_init_app_refuses_what_is_not_flask(db: Database) -> None:
    app = flask.Flask(__name__)
    message = (
        "'app' must be a flask.Flask application, got 'Database'. Call"
        " init_app(app, db) with the Flask object itself, before wrapping its"
        " wsgi_app in other middleware."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        init_app(db, app)  # type: ignore[arg-type]


def test_database_init_app_is_the_flask_convention(db: Database) -> None:
    """``db.init_app(app, **options)``, as with Flask-SQLAlchemy."""
    app = flask.Flask(__name__)

    @app.post("/items")
    def add() -> tuple[str, int]:
        db().execute(text("INSERT INTO item (name) VALUES ('x')"))
        return "made", 201

    middleware = db.init_app(app, commit=True)
    assert app.wsgi_app is middleware
    assert middleware.registry is db and middleware.commit is True
    with app.test_client() as client:
        assert client.post("/items").status_code == 201
    assert count_items(db.engine) == 1
    assert not db.registry.has()


def test_another_flask_application_is_left_alone(db: Database) -> None:
    """init_app wires one application: another one in the same process,
    not wired, sees nothing of it in its requests' environ or ``g``, even
    while the registry has a session."""
    make_flask(db)
    other = flask.Flask("other")
    seen: dict[str, object] = {}

    @other.route("/")
    def index() -> str:
        seen["g"] = sorted(vars(flask.g))
        return "other"

    def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        body = flask_wsgi_app(environ, start_response)
        seen["environ"] = sorted(key for key in environ if "wsgi_scoped" in key)
        return body

    flask_wsgi_app = other.wsgi_app
    other.wsgi_app = wsgi_app  # type: ignore[method-assign]
    session = db()  # a session the other application's contexts must not claim
    try:
        assert other.test_client().get("/").text == "other"
        assert seen == {"g": [], "environ": []}
        assert db() is session
    finally:
        db.remove()
