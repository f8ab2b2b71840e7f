"""What wsgi_scoped writes to its log: request values that cannot forge or
hide log lines, and no bound parameters."""

from __future__ import annotations

import io
import typing as t

import pytest
from conftest import StartResponseRecorder
from conftest import serve
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from test_middleware import BrokenCloseSession
from test_transaction import Base
from test_transaction import Item

from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import after_commit

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

Scenario = t.Callable[[Engine, "WSGIEnvironment"], None]


def warn_statements(engine: Engine, environ: WSGIEnvironment) -> None:
    registry = scoped_session(sessionmaker(engine))
    app = ScopedSessionMiddleware(select_twice(registry), registry, warn_statements=1)
    serve(app, environ, StartResponseRecorder())


def warn_db_time(engine: Engine, environ: WSGIEnvironment) -> None:
    registry = scoped_session(sessionmaker(engine))
    app = ScopedSessionMiddleware(select_twice(registry), registry, warn_db_time=1e-9)
    serve(app, environ, StartResponseRecorder())


def lost_work(engine: Engine, environ: WSGIEnvironment) -> None:
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("INSERT INTO item (name) VALUES ('lost')"))
        start_response("200 OK", [])
        return [b""]

    serve(
        ScopedSessionMiddleware(app, registry, stats=True),
        environ,
        StartResponseRecorder(),
    )


def body_commit(engine: Engine, environ: WSGIEnvironment) -> None:
    """A streamed body's work fails to commit in close(), after the status."""
    Base.metadata.create_all(engine)
    registry = scoped_session(sessionmaker(engine))
    with engine.begin() as connection:
        connection.execute(Item.__table__.insert().values(name="taken"))

    def body() -> t.Iterator[bytes]:
        registry().add(Item(name="taken"))
        yield b""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return body()

    app = ScopedSessionMiddleware(app, registry, commit=True)
    with pytest.raises(IntegrityError):
        serve(app, environ, StartResponseRecorder())


def ending_the_session(engine: Engine, environ: WSGIEnvironment) -> None:
    registry = scoped_session(sessionmaker(engine, class_=BrokenCloseSession))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        raise KeyError("the application's error")

    with pytest.raises(KeyError):
        ScopedSessionMiddleware(app, registry)(environ, StartResponseRecorder())


def closing_the_body(engine: Engine, environ: WSGIEnvironment) -> None:
    registry = scoped_session(sessionmaker(engine, class_=BrokenCloseSession))

    class FailingFile(io.BytesIO):
        def close(self) -> None:
            raise OSError("file close failed")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](FailingFile(b"data"))

    with pytest.raises(RuntimeError, match=r"Session\.close\(\) failed"):
        ScopedSessionMiddleware(app, registry)(environ, StartResponseRecorder())


def select_twice(registry: scoped_session[t.Any]) -> t.Any:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        registry().execute(text("SELECT 1"))
        registry().execute(text("SELECT 2"))
        start_response("200 OK", [])
        return [b""]

    return app


SCENARIOS = [
    pytest.param(warn_statements, id="N+1 warning"),
    pytest.param(warn_db_time, id="database time warning"),
    pytest.param(lost_work, id="lost work warning"),
    pytest.param(body_commit, id="body commit failure"),
    pytest.param(ending_the_session, id="ending the session failure"),
    pytest.param(closing_the_body, id="closing the body failure"),
]

FORGERS = [
    pytest.param("\n", r"\n", id="newline"),
    pytest.param("\r", r"\r", id="carriage return"),
    pytest.param("\x1b[2K\r", r"\x1b[2K\r", id="terminal escape"),
    pytest.param("\x85", r"\x85", id="C1 next line"),
    pytest.param("\x7f", r"\x7f", id="DEL"),
    pytest.param("\xe2\x80\xa8", r"\u2028", id="U+2028 sent as UTF-8"),
    pytest.param("\u2028", r"\u2028", id="U+2028 in a str"),
]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize(("forger", "escaped"), FORGERS)
def test_request_path_cannot_forge_a_log_line(
    engine: Engine,
    environ: WSGIEnvironment,
    caplog: pytest.LogCaptureFixture,
    scenario: Scenario,
    forger: str,
    escaped: str,
) -> None:
    """``GET /a%0AERROR:root:forged`` is one line of our log, the path
    escaped in it, and the raw path is a record attribute."""
    path = f"/a{forger}ERROR:root:forged line"
    environ["PATH_INFO"] = path
    scenario(engine, environ)
    lines = caplog.text.splitlines()
    [line] = [line for line in lines if "forged" in line]
    level, origin, *_ = line.split()
    assert (level, origin.split(":")[0]) in {
        ("WARNING", "wsgi_scoped.middleware"),
        ("ERROR", "wsgi_scoped.middleware"),
    }
    assert f"GET /a{escaped}ERROR:root:forged line" in line
    assert all(line.isprintable() for line in lines)
    [record] = caplog.records
    assert (record.wsgi_scoped_method, record.wsgi_scoped_path) == ("GET", path)


@pytest.mark.parametrize(
    ("method", "escaped"),
    [
        pytest.param("GET\nERROR:root:forged", r"GET\nERROR:root:forged", id="newline"),
        pytest.param(
            "\x1b]0;title\x07GET", r"\x1b]0;title\x07GET", id="terminal title escape"
        ),
    ],
)
def test_request_method_cannot_forge_a_log_line(
    engine: Engine,
    environ: WSGIEnvironment,
    caplog: pytest.LogCaptureFixture,
    method: str,
    escaped: str,
) -> None:
    environ["REQUEST_METHOD"] = method
    warn_statements(engine, environ)
    assert caplog.records[0].getMessage().startswith(f"{escaped} / ran 2 SQL")
    assert all(line.isprintable() for line in caplog.text.splitlines())


def test_log_lines_show_paths_as_sent(
    engine: Engine, environ: WSGIEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """Ordinary paths read unchanged, UTF-8 ones decoded; a backslash is
    doubled, so an escaped line break is never ambiguous."""
    paths = {
        "/orders/42/items;v=1,2~x@y+z.json": "/orders/42/items;v=1,2~x@y+z.json",
        "/caf\xc3\xa9 menu": "/café menu",
        "/a\\nb": "/a\\\\nb",
        "/\xff\xfe": "/\xff\xfe",  # not UTF-8: shown as PEP 3333 gives it
    }
    for path in paths:
        warn_statements(engine, dict(environ, PATH_INFO=path))
    assert [record.getMessage() for record in caplog.records] == [
        f"GET {shown} ran 2 SQL statements (the limit is 1): an N+1 query?"
        for shown in paths.values()
    ]


SECRET = "s3cr3t-4711"


class NoteBase(DeclarativeBase):
    pass


class Note(NoteBase):
    __tablename__ = "logging_note"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(50))


@pytest.fixture(params=["sqlite", "postgresql"])
def note_engine(request: pytest.FixtureRequest, tmp_path: t.Any) -> t.Iterator[Engine]:
    """An engine with one note, id 1, in the table."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'notes.db'}")
    else:
        engine = create_engine(server_url(request.param))
    NoteBase.metadata.drop_all(engine)
    NoteBase.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(Note.__table__.insert().values(id=1, body="first"))
    yield engine
    NoteBase.metadata.drop_all(engine)
    engine.dispose()


def test_failed_commit_logged_without_bound_parameters(
    note_engine: Engine, environ: WSGIEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """The log shows the statement, not its values; the exception that
    reaches the server is untouched and still shows them."""
    registry = scoped_session(sessionmaker(note_engine))

    def body() -> t.Iterator[bytes]:
        registry().add(Note(id=1, body=SECRET))  # the id is taken
        yield b"streamed"

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        start_response("200 OK", [])
        return body()

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    with pytest.raises(IntegrityError) as caught:
        serve(wrapped, environ, StartResponseRecorder())
    assert SECRET in str(caught.value)
    assert not caught.value.hide_parameters
    [record] = caplog.records
    assert record.getMessage().startswith("Committing the work of the response body")
    assert "INSERT INTO logging_note" in caplog.text
    assert "[SQL parameters hidden due to hide_parameters=True]" in caplog.text
    assert SECRET not in caplog.text


def test_chained_errors_logged_without_bound_parameters(
    note_engine: Engine, environ: WSGIEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook's error raised while handling a SQLAlchemy error: the whole
    chain is logged, without the parameters."""
    registry = scoped_session(sessionmaker(note_engine))
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with note_engine.connect() as connection:
                missing = text("SELECT * FROM logging_missing WHERE body = :body")
                connection.execute(missing, {"body": SECRET})
        except DBAPIError as error:
            errors.append(error)
            raise RuntimeError("publishing failed")  # noqa: B904 (context kept)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        after_commit(registry(), publish)
        start_response("200 OK", [])
        return [b""]

    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    serve(wrapped, environ, StartResponseRecorder())
    [record] = caplog.records
    assert record.getMessage() == (
        "An after-commit hook failed:"
        " test_chained_errors_logged_without_bound_parameters.<locals>.publish"
    )
    assert "RuntimeError: publishing failed" in caplog.text
    assert "SELECT * FROM logging_missing" in caplog.text
    assert SECRET not in caplog.text
    [error] = errors
    assert SECRET in str(error)


def test_hook_failure_log_carries_no_request_value(
    engine: Engine, environ: WSGIEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks also run outside requests, so their failure log names the hook,
    never the request: nothing a client sends reaches that line."""
    registry = scoped_session(sessionmaker(engine))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        after_commit(registry(), lambda: 1 / 0)
        start_response("200 OK", [])
        return [b""]

    environ["PATH_INFO"] = "/a\nERROR:root:forged line"
    wrapped = ScopedSessionMiddleware(app, registry, commit=True)
    serve(wrapped, environ, StartResponseRecorder())
    [record] = caplog.records
    assert record.getMessage() == (
        "An after-commit hook failed:"
        " test_hook_failure_log_carries_no_request_value.<locals>.app.<locals>.<lambda>"
    )
    assert "forged" not in caplog.text
