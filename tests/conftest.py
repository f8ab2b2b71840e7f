from __future__ import annotations

import fcntl
import os
import random
import tempfile
import typing as t
import wsgiref.util
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from support import import_example
from support import unload_example

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

pytest_plugins = ["pytester"]

BODY_KINDS = ["list", "tuple", "generator", "file_wrapper", "iterable_with_close"]
MATERIALIZED = {"list", "tuple", "file_wrapper"}

SERVER_URLS = {
    "postgresql": "TEST_POSTGRESQL_URL",
    "mysql": "TEST_MYSQL_URL",
}
#: Databases, comma-separated, that test sessions running at once on the
#: same servers take one each of (mutation testing: README, "Mutation
#: testing"); the tests create tables of fixed names.
DATABASES = "WSGI_SCOPED_DATABASES"
_held: dict[int, t.IO[str]] = {}


def pytest_configure(config: pytest.Config) -> None:
    """With :data:`DATABASES` set, take a database that no other session
    holds (a lock until the session ends) and point the server URLs, which
    subprocesses inherit, at it."""
    names = [name for name in os.environ.get(DATABASES, "").split(",") if name]
    if not names or os.getpid() in _held:
        return
    for attempt, name in enumerate([*names, random.choice(names)]):
        path = Path(tempfile.gettempdir()) / f"wsgi_scoped_database_{name}.lock"
        lock = path.open("w")
        wait = attempt == len(names)  # the last attempt waits for its database
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            lock.close()
            continue
        _held[os.getpid()] = lock
        config.add_cleanup(lambda: _held.pop(os.getpid()).close())
        for variable in SERVER_URLS.values():
            if os.environ.get(variable):
                url = make_url(os.environ[variable]).set(database=name)
                os.environ[variable] = url.render_as_string(hide_password=False)
        return


def server_url(backend: str) -> str:
    """The URL of a real database server for ``backend``, or skip the test."""
    variable = SERVER_URLS[backend]
    url = os.environ.get(variable)
    if not url:
        reason = f"{backend}: set {variable} to run this test against a server"
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: t.Any) -> str:
    """A database URL for each backend: a SQLite file always, the servers when
    their URL is set."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return server_url(request.param)


class CountingSession(Session):
    """A Session that counts how often it was closed."""

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        super().close()


@pytest.fixture
def engine(tmp_path: t.Any) -> t.Iterator[Engine]:
    """A file SQLite engine, so that pooled connections can be observed."""
    engine = create_engine(f"sqlite:///{tmp_path / 'test.db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE item (name VARCHAR(50))"))
    yield engine
    engine.dispose()


@pytest.fixture
def registry(engine: Engine) -> t.Iterator[scoped_session[CountingSession]]:
    registry = scoped_session(sessionmaker(engine, class_=CountingSession))
    yield registry
    registry.remove()


def count_items(engine: Engine, table: str = "item") -> int:
    with engine.connect() as connection:
        count = connection.execute(text(f"SELECT count(*) FROM {table}"))
        return int(count.scalar_one())


@pytest.fixture
def environ() -> WSGIEnvironment:
    environ: WSGIEnvironment = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ["QUERY_STRING"] = ""
    environ["wsgi.file_wrapper"] = wsgiref.util.FileWrapper
    return environ


class StartResponseRecorder:
    """A start_response that records what the application passed to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], t.Any]] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
    ) -> t.Callable[[bytes], object]:
        self.calls.append((status, headers, exc_info))
        return lambda data: None

    @property
    def status(self) -> str:
        return self.calls[-1][0]


@pytest.fixture
def start_response() -> StartResponseRecorder:
    return StartResponseRecorder()


def unavailable(body: bytes) -> list[tuple[str, str]]:
    """The headers of the middleware's 503 answer whose body is ``body``."""
    return [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Retry-After", "1"),
    ]


def serve(app: WSGIApplication, environ: WSGIEnvironment, start: t.Any) -> bytes:
    """Act as the server: iterate the body and close it."""
    body = app(environ, start)
    try:
        return b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


class ClosingIterable:
    """A lazy body whose iterator is not itself, with a close() to forward."""

    def __init__(self, chunks: t.Callable[[], t.Iterator[bytes]]) -> None:
        self.chunks = chunks
        self.iterators: list[t.Generator[bytes, None, None]] = []
        self.closed = 0

    def __iter__(self) -> t.Iterator[bytes]:
        iterator = self.chunks()
        self.iterators.append(iterator)  # type: ignore[arg-type]
        return iterator

    def close(self) -> None:
        self.closed += 1
        for iterator in self.iterators:
            iterator.close()


class Observed:
    """What the application saw while serving a request."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.generator_finished = False


def make_app(
    registry: scoped_session[t.Any],
    body_kind: str,
    observed: Observed,
    *,
    raises: BaseException | None = None,
    body_raises: BaseException | None = None,
    chunks: int = 3,
    table: str = "item",
) -> WSGIApplication:
    """A WSGI app that writes one uncommitted row through the registry and
    returns a body of ``body_kind``; a lazy body uses the session again while
    it is iterated."""

    def produce() -> t.Iterator[bytes]:
        try:
            for number in range(chunks):
                observed.sessions.append(registry())
                registry().execute(text("SELECT 1"))
                if body_raises is not None and number == 1:
                    raise body_raises
                yield b"chunk %d\n" % number
        finally:
            observed.generator_finished = True

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        session = registry()
        observed.sessions.append(session)
        session.execute(text(f"INSERT INTO {table} (name) VALUES ('uncommitted')"))
        if raises is not None:
            raise raises
        start_response("200 OK", [("Content-Type", "text/plain")])
        if body_kind == "list":
            return [b"one", b"two"]
        if body_kind == "tuple":
            return (b"one", b"two")
        if body_kind == "file_wrapper":
            import io

            return environ["wsgi.file_wrapper"](io.BytesIO(b"file body"), 4)
        if body_kind == "generator":
            return produce()
        return ClosingIterable(produce)

    return app


@pytest.fixture
def database_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``DATABASE_URL`` at a file in ``tmp_path``, and run in another
    directory of ``tmp_path`` so the default URL could not touch the repo.
    """
    path = tmp_path / "env.sqlite3"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return path


@pytest.fixture
def load_example() -> t.Iterator[t.Callable[[str], ModuleType]]:
    """Import ``examples/<name>.py`` afresh, under a unique module name, as
    often as asked; every engine it created is disposed of at teardown.
    """
    modules: list[ModuleType] = []

    def load(name: str) -> ModuleType:
        module = import_example(name)
        modules.append(module)
        return module

    yield load
    for module in modules:
        unload_example(module)
