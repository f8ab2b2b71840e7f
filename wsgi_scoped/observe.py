"""Per-request database statistics, Server-Timing, warnings about costly or
lossy requests, and request tags in SQL comments. Nothing here is installed
unless a middleware asks for it: with statistics off there is no listener.
"""

from __future__ import annotations

import logging
import re
import time
import typing as t
import weakref

from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session

from ._arguments import _engine_of
from .exceptions import _log_request
from .exceptions import logger as logger  # where its warnings go
from .scope import get_ident

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

#: Environ key of the request's :class:`RequestStats`.
STATS_KEY = "wsgi_scoped.stats"

#: The statistics of the requests running now, by greenlet or thread.
_current: dict[t.Hashable, RequestStats] = {}
#: Engines and sessionmakers whose listeners are installed.
_observed: weakref.WeakSet[t.Any] = weakref.WeakSet()

_WRITES = ("INSERT", "UPDATE", "DELETE", "insert", "update", "delete")
# Kept in a tag: ASCII that neither ends the comment nor reads as a
# placeholder to any driver (%s, %(x)s, ?, :x, :1, $1).
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./;=&@~+, ]")
#: The server that served a request: :attr:`RequestStats.role`.
_Role = t.Literal["primary", "replica"]
#: A role as the warnings say it.
_ON: dict[_Role | None, str] = {
    None: "",
    "primary": " on the primary",
    "replica": " on a replica",
}


class RequestStats:
    """What one request did with the database, in
    ``environ["wsgi_scoped.stats"]`` while and after it runs (``stats=True``).

    Times are in seconds; ``db_time`` is the time spent executing statements,
    ``checkout_wait`` the time spent getting a connection from the pool, and
    ``connection_held`` the time a connection was checked out by the request.
    With read replicas, ``role`` says which server the request's session used.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "statements",
        "db_time",
        "checkout_wait",
        "connection_held",
        "tag",
        "role",
        "_wrote",
        "_checked_out_at",
        "_executing_since",
        "_asked_at",
        "_observer",
    )

    def __init__(self, tag: str = "", observer: _Observer | None = None) -> None:
        #: Statements executed.
        self.statements = 0
        #: Seconds spent executing statements.
        self.db_time = 0.0
        #: Seconds spent waiting for a pooled connection.
        self.checkout_wait = 0.0
        #: Seconds a connection was checked out for the request.
        self.connection_held = 0.0
        #: The SQL comment tag, if tracing is on.
        self.tag = tag
        #: ``"primary"`` or ``"replica"``: the server of the request's session
        #: (:class:`Database` with ``replicas``); ``None`` without replicas or
        #: before the session's first statement.
        self.role: _Role | None = None
        #: A statement that writes ran in the transaction in progress.
        self._wrote = False
        self._checked_out_at = 0.0
        self._executing_since = 0.0
        self._asked_at = 0.0
        self._observer = observer

    def server_timing(self) -> str:
        """The ``Server-Timing`` value: time in the database and the number
        of statements, never SQL; and the role of the server, if known."""
        timing = (
            f'db;dur={self.db_time * 1000:.1f};desc="{self.statements} queries",'
            f" db-wait;dur={self.checkout_wait * 1000:.1f}"
        )
        if self.role is not None:
            timing += f", db-role;desc={self.role}"
        return timing

    def __repr__(self) -> str:
        return (
            f"<RequestStats statements={self.statements}"
            f" db_time={self.db_time:.4f} checkout_wait={self.checkout_wait:.4f}"
            f" connection_held={self.connection_held:.4f} role={self.role!r}>"
        )


class _Observer:
    """Per-middleware settings; the listeners live on the engine, once."""

    def __init__(
        self,
        registry: scoped_session[t.Any],
        *,
        commit: bool,
        server_timing: bool,
        warn_statements: int | None,
        warn_db_time: float | None,
        trace: bool | str,
    ) -> None:
        engine = _engine_of(registry, "Statistics")
        self.registry = registry
        #: The engines of a Database's replicas: the request's role.
        self.replicas: tuple[Engine, ...] = getattr(registry, "replicas", ())
        self.commit = commit
        self.server_timing = server_timing
        self.warn_statements = warn_statements
        self.warn_db_time = warn_db_time
        self.trace = trace
        _install((engine, *self.replicas), registry.session_factory)

    def start(self, environ: WSGIEnvironment) -> RequestStats:
        tag = _tag(environ, self.trace) if self.trace else ""
        stats = RequestStats(tag, self)
        environ[STATS_KEY] = stats
        _current[get_ident()] = stats
        return stats

    def before_end(
        self, stats: RequestStats, session: Session, environ: WSGIEnvironment
    ) -> None:
        """Warn about work that closing the session is about to roll back."""
        if self.commit:
            return  # rolled back on purpose: the request failed or was vetoed
        if session.new or session.dirty or session.deleted or stats._wrote:
            _log_request(
                logging.WARNING,
                "Uncommitted changes rolled back at the end of %s %s: commit them"
                " in the handler, or use commit=True",
                environ,
            )

    def finish(self, stats: RequestStats, environ: WSGIEnvironment) -> None:
        _current.pop(get_ident(), None)
        if self.warn_statements is not None and stats.statements > self.warn_statements:
            _log_request(
                logging.WARNING,
                "%s %s ran %d SQL statements%s (the limit is %d): an N+1 query?",
                environ,
                stats.statements,
                _ON[stats.role],
                self.warn_statements,
            )
        if self.warn_db_time is not None and stats.db_time > self.warn_db_time:
            _log_request(
                logging.WARNING,
                "%s %s spent %.3f s in the database%s (the limit is %.3f s)",
                environ,
                stats.db_time,
                _ON[stats.role],
                self.warn_db_time,
            )


def _tag(environ: WSGIEnvironment, trace: bool | str) -> str:
    """The request's tag for SQL comments: a request id header, or the
    method and path, stripped of anything that could end a comment."""
    value = ""
    if isinstance(trace, str):
        value = environ.get("HTTP_" + trace.upper().replace("-", "_"), "")
    if not value:
        value = f"{environ.get('REQUEST_METHOD', '')} {environ.get('PATH_INFO', '')}"
    return _UNSAFE.sub("", value)[:200]


def _install(engines: t.Iterable[Engine], sessions: t.Any) -> None:
    """Listen to the ``engines`` (a primary and its replicas), their pools
    and the registry's sessionmaker, once each: the listeners find the
    request by greenlet or thread."""
    for engine in engines:
        if engine in _observed:
            continue
        _observed.add(engine)
        event.listen(engine, "before_cursor_execute", _before, retval=True)
        event.listen(engine, "after_cursor_execute", _after)
        event.listen(engine, "handle_error", _error)
        event.listen(engine, "commit", _transaction_ended)
        event.listen(engine, "rollback", _transaction_ended)
        event.listen(engine.pool, "checkout", _checkout)
        event.listen(engine.pool, "checkin", _checkin)
    if sessions not in _observed:
        _observed.add(sessions)
        event.listen(sessions, "after_transaction_create", _asking)
        event.listen(sessions, "after_begin", _connected)


def _before(
    conn: t.Any,
    cursor: t.Any,
    statement: str,
    parameters: t.Any,
    context: t.Any,
    executemany: bool,
) -> tuple[str, t.Any]:
    stats = _current.get(get_ident())
    if stats is not None:
        stats.statements += 1
        if statement.startswith(_WRITES):
            stats._wrote = True
        stats._executing_since = time.perf_counter()
        if stats.tag:  # only when this request's middleware traces
            statement = f"{statement} /* {stats.tag} */"
    return statement, parameters


def _after(conn: t.Any, *args: t.Any) -> None:
    stats = _current.get(get_ident())
    if stats is not None and stats._executing_since:
        stats.db_time += time.perf_counter() - stats._executing_since
        stats._executing_since = 0.0


def _error(context: t.Any) -> None:
    _after(None)


def _transaction_ended(conn: t.Any) -> None:
    stats = _current.get(get_ident())
    if stats is not None:
        stats._wrote = False


def _asking(session: Session, transaction: t.Any) -> None:
    """A session's transaction starts before it asks the pool."""
    stats = _current.get(get_ident())
    if stats is not None and transaction.parent is None:
        stats._asked_at = time.perf_counter()


def _connected(session: Session, transaction: t.Any, connection: t.Any) -> None:
    """A session's transaction has its connection: the wait ends, and the
    connection's engine is the request's role."""
    stats = _current.get(get_ident())
    if stats is not None and stats._asked_at:
        stats.checkout_wait += time.perf_counter() - stats._asked_at
        stats._asked_at = 0.0
    if stats is not None and stats._observer and stats._observer.replicas:
        replicas = stats._observer.replicas
        stats.role = "replica" if connection.engine in replicas else "primary"


def _checkout(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
    stats = _current.get(get_ident())
    if stats is not None:
        stats._checked_out_at = time.perf_counter()


def _checkin(dbapi_connection: t.Any, record: t.Any) -> None:
    stats = _current.get(get_ident())
    if stats is not None and stats._checked_out_at:
        stats.connection_held += time.perf_counter() - stats._checked_out_at
        stats._checked_out_at = 0.0
