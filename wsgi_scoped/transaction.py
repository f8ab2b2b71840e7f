"""The transaction policy of ``commit=True``: the commit veto, after-commit
hooks, which database errors are worth a retry, and the request body kept so
that a retried request can read it again.
"""

from __future__ import annotations

import io
import tempfile
import typing as t

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session

from .exceptions import _log_failure
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

_HOOKS = "wsgi_scoped.after_commit"
#: Environ key a handler sets to ``False`` to keep its request out of commit=True.
COMMIT_KEY = "wsgi_scoped.commit"

#: SQLSTATEs of PostgreSQL's serialization failure and deadlock.
_PG_TRANSIENT = frozenset({"40001", "40P01"})
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
    """Call ``callback`` once the request that owns ``session`` has
    committed, for work that must not happen for rolled-back data (mail,
    cache purges, queue messages).

    Hooks run in the order they were added, after the middleware's commit
    (``commit=True``). They are dropped when the request rolls back or is
    retried. A hook that raises is logged with the request's path; the other
    hooks still run and the response is unchanged.

    :param session: the request's session, ``db()``.
    :param callback: called with no arguments.

    .. code-block:: python

        after_commit(db(), lambda: mailer.send(welcome))

    .. versionadded:: 0.1
    """
    session.info.setdefault(_HOOKS, []).append(callback)


def _run_hooks(session: Session, environ: WSGIEnvironment) -> None:
    """Run and forget the hooks of a transaction that committed."""
    for hook in session.info.pop(_HOOKS, ()):
        try:
            hook()
        except Exception:
            _log_failure("An after-commit hook", environ)


def _commit(session: Session) -> None:
    """Commit the transaction in progress, if any, without expiring: the
    objects stay loaded for the body, and the session is ended next anyway."""
    if not session.in_transaction():
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
            _commit_current(registry, environ)
        elif _has_session(registry.registry):
            session = registry.registry()
            session.rollback()
            session.info.pop(_HOOKS, None)
        response.committed = commit
    response.release()


def _commit_body(registry: scoped_session[t.Any], environ: WSGIEnvironment) -> None:
    """Commit what a streamed body did, after its status went out."""
    try:
        _commit_current(registry, environ)
    except Exception:
        # The status went out long ago: the log is the only witness.
        _log_failure("Committing the work of the response body", environ)
        raise


def _commit_current(registry: scoped_session[t.Any], environ: WSGIEnvironment) -> None:
    """Commit the current session, if there is one, then run its hooks."""
    if _has_session(registry.registry):
        session = registry.registry()
        _commit(session)
        _run_hooks(session, environ)


def is_transient(error: BaseException) -> bool:
    """Return whether ``error`` is a database conflict that the same request
    may not meet again: a PostgreSQL serialization failure or deadlock
    (SQLSTATE ``40001``, ``40P01``; psycopg 3 and psycopg2), a MySQL/MariaDB
    deadlock or lock wait timeout (``1213``, ``1205``; PyMySQL, mysqlclient,
    MySQL Connector, MariaDB Connector), or SQLite's "database is locked".
    Exceptions raised *from* such an error count too.

    :param error: an exception, usually a
        :class:`sqlalchemy.exc.DBAPIError`.

    .. versionadded:: 0.1
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        orig = current.orig if isinstance(current, DBAPIError) else current
        if orig is not None and _is_transient_driver_error(orig):
            return True
        current = current.__cause__ or current.__context__
    return False


def _is_transient_driver_error(orig: BaseException) -> bool:
    # By driver family first: MySQL drivers set a SQLSTATE too (HY000 for a
    # lock wait timeout), which must not be read as PostgreSQL's.
    module = type(orig).__module__
    if module.startswith(_MYSQL_DRIVERS):
        number = getattr(orig, "errno", None) or (orig.args[:1] or (None,))[0]
        return number in _MYSQL_TRANSIENT
    if module == "sqlite3":
        return str(orig).startswith("database is locked")
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in _PG_TRANSIENT


def _replayable_input(
    environ: WSGIEnvironment, memory: int, limit: int
) -> tuple[t.IO[bytes] | None, bool]:
    """Read the request body once so that every attempt can read it again,
    kept in memory up to ``memory`` bytes and spooled to a temporary file
    beyond, and put it in ``environ["wsgi.input"]``.

    Return the stream put there, which the caller closes when the request
    ends (``None`` if the server's stream was left in place), and whether
    the request can be run again: not when the body is over ``limit``.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length and not (length.isascii() and length.isdigit() and int(length) <= limit):
        return None, False
    spool = tempfile.SpooledTemporaryFile(max_size=memory)
    if length:
        remaining = int(length)
        while remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                break
            spool.write(chunk)
            remaining -= len(chunk)
    elif environ.get("wsgi.input_terminated"):
        # Chunked, without a length: read to the end, or give up past limit.
        while chunk := stream.read(65536):
            spool.write(chunk)
            if spool.tell() > limit:
                spool.seek(0)
                prefixed = io.BufferedReader(_Prefixed(spool, stream))
                environ["wsgi.input"] = prefixed
                return prefixed, False
    spool.seek(0)
    environ["wsgi.input"] = spool
    return t.cast(t.IO[bytes], spool), True


class _Prefixed(io.RawIOBase):
    """A request body whose start was already read into ``head``."""

    def __init__(self, head: t.IO[bytes], rest: t.BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: t.Any) -> int:
        data = self._head.read(len(buffer)) or self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._head.close()
        super().close()
