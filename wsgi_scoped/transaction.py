"""The transaction policy of ``commit=True``: the commit veto, after-commit
hooks, which database errors are worth a retry, and the request body kept so
that a retried request can read it again.
"""

from __future__ import annotations

import tempfile
import typing as t
import weakref

from sqlalchemy import Connection
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from .exceptions import AbortedTransactionError
from .exceptions import DeadlineExceededError
from .exceptions import ReplicaWriteError
from .exceptions import _log_failure
from .exceptions import _parameters_hidden
from .exceptions import logger
from .observe import STATS_KEY
from .scope import _has_session

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

#: The signature of a commit veto: ``(environ, status, headers) -> abort?``.
CommitVeto = t.Callable[["WSGIEnvironment", str, "list[tuple[str, str]]"], bool]

#: The response header that forces commit (``commit``) or abort (any other
#: value); pyramid_tm's name. The middleware removes it from the response.
TM_HEADER = "x-tm"

#: Session.info keys: hooks waiting for a commit, and hooks whose commit came.
_HOOKS = "wsgi_scoped.after_commit"
_READY = "wsgi_scoped.after_commit.ready"
#: Environ key a handler sets to ``False`` to keep its request out of commit=True.
COMMIT_KEY = "wsgi_scoped.commit"

#: SQLSTATEs of PostgreSQL's serialization failure and deadlock.
_PG_TRANSIENT = frozenset({"40001", "40P01"})
#: SQLSTATE of PostgreSQL's query_canceled: a statement_timeout (a deadline's)
#: or a cancel request.
_PG_CANCELLED = "57014"
#: MySQL/MariaDB error numbers of a deadlock and a lock wait timeout.
_MYSQL_TRANSIENT = frozenset({1213, 1205})
_MYSQL_DRIVERS = ("pymysql", "MySQLdb", "mysql", "mariadb")


def default_commit_veto(
    environ: WSGIEnvironment, status: str, headers: list[tuple[str, str]]
) -> bool:
    """Return ``True`` (abort) for a 4xx or 5xx status, unless the response
    has an ``X-Tm`` header: ``X-Tm: commit`` forces a commit, any other
    value forces an abort.

    :param environ: the request's WSGI environ.
    :param status: the status line, such as ``"200 OK"``.
    :param headers: the response headers, as given to ``start_response``.

    .. versionadded:: 0.1
    """
    for name, value in headers:
        if name.lower() == TM_HEADER:
            return value.strip().lower() != "commit"
    return status[:1] in ("4", "5")


def after_commit(session: Session, callback: t.Callable[[], object]) -> None:
    """Call ``callback`` once the transaction in progress on ``session``
    has committed, for work that must not happen for rolled-back data (mail,
    cache purges, queue messages).

    Hooks run in the order they were added, right after the commit, with the
    connection already back in the pool: the middleware's commit
    (``commit=True``), a handler's own ``session.commit()`` (``commit=False``)
    or a commit outside any request, such as in a command-line script. They
    are dropped when that transaction rolls back instead (a vetoed or failed
    request, a retried attempt, a session closed without committing). A hook
    that raises is logged with its name; the other hooks still run and the
    commit stands.

    :param session: the session whose commit the hook waits for, ``db()``.
    :param callback: called with no arguments.

    .. code-block:: python

        after_commit(db(), lambda: mailer.send(welcome))

    .. versionadded:: 0.1
    """
    hooks = session.info.get(_HOOKS)
    if hooks is None:
        hooks = session.info[_HOOKS] = []
        if _READY not in session.info:
            session.info[_READY] = []
            event.listen(session, "after_commit", _hooks_committed)
            event.listen(session, "after_transaction_end", _hooks_settled)
    hooks.append(callback)


def _hooks_committed(session: Session) -> None:
    """The session's transaction committed (a savepoint is not enough)."""
    if not session.in_nested_transaction():
        session.info[_READY].extend(session.info.pop(_HOOKS, ()))


def _hooks_settled(session: Session, transaction: t.Any) -> None:
    """The outermost transaction ended and its connections went back to the
    pool: run what its commit made ready, forget what it rolled back."""
    if transaction.parent is None:
        session.info.pop(_HOOKS, None)
        _run_ready(session)


def _run_ready(session: Session) -> None:
    ready = session.info[_READY]
    while ready:
        hook = ready.pop(0)
        try:
            hook()
        except Exception as error:
            # No request values here: hooks also run outside requests.
            name = getattr(hook, "__qualname__", type(hook).__qualname__)
            with _parameters_hidden(error):
                logger.error("An after-commit hook failed: %s", name, exc_info=True)


_ABORTED = (
    "The transaction was aborted by an earlier error, so COMMIT would be a"
    " silent ROLLBACK: PostgreSQL ignores every statement after an error until"
    " the transaction ends, and catching the error in Python does not undo"
    " that. The work of this transaction is lost and was not committed. Fix:"
    " run the statement that may fail in a savepoint, 'with"
    " session.begin_nested(): ...', so that only the savepoint is rolled back."
)
#: PostgreSQL's "in a failed transaction block" (libpq's PQTRANS_INERROR),
#: as psycopg 3 and psycopg2 report it in ``connection.info.transaction_status``.
_PG_INERROR = 3


#: The listeners installed on each sessionmaker, held weakly: SQLAlchemy's
#: ``event.contains()`` keeps a collected sessionmaker's key, and so answers
#: yes for a new one made at the same address.
_listening: weakref.WeakKeyDictionary[sessionmaker[t.Any], set[t.Any]] = (
    weakref.WeakKeyDictionary()
)


def _listen_once(
    sessions: sessionmaker[t.Any], name: str, listener: t.Callable[..., t.Any]
) -> None:
    """Listen to the event ``name`` of the sessions of ``sessions``, once."""
    installed = _listening.setdefault(sessions, set())
    if (name, listener) not in installed:
        installed.add((name, listener))
        event.listen(sessions, name, listener)


def _guard_commits(sessions: object) -> None:
    """Make the sessions of ``sessions`` (a sessionmaker) refuse to commit
    an aborted PostgreSQL transaction; once per sessionmaker."""
    if isinstance(sessions, sessionmaker):
        _listen_once(sessions, "before_commit", _refuse_aborted_commit)


def _refuse_aborted_commit(session: Session) -> None:
    """Raise instead of letting COMMIT of an aborted transaction pass."""
    for connection in _connections(session.get_transaction()):
        if connection.dialect.name != "postgresql" or connection.invalidated:
            continue
        info = getattr(connection.connection.dbapi_connection, "info", None)
        if getattr(info, "transaction_status", None) == _PG_INERROR:
            raise AbortedTransactionError(_ABORTED)


def _connections(transaction: t.Any) -> t.Iterable[Connection]:
    """The connections a session's transaction holds, without acquiring any."""
    try:
        return t.cast("t.Iterable[Connection]", transaction.connections)
    except AttributeError:  # pragma: no cover - SQLAlchemy < 2.1.7
        return [entry[0] for entry in transaction._connections.values()]


def _roll_back(session: Session) -> None:
    """Roll back, and forget hooks waiting even if no transaction began: a
    session that outlives the request must not run them on a later commit."""
    session.rollback()
    session.info.pop(_HOOKS, None)


def _commit(session: Session) -> None:
    """Commit the transaction in progress, if any, without expiring: the
    objects stay loaded for the body, and the session is ended next anyway."""
    if not session.in_transaction():
        if _READY in session.info:  # nothing to commit: the hooks may run
            _hooks_committed(session)
            _run_ready(session)
        return
    expire = session.expire_on_commit
    session.expire_on_commit = False
    try:
        session.commit()
    finally:
        session.expire_on_commit = expire


class _HeldResponse:
    """The ``start_response`` given to the application under commit=True:
    the status line is held until the handler's work is committed."""

    __slots__ = (
        "start_response",
        "status",
        "headers",
        "exc_info",
        "finish",
        "released",
        "committed",
        "server_write",
    )

    def __init__(
        self,
        start_response: StartResponse,
        finish: t.Callable[[_HeldResponse], None],
    ) -> None:
        self.start_response = start_response
        #: Commits or rolls back, then releases: ``_finish_handler``.
        self.finish = finish
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.exc_info: t.Any = None
        self.released = False
        self.committed = False
        self.server_write: t.Callable[[bytes], object] | None = None

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
    ) -> t.Callable[[bytes], object]:
        if self.released:
            # An error after the status went out: the server decides.
            return self.start_response(status, headers, exc_info)
        if self.status is not None and exc_info is None:
            # PEP 3333, as wsgiref and gunicorn enforce it.
            raise AssertionError(
                "start_response() was called a second time without exc_info:"
                " PEP 3333 allows a second call only to replace the status"
                " of an error, with exc_info=sys.exc_info()."
            )
        self.status, self.headers, self.exc_info = status, headers, exc_info
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy ``write()``: the response starts now, so commit first."""
        if not self.released:
            self.finish(self)
        self.server_write(data)  # type: ignore[misc]

    def release(self) -> None:
        headers = [h for h in self.headers if h[0].lower() != TM_HEADER]
        status = t.cast(str, self.status)  # finish() releases only with a status
        self.server_write = self.start_response(status, headers, self.exc_info)
        self.exc_info = None
        self.released = True


def _finish_handler(
    registry: scoped_session[t.Any],
    commit_veto: CommitVeto | None,
    environ: WSGIEnvironment,
    response: _HeldResponse,
) -> None:
    """Commit or roll back the handler's work, then release the status; with
    no veto (commit=False) only release it."""
    status, headers = response.status, response.headers
    if status is None:
        # The application never called start_response: the server will fail
        # the request, and there is no status to release.
        return
    stats = environ.get(STATS_KEY)
    if stats is not None and stats._observer.server_timing:
        response.headers = [*headers, ("Server-Timing", stats.server_timing())]
    if commit_veto is not None:
        commit = environ.get(COMMIT_KEY, True) is not False and not commit_veto(
            environ, status, headers
        )
        if commit:
            _commit_current(registry)
        elif _has_session(registry.registry):
            _roll_back(registry.registry())
        response.committed = commit
    response.release()


def _commit_body(registry: scoped_session[t.Any], environ: WSGIEnvironment) -> None:
    """Commit what a streamed body did, after its status went out."""
    try:
        _commit_current(registry)
    except Exception:
        # The status went out long ago: the log is the only witness.
        _log_failure("Committing the work of the response body", environ)
        raise


def _commit_current(registry: scoped_session[t.Any]) -> None:
    """Commit the current session, if there is one (its hooks run then)."""
    if _has_session(registry.registry):
        _commit(registry.registry())


def is_transient(error: BaseException) -> bool:
    """Return whether ``error`` is a database conflict that the same request
    may not meet again: a PostgreSQL serialization failure or deadlock
    (SQLSTATE ``40001``, ``40P01``; psycopg 3 and psycopg2), a MySQL/MariaDB
    deadlock or lock wait timeout (``1213``, ``1205``; PyMySQL, mysqlclient,
    MySQL Connector, MariaDB Connector), SQLite's "database is locked", or a
    connection lost while a statement ran (the server rolled the transaction
    back). A connection lost during ``COMMIT`` is not: whether that commit
    happened is unknown. Nor is a request out of time: a statement cancelled
    (SQLSTATE ``57014``, as a deadline's ``statement_timeout`` does) or a
    :class:`DeadlineExceededError`, even raised while handling a conflict.
    A standby's recovery conflict ("canceling statement due to conflict with
    recovery") is a ``40001`` or ``40P01`` too. A :class:`ReplicaWriteError`
    is transient as well: the middleware sends the retried attempt to the
    primary.
    Exceptions raised *from* such an error, or while one was handled, count
    too; ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` and other
    exceptions that are not :class:`Exception` never do.

    :param error: an exception, usually a
        :class:`sqlalchemy.exc.DBAPIError`.

    .. versionadded:: 0.1
    """
    if not isinstance(error, Exception):
        return False  # a shutdown or a closed generator is never retried
    if _out_of_time(error):
        return False  # the time is gone: a retry would have none
    for current in _chain(error):
        if isinstance(current, ReplicaWriteError):
            return True
        if isinstance(current, DBAPIError) and _lost_before_commit(current):
            return True
        orig = current.orig if isinstance(current, DBAPIError) else current
        if orig is not None and _is_transient_driver_error(orig):
            return True
    return False


def _out_of_time(error: BaseException) -> bool:
    """A transaction refused by a request's deadline, or a statement
    cancelled (SQLSTATE 57014, as the deadline's statement_timeout does),
    anywhere in ``error``'s chain."""
    for current in _chain(error):
        if isinstance(current, DeadlineExceededError):
            return True
        orig = current.orig if isinstance(current, DBAPIError) else current
        if _sqlstate(orig) == _PG_CANCELLED:
            return True
    return False


def _chain(error: BaseException) -> t.Iterator[BaseException]:
    """``error``, then what it was raised from or while handling, as
    traceback walks it (a cycle ends the walk)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _sqlstate(orig: object) -> str | None:
    """The SQLSTATE of a psycopg 3 (``sqlstate``) or psycopg2 (``pgcode``)
    error."""
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _lost_before_commit(error: DBAPIError) -> bool:
    """The connection was lost while a statement ran, not during COMMIT
    (SQLAlchemy gives a failed commit no statement): the server rolled the
    transaction back, so nothing of it happened. A lost COMMIT's outcome is
    unknown."""
    return error.connection_invalidated and error.statement is not None


def _is_transient_driver_error(orig: BaseException) -> bool:
    # By driver family first: MySQL drivers set a SQLSTATE too (HY000 for a
    # lock wait timeout), which must not be read as PostgreSQL's.
    module = type(orig).__module__
    if module.startswith(_MYSQL_DRIVERS):
        number = getattr(orig, "errno", None) or (orig.args[:1] or (None,))[0]
        return number in _MYSQL_TRANSIENT
    if module == "sqlite3":
        return str(orig).startswith("database is locked")
    return _sqlstate(orig) in _PG_TRANSIENT


class _Replay:
    """The request body, recorded as the application reads it so that a
    retried attempt reads the same bytes again, then the rest of the stream.

    Nothing is read ahead: a handler that never reads the body never waits
    for it. Kept in memory up to ``memory`` bytes (``0``: on disk from the
    first byte), and no longer replayable once more than ``limit`` bytes
    were read.
    """

    def __init__(self, stream: t.Any, memory: int, limit: int) -> None:
        self._stream = stream
        self._memory = memory
        self._limit = limit
        self._spool: t.IO[bytes] | None = None
        self._recorded = 0
        self._position = 0
        self.replayable = True
        self.closed = False

    def rewind(self) -> None:
        """Start the body again, for the next attempt."""
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        data, size = self._replayed(size, line=False)
        if size == 0:
            return data
        more = self._stream.read() if size < 0 else self._stream.read(size)
        return data + self._record(more)

    def readline(self, size: int | None = -1) -> bytes:
        data, size = self._replayed(size, line=True)
        if size == 0 or data.endswith(b"\n"):
            return data
        more = self._stream.readline() if size < 0 else self._stream.readline(size)
        return data + self._record(more)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self.readline, b"")

    def close(self) -> None:
        self.closed = True
        if self._spool is not None:
            self._spool.close()

    def _replayed(self, size: int | None, *, line: bool) -> tuple[bytes, int]:
        """What an earlier attempt read and this one has not yet, and how
        much is still wanted from the stream (``-1``: all of it)."""
        size = -1 if size is None or size < 0 else size
        available = self._recorded - self._position
        if available <= 0 or self._spool is None:
            return b"", size
        want = available if size < 0 else min(size, available)
        self._spool.seek(self._position)
        data = self._spool.readline(want) if line else self._spool.read(want)
        self._position += len(data)
        return data, size - len(data) if size >= 0 else size

    def _record(self, data: bytes) -> bytes:
        if self.replayable and data:
            if self._recorded + len(data) > self._limit:
                self.replayable = False  # too much to keep: run this attempt only
                if self._spool is not None:
                    self._spool.close()
                    self._spool = None
            else:
                if self._spool is None:
                    self._spool = (
                        tempfile.SpooledTemporaryFile(max_size=self._memory)
                        if self._memory
                        else tempfile.TemporaryFile()
                    )
                self._spool.seek(self._recorded)
                self._spool.write(data)
                self._recorded += len(data)
        self._position += len(data)
        return data


def _replayable_input(
    environ: WSGIEnvironment, memory: int, limit: int
) -> _Replay | None:
    """Put a :class:`_Replay` of the request body in ``environ["wsgi.input"]``
    and return it; ``None`` when ``CONTENT_LENGTH`` already says the body is
    over ``limit`` (or is not a number), so the request runs once."""
    length = environ.get("CONTENT_LENGTH")
    if length and not (length.isascii() and length.isdigit() and int(length) <= limit):
        return None
    replay = _Replay(environ["wsgi.input"], memory, limit)
    environ["wsgi.input"] = replay
    return replay
