"""Read replicas for :class:`Database`: the role (primary or replica) is chosen
once per request, and a client that wrote is sent the primary's WAL position,
so that its next reads go to a replica only once the replica has replayed it.

The middleware knows nothing of roles: it calls the registry's optional
``_request_started(environ, start_response)`` as a request (or a retried
attempt) starts, and ``_request_finished()`` as its session is ended.
"""

from __future__ import annotations

import contextvars
import functools
import random
import re
import time
import typing as t

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy.orm import Session

from ._servers import _position
from ._servers import _replayed
from ._servers import _Server
from ._servers import _within_lag
from .exceptions import PrimaryUnavailableError
from .exceptions import ReplicaWriteError
from .exceptions import WsgiScopedError
from .exceptions import _log_failure
from .middleware import _ATTEMPT
from .transaction import _sqlstate

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

#: Methods that only read (RFC 9110 "safe"), served by a replica.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The response header, and request header, carrying the primary's WAL position.
LSN_HEADER = "X-Wsgi-Scoped-Lsn"
_LSN_ENVIRON = "HTTP_X_WSGI_SCOPED_LSN"
#: The cookie carrying it for browsers.
LSN_COOKIE = "wsgi_scoped_lsn"
#: A pg_lsn as PostgreSQL prints it; anything else a client sends is ignored.
_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
_LSN_IN_COOKIE = re.compile(
    rf"(?:^|[;,]\s*){LSN_COOKIE}=([0-9A-F]{{1,8}}/[0-9A-F]{{1,8}})\s*(?:[;,]|$)"
)
#: Status tags (psycopg's ``cursor.statusmessage``) of statements that write
#: nothing; any other statement on the primary makes a commit a write.
_READS = frozenset(
    {"SELECT", "SHOW", "SET", "RESET", "SAVEPOINT", "RELEASE", "ROLLBACK", "FETCH"}
)
#: Seconds between two looks at a replica's replay position.
_POLL = 0.002

_READ_ONLY = "25006"  # PostgreSQL's read_only_sql_transaction
_WRITE_ON_REPLICA = (
    "This request is served by a read replica, which refuses writes"
    " (SQLSTATE 25006): {error}. Requests with a safe method (GET, HEAD,"
    " OPTIONS) read from a replica. Fix: call db.use_primary() in the handler"
    " before its first query, or send the write with POST, PUT, PATCH or DELETE."
)
_PRIMARY_DOWN = (
    "The primary cannot be reached: {error}. Requests with a safe method are"
    " still served by replicas; this one needs the primary."
)
_TOO_LATE = (
    "db.use_primary() was called after this request's first query, which ran"
    " on a read replica: all statements of a request go to one server. Fix:"
    " call db.use_primary() at the start of the handler, before any query."
)


class _Route:
    """One request's role: decided at its first statement, then kept."""

    __slots__ = ("token", "engine", "primary", "wrote", "committed", "refused")

    def __init__(self, token: str | None, primary: bool) -> None:
        self.token = token
        self.primary = primary
        self.engine: Engine | None = None
        #: A statement that writes ran on the primary (maybe rolled back).
        self.wrote = False
        #: A transaction that wrote has committed: the response gets a token.
        self.committed = False
        #: A replica refused a write (25006): a retried attempt uses the primary.
        self.refused = False


class _Router:
    """Chooses, for each request, the engine every statement goes to."""

    def __init__(
        self,
        primary: Engine,
        replicas: t.Sequence[Engine],
        *,
        wait: float,
        down_for: float,
        max_lag: int | None,
    ) -> None:
        self.primary = primary
        self.wait = wait
        self.max_lag = max_lag
        #: The servers' health in this process (``_servers``).
        self.servers = [_Server(engine, down_for) for engine in (primary, *replicas)]
        #: The route of this router's request in this thread or greenlet;
        #: one variable per router, so two databases route independently.
        self._current: contextvars.ContextVar[_Route | None] = contextvars.ContextVar(
            "wsgi_scoped_route", default=None
        )
        #: Set as an attempt whose write a replica refused ends.
        self._refused: contextvars.ContextVar[bool] = contextvars.ContextVar(
            "wsgi_scoped_refused", default=False
        )
        event.listen(primary, "after_cursor_execute", self._note_write)
        event.listen(primary, "handle_error", self._primary_failed)
        for server in self.servers[1:]:
            failed = functools.partial(self._replica_failed, server)
            event.listen(server.engine, "handle_error", failed)

    def start(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> StartResponse:
        """Give the request a route, and the server's ``start_response``
        wrapped so that a response to a write carries the WAL position."""
        safe = environ.get("REQUEST_METHOD") in SAFE_METHODS
        # The retried attempt of a write a replica refused goes to the primary.
        refused = self._refused.get()
        if refused:
            self._refused.set(False)
        rerun = refused and environ.get(_ATTEMPT, 1) > 1
        route = _Route(_token(environ) if safe else None, not safe or rerun)
        self._current.set(route)

        def respond(
            status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
        ) -> t.Callable[[bytes], object]:
            if route.committed:
                headers = [*headers, *self._position_headers(environ)]
            return start_response(status, headers, exc_info)

        return respond

    def finish(self) -> None:
        route = self._current.get()
        if route is not None and route.refused:
            self._refused.set(True)
        self._current.set(None)

    def engine(self) -> Engine:
        """The current request's engine, chosen at its first statement; the
        primary outside requests."""
        route = self._current.get()
        if route is None:
            return self.primary
        if route.engine is None:
            route.engine = self._choose(route)
        return route.engine

    def use_primary(self) -> None:
        route = self._current.get()
        if route is None:
            return  # outside a request every session uses the primary
        if route.engine is not None and route.engine is not self.primary:
            raise WsgiScopedError(_TOO_LATE)
        route.primary = True

    def _choose(self, route: _Route) -> Engine:
        """The primary for writes; else a replica that is up (within the
        lag limit, reachable), the primary if none is. A replica behind the
        client's position serves it only while the primary is down."""
        if route.primary:
            return self.primary
        now = time.monotonic()
        primary, replicas = self.servers[0], self.servers[1:]
        candidates = [each for each in replicas if each.up(now)]
        if self.max_lag is not None and candidates:
            candidates = _within_lag(primary, candidates, self.max_lag, now)
        random.shuffle(candidates)
        for replica in candidates:
            if not replica.reachable():
                continue
            token = route.token
            if token is None or _replayed(replica.engine, token, self.wait, _POLL):
                return replica.engine
            if primary.up(time.monotonic()) and primary.reachable():
                return self.primary
            return replica.engine  # availability over read-your-writes
        return self.primary

    def _note_write(
        self,
        connection: t.Any,
        cursor: t.Any,
        statement: str,
        parameters: t.Any,
        context: t.Any,
        executemany: bool,
    ) -> None:
        """A statement ran on the primary: note whether it wrote."""
        route = self._current.get()
        if route is not None and not route.wrote:
            tag = getattr(cursor, "statusmessage", None) or ""
            route.wrote = tag.partition(" ")[0] not in _READS

    def _primary_failed(self, context: t.Any) -> BaseException | None:
        """The primary's ``handle_error``: in a request, a failed connect
        becomes :class:`PrimaryUnavailableError`, which answers 503."""
        failed = self.servers[0].connection_failed(context)
        if failed and context.connection is None and self._current.get() is not None:
            error = context.original_exception
            return PrimaryUnavailableError(_PRIMARY_DOWN.format(error=error))
        return None

    def _replica_failed(self, server: _Server, context: t.Any) -> BaseException | None:
        """A replica's ``handle_error``: a failed connection takes it out;
        a write it refused says how to send the request to the primary, and
        a retried attempt of the request goes there."""
        if server.connection_failed(context):
            return None
        error = context.original_exception
        if _sqlstate(error) != _READ_ONLY:
            return None
        route = self._current.get()
        if route is not None:
            route.refused = True
        return ReplicaWriteError(_WRITE_ON_REPLICA.format(error=error))

    def committed(self, session: Session) -> None:
        """The sessionmaker's ``after_commit``: after a write, the response
        will carry the position."""
        route = self._current.get()
        if route is not None and route.wrote:
            route.committed = True

    def _position_headers(self, environ: WSGIEnvironment) -> list[tuple[str, str]]:
        """The primary's WAL position as a header and a cookie; none if it
        cannot be read (the commit stands, so the failure is only logged)."""
        try:
            lsn = _position(self.primary)
        except Exception:
            _log_failure("Reading the primary's WAL position", environ)
            return []
        secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
        cookie = f"{LSN_COOKIE}={lsn}; Path=/; HttpOnly; SameSite=Lax{secure}"
        return [(LSN_HEADER, lsn), ("Set-Cookie", cookie)]


def _token(environ: WSGIEnvironment) -> str | None:
    """The WAL position the client sent back, if it is well-formed."""
    header = environ.get(_LSN_ENVIRON)
    if header is not None:
        return header if _LSN.fullmatch(header) else None
    cookie = environ.get("HTTP_COOKIE")
    if cookie and LSN_COOKIE in cookie:
        found = _LSN_IN_COOKIE.search(cookie)
        if found:
            return found.group(1)
    return None


class _RoutedSession(Session):
    """A Session whose statements all go to its request's server, unless it
    was bound to something else, such as the pytest plugin's connection, or
    a statement names its own (``bind_arguments={"bind": ...}``)."""

    _router: t.ClassVar[_Router]

    def get_bind(self, *args: t.Any, **kwargs: t.Any) -> Engine | Connection:
        if self.bind is not self._router.primary or kwargs.get("bind") is not None:
            return super().get_bind(*args, **kwargs)
        return self._router.engine()


def _routed_class(base: type[Session], router: _Router) -> type[Session]:
    """``base`` (Session or the user's subclass), routing its statements."""
    return type(f"Routed{base.__name__}", (_RoutedSession, base), {"_router": router})
