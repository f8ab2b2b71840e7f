"""``commit=True, retries=N`` against real conflicts: serialization failures
and deadlocks on PostgreSQL and MariaDB, and SQLite's "database is locked",
produced by concurrent transactions, not by raising mocked exceptions.

Requests are driven by calling the WSGI app with a raw environ, in threads
when two transactions must be open at once; they meet at ``threading.Event``
and ``Barrier`` points, each with a timeout, and the databases' lock waits
are bounded, so no test can hang.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sqlite3
import threading
import typing as t
import uuid
import wsgiref.util
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import StartResponseRecorder
from conftest import serve
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import is_transient

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

#: Seconds any wait in these tests may last before the test fails.
TIMEOUT = 10
ATTEMPT = "wsgi_scoped.attempt"

#: The SQLSTATE (PostgreSQL) or error number (MariaDB) of a deadlock.
DEADLOCK = {"postgresql": "40P01", "mysql": 1213}


@dataclasses.dataclass
class Counters:
    """A table of integer counters ``(id, n)`` on a database server, made
    for one test, with an engine whose connections carry a name of their own
    so that leaks are seen even while other tests use the same database."""

    engine: Engine
    table: str

    def values(self) -> dict[int, int]:
        with self.engine.connect() as connection:
            rows = connection.execute(text(f"SELECT id, n FROM {self.table}"))
            return {id_: n for id_, n in rows}

    def add(self, id_: int, amount: int) -> None:
        """A competing transaction: add to a counter and commit."""
        with self.engine.begin() as connection:
            connection.execute(self.update, {"id": id_, "amount": amount})

    @property
    def update(self) -> t.Any:
        return text(f"UPDATE {self.table} SET n = n + :amount WHERE id = :id")

    def assert_released(self) -> None:
        """Every connection is back in the pool, and (PostgreSQL) none of this
        engine's server connections is left idle in a transaction."""
        assert self.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        if self.engine.dialect.name != "postgresql":
            return
        probe = create_engine(self.engine.url, poolclass=NullPool)
        try:
            with probe.connect() as connection:
                idle = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database()"
                        " AND application_name = :name"
                        " AND state LIKE 'idle in transaction%'"
                    ),
                    {"name": self.table},
                ).scalar_one()
        finally:
            probe.dispose()
        assert idle == 0


MakeCounters = t.Callable[..., Counters]


@pytest.fixture
def counters() -> t.Iterator[MakeCounters]:
    """Make ``Counters`` on a server (skipping when its URL is not set):
    ``make(backend, rows=1, lock_wait=5, **engine_options)``. Deadlocks are
    detected within 100 ms, and any lock wait ends after ``lock_wait``
    seconds. The tables are dropped and the engines disposed afterwards."""
    made: list[Counters] = []

    def make(
        backend: str, rows: int = 1, lock_wait: int = 5, **options: t.Any
    ) -> Counters:
        url = server_url(backend)
        table = f"retry_{uuid.uuid4().hex[:12]}"
        if backend == "postgresql":
            settings = f"-c deadlock_timeout=100ms -c lock_timeout={lock_wait}s"
            connect_args = {"application_name": table, "options": settings}
            suffix = ""
        else:
            connect_args = {
                "init_command": f"SET SESSION innodb_lock_wait_timeout = {lock_wait},"
                f" lock_wait_timeout = {lock_wait}"
            }
            suffix = " ENGINE=InnoDB"
        engine = create_engine(url, connect_args=connect_args, **options)
        made.append(Counters(engine, table))
        with engine.begin() as connection:
            connection.execute(
                text(
                    f"CREATE TABLE {table}"
                    f" (id INTEGER PRIMARY KEY, n INTEGER NOT NULL){suffix}"
                )
            )
            connection.execute(
                text(f"INSERT INTO {table} (id, n) VALUES (:id, 0)"),
                [{"id": id_} for id_ in range(1, rows + 1)],
            )
        return made[-1]

    yield make
    for made_counters in made:
        try:
            with made_counters.engine.begin() as connection:
                connection.execute(text(f"DROP TABLE IF EXISTS {made_counters.table}"))
        finally:
            made_counters.engine.dispose()


def post(
    app: WSGIApplication, start_response: StartResponse, body: bytes = b"{}"
) -> bytes:
    """Send a POST request with ``body`` to ``app`` and return the response
    body, closing it as a server would."""
    environ: WSGIEnvironment = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(
        {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/counters",
            "QUERY_STRING": "",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
    )
    return serve(app, environ, start_response)


def settle(future: Future[bytes]) -> tuple[bytes | None, BaseException | None]:
    """The response body or the error of a request run in a thread."""
    error = future.exception(timeout=TIMEOUT)
    if error is not None:
        return None, error
    return future.result(), None


def read_body(environ: WSGIEnvironment) -> bytes:
    return t.cast(bytes, environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))


def error_code(error: BaseException) -> object:
    """PostgreSQL's SQLSTATE, or MySQL's error number, of a database error."""
    assert isinstance(error, OperationalError)
    if type(error.orig).__module__.startswith("psycopg"):
        return error.orig.sqlstate  # type: ignore[union-attr]
    return error.orig.args[0]  # type: ignore[union-attr]


def increment_app(
    registry: scoped_session[Session],
    counters: Counters,
    seen: list[tuple[int, bytes, int]],
    before_write: t.Callable[[int], None],
) -> WSGIApplication:
    """Read counter 1, log the request as row ``100 + attempt``, then add the
    body's ``add`` to counter 1. ``before_write(attempt)`` runs between the
    read and the write: the competing transaction's turn. The status is set
    before the write, so a failed attempt has a status the server must never
    see."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        attempt = environ[ATTEMPT]
        body = read_body(environ)
        amount = json.loads(body)["add"]
        session = registry()
        value = session.execute(
            text(f"SELECT n FROM {counters.table} WHERE id = 1")
        ).scalar_one()
        seen.append((attempt, body, value))
        session.execute(
            text(f"INSERT INTO {counters.table} (id, n) VALUES (:id, :n)"),
            {"id": 100 + attempt, "n": amount},
        )
        start_response("200 OK", [("X-Attempt", str(attempt))])
        before_write(attempt)
        session.execute(counters.update, {"id": 1, "amount": amount})
        return [str(value + amount).encode()]

    return app


def test_serialization_failure_retried_request_commits_both_increments(
    counters: MakeCounters,
) -> None:
    """REPEATABLE READ: request A reads counter 1, another transaction adds
    1 to it and commits, then A's UPDATE fails with 40001. A's second attempt
    reads the new value, gets the same request body, and commits."""
    db = counters("postgresql", isolation_level="REPEATABLE READ")
    registry = scoped_session(sessionmaker(db.engine))
    has_read, competitor_committed = threading.Event(), threading.Event()

    def wait_for_competitor(attempt: int) -> None:
        if attempt == 1:
            has_read.set()
            assert competitor_committed.wait(TIMEOUT)

    seen: list[tuple[int, bytes, int]] = []
    app = ScopedSessionMiddleware(
        increment_app(registry, db, seen, wait_for_competitor),
        registry,
        commit=True,
        retries=1,
        retry_backoff=0,
    )
    start_response = StartResponseRecorder()
    body = json.dumps({"add": 5, "note": "request A"}).encode()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(post, app, start_response, body)
        assert has_read.wait(TIMEOUT)
        db.add(1, 1)
        competitor_committed.set()
        content, error = settle(future)

    assert error is None
    assert content == b"6"
    assert seen == [(1, body, 0), (2, body, 1)]
    assert start_response.calls == [("200 OK", [("X-Attempt", "2")], None)]
    assert db.values() == {1: 6, 102: 5}
    db.assert_released()


def test_serialization_failure_without_retries_propagates_nothing_committed(
    counters: MakeCounters,
) -> None:
    """The same conflict with ``retries=0``: the 40001 error reaches the
    server, no status was sent, and A's log row and increment are absent."""
    db = counters("postgresql", isolation_level="REPEATABLE READ")
    registry = scoped_session(sessionmaker(db.engine))
    has_read, competitor_committed = threading.Event(), threading.Event()

    def wait_for_competitor(attempt: int) -> None:
        has_read.set()
        assert competitor_committed.wait(TIMEOUT)

    seen: list[tuple[int, bytes, int]] = []
    app = ScopedSessionMiddleware(
        increment_app(registry, db, seen, wait_for_competitor), registry, commit=True
    )
    start_response = StartResponseRecorder()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(post, app, start_response, b'{"add": 5}')
        assert has_read.wait(TIMEOUT)
        db.add(1, 1)
        competitor_committed.set()
        with pytest.raises(OperationalError) as excinfo:
            future.result(TIMEOUT)

    assert error_code(excinfo.value) == "40001"
    assert [attempt for attempt, _, _ in seen] == [1]
    assert start_response.calls == []
    assert db.values() == {1: 1}
    db.assert_released()


def test_serialization_failure_at_commit_retried_only_final_status_sent(
    counters: MakeCounters,
) -> None:
    """SERIALIZABLE write skew: request A and another transaction each read
    the sum of the counters and insert a row; the other commits first, so the
    middleware's commit of A fails with 40001 after A set its status. Only
    the second attempt's status and headers reach the server."""
    db = counters("postgresql", isolation_level="SERIALIZABLE")
    registry = scoped_session(sessionmaker(db.engine))
    has_written, competitor_committed = threading.Event(), threading.Event()
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        attempt = environ[ATTEMPT]
        attempts.append(attempt)
        session = registry()
        total = session.execute(text(f"SELECT sum(n) FROM {db.table}")).scalar_one()
        session.execute(
            text(f"INSERT INTO {db.table} (id, n) VALUES (:id, :n)"),
            {"id": 100 + attempt, "n": total + 1},
        )
        start_response("201 Created", [("X-Attempt", str(attempt))])
        if attempt == 1:
            has_written.set()
            assert competitor_committed.wait(TIMEOUT)
        return [b"created"]

    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, retries=1, retry_backoff=0
    )
    start_response = StartResponseRecorder()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(post, wrapped, start_response)
        assert has_written.wait(TIMEOUT)
        with db.engine.begin() as connection:
            total = connection.execute(text(f"SELECT sum(n) FROM {db.table}"))
            connection.execute(
                text(f"INSERT INTO {db.table} (id, n) VALUES (200, :n)"),
                {"n": total.scalar_one() + 1},
            )
        competitor_committed.set()
        content, error = settle(future)

    assert error is None
    assert content == b"created"
    assert attempts == [1, 2]
    assert start_response.calls == [("201 Created", [("X-Attempt", "2")], None)]
    assert db.values() == {1: 0, 200: 1, 102: 2}
    db.assert_released()


def test_serialization_failure_on_every_attempt_raises_last_error(
    counters: MakeCounters,
) -> None:
    """Before each attempt's UPDATE another transaction adds to the counter
    and commits, so all three attempts of ``retries=2`` fail with 40001: the
    third error propagates, no status was sent, nothing of the request is
    committed."""
    db = counters("postgresql", isolation_level="REPEATABLE READ")
    registry = scoped_session(sessionmaker(db.engine))
    errors: list[OperationalError] = []

    def compete(attempt: int) -> None:
        db.add(1, 1)

    seen: list[tuple[int, bytes, int]] = []
    inner = increment_app(registry, db, seen, compete)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        try:
            return t.cast("list[bytes]", inner(environ, start_response))
        except OperationalError as error:
            errors.append(error)
            raise

    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, retries=2, retry_backoff=0
    )
    start_response = StartResponseRecorder()
    with pytest.raises(OperationalError) as excinfo:
        post(wrapped, start_response, b'{"add": 5}')

    assert [attempt for attempt, _, _ in seen] == [1, 2, 3]
    assert [error_code(error) for error in errors] == ["40001"] * 3
    assert excinfo.value is errors[-1]
    assert start_response.calls == []
    assert db.values() == {1: 3}
    db.assert_released()


@dataclasses.dataclass
class Transfer:
    """A request adding ``amount`` to two counters in ``order``, and what
    became of it."""

    order: tuple[int, int]
    amount: int
    attempts: list[int] = dataclasses.field(default_factory=list)
    start_response: StartResponseRecorder = dataclasses.field(
        default_factory=StartResponseRecorder
    )
    holds_both: threading.Event = dataclasses.field(default_factory=threading.Event)
    content: bytes | None = None
    error: BaseException | None = None

    def app(
        self,
        registry: scoped_session[Session],
        counters: Counters,
        both_locked: threading.Barrier,
        other: Transfer,
    ) -> WSGIApplication:
        """On the first attempt, wait after the first UPDATE until the other
        request holds its first row too, so that the second UPDATEs
        deadlock. A retry first waits until the other request holds both
        rows, so that it queues behind the winner instead of racing it to
        its first row (and into a second deadlock)."""

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
            attempt = environ[ATTEMPT]
            self.attempts.append(attempt)
            if attempt > 1:
                assert other.holds_both.wait(TIMEOUT)
            session = registry()
            session.execute(
                counters.update, {"id": self.order[0], "amount": self.amount}
            )
            if attempt == 1:
                both_locked.wait()
            session.execute(
                counters.update, {"id": self.order[1], "amount": self.amount}
            )
            self.holds_both.set()
            start_response("200 OK", [("X-Attempt", str(attempt))])
            return [b"transferred"]

        return app


def run_transfers(counters: Counters, retries: int) -> list[Transfer]:
    """Run request A (counter 1 then 2, adds 1) and request B (2 then 1, adds
    10) concurrently through one middleware; return them once both ended."""
    registry = scoped_session(sessionmaker(counters.engine))
    both_locked = threading.Barrier(2, timeout=TIMEOUT)
    transfers = [Transfer((1, 2), 1), Transfer((2, 1), 10)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(
                post,
                ScopedSessionMiddleware(
                    transfer.app(registry, counters, both_locked, other),
                    registry,
                    commit=True,
                    retries=retries,
                    retry_backoff=0,
                ),
                transfer.start_response,
            )
            for transfer, other in zip(transfers, transfers[::-1], strict=True)
        ]
        for transfer, future in zip(transfers, futures, strict=True):
            transfer.content, transfer.error = settle(future)
    return transfers


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_deadlock_victim_retried_both_requests_commit(
    counters: MakeCounters, backend: str
) -> None:
    """Two requests lock two rows in opposite orders and deadlock; the
    server aborts one, and with ``retries=2`` its second attempt commits:
    both requests answer 200 and both increments are on both rows."""
    db = counters(backend, rows=2)

    transfers = run_transfers(db, retries=2)

    for transfer in transfers:
        assert transfer.error is None
        assert transfer.content == b"transferred"
        final = str(transfer.attempts[-1])
        assert transfer.start_response.calls == [
            ("200 OK", [("X-Attempt", final)], None)
        ]
    assert sorted(transfer.attempts for transfer in transfers) == [[1], [1, 2]]
    assert db.values() == {1: 11, 2: 11}
    db.assert_released()


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_deadlock_without_retries_victim_raises_winner_commits(
    counters: MakeCounters, backend: str
) -> None:
    """The same deadlock with ``retries=0``: the victim's deadlock error
    reaches the server with no status sent, the other request commits, and
    only the winner's increment is on the rows."""
    db = counters(backend, rows=2)

    transfers = run_transfers(db, retries=0)

    (victim,) = [transfer for transfer in transfers if transfer.error is not None]
    (winner,) = [transfer for transfer in transfers if transfer.error is None]
    assert victim.error is not None
    assert error_code(victim.error) == DEADLOCK[backend]
    assert is_transient(victim.error)
    assert victim.attempts == [1]
    assert victim.start_response.calls == []
    assert winner.start_response.calls == [("200 OK", [("X-Attempt", "1")], None)]
    assert db.values() == {1: winner.amount, 2: winner.amount}
    db.assert_released()


def test_mysql_lock_wait_timeout_retried_request_commits(
    counters: MakeCounters,
) -> None:
    """Another transaction holds counter 1's row lock: the request's UPDATE
    waits out ``innodb_lock_wait_timeout`` (1 s) and fails with 1205. The
    lock is released once attempt 1 failed; attempt 2 commits."""
    db = counters("mysql", lock_wait=1)
    registry = scoped_session(sessionmaker(db.engine))
    holder = db.engine.connect()
    attempts: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        attempt = environ[ATTEMPT]
        attempts.append(attempt)
        try:
            registry().execute(db.update, {"id": 1, "amount": 5})
        except OperationalError:
            holder.rollback()
            raise
        start_response("200 OK", [])
        return [b"added"]

    wrapped = ScopedSessionMiddleware(
        app, registry, commit=True, retries=1, retry_backoff=0
    )
    start_response = StartResponseRecorder()
    try:
        holder.execute(db.update, {"id": 1, "amount": 1})
        content = post(wrapped, start_response)
    finally:
        holder.close()

    assert content == b"added"
    assert attempts == [1, 2]
    assert start_response.calls == [("200 OK", [], None)]
    assert db.values() == {1: 5}
    db.assert_released()


@pytest.fixture
def locked_sqlite(tmp_path: t.Any) -> t.Iterator[tuple[Engine, sqlite3.Connection]]:
    """A SQLite file with a 0.1 s busy timeout, whose write lock is held by
    another connection (``BEGIN IMMEDIATE``) until the test releases it."""
    path = tmp_path / "locked.db"
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE note (attempt INTEGER, body TEXT)"))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        probe = sqlite3.connect(path, timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                probe.execute("INSERT INTO note (attempt) VALUES (0)")
        finally:
            probe.close()
        yield engine, holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def note_app(
    registry: scoped_session[Session],
    holder: sqlite3.Connection,
    release_after: int | None,
    seen: list[tuple[int, bytes, Session]],
    errors: list[OperationalError],
) -> WSGIApplication:
    """Insert the request body as a note. When the INSERT fails, record the
    error, and release the other connection's lock if this was attempt
    ``release_after``."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        attempt = environ[ATTEMPT]
        body = read_body(environ)
        seen.append((attempt, body, registry()))
        start_response("201 Created", [("X-Attempt", str(attempt))])
        try:
            registry().execute(
                text("INSERT INTO note (attempt, body) VALUES (:attempt, :body)"),
                {"attempt": attempt, "body": body.decode()},
            )
        except OperationalError as error:
            errors.append(error)
            if attempt == release_after:
                holder.execute("ROLLBACK")
            raise
        return [b"created"]

    return app


def notes(engine: Engine) -> list[tuple[int, str]]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT attempt, body FROM note"))
        return [(row.attempt, row.body) for row in rows]


def test_sqlite_locked_write_retried_commits_with_replayed_body(
    locked_sqlite: tuple[Engine, sqlite3.Connection],
) -> None:
    """The request's INSERT meets another connection's write lock and fails
    with "database is locked" after the busy timeout; the lock is released
    once attempt 1 failed, and attempt 2 reads the same body, in a fresh
    session, and commits."""
    engine, holder = locked_sqlite
    registry = scoped_session(sessionmaker(engine))
    seen: list[tuple[int, bytes, Session]] = []
    errors: list[OperationalError] = []
    app = ScopedSessionMiddleware(
        note_app(registry, holder, 1, seen, errors),
        registry,
        commit=True,
        retries=1,
        retry_backoff=0,
    )
    start_response = StartResponseRecorder()
    body = json.dumps({"note": "written once"}).encode()

    content = post(app, start_response, body)

    assert content == b"created"
    assert [str(error.orig) for error in errors] == ["database is locked"]
    assert [(attempt, read) for attempt, read, _ in seen] == [(1, body), (2, body)]
    failed, final = (session for _, _, session in seen)
    assert failed is not final
    assert not failed.in_transaction()
    assert not registry.registry.has()
    assert start_response.calls == [("201 Created", [("X-Attempt", "2")], None)]
    assert notes(engine) == [(2, body.decode())]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("retries", "attempts"),
    [
        pytest.param(0, [1], id="no retries"),
        pytest.param(2, [1, 2, 3], id="retries exhausted"),
    ],
)
def test_sqlite_lock_held_raises_last_error_nothing_committed(
    locked_sqlite: tuple[Engine, sqlite3.Connection], retries: int, attempts: list[int]
) -> None:
    """The write lock is held through every attempt: the last attempt's
    "database is locked" error reaches the server, no status was sent, and
    no note is committed."""
    engine, holder = locked_sqlite
    registry = scoped_session(sessionmaker(engine))
    seen: list[tuple[int, bytes, Session]] = []
    errors: list[OperationalError] = []
    app = ScopedSessionMiddleware(
        note_app(registry, holder, None, seen, errors),
        registry,
        commit=True,
        retries=retries,
        retry_backoff=0,
    )
    start_response = StartResponseRecorder()

    with pytest.raises(OperationalError, match="database is locked") as excinfo:
        post(app, start_response, b'{"note": "never written"}')

    assert [attempt for attempt, _, _ in seen] == attempts
    assert len(errors) == len(attempts)
    assert excinfo.value is errors[-1]
    assert start_response.calls == []
    holder.execute("ROLLBACK")
    assert notes(engine) == []
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
