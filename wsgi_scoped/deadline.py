"""Per-request deadlines (PostgreSQL): each transaction that a request's
session begins gets ``statement_timeout`` set to the time left until the
request's deadline, so a slow statement is cancelled instead of holding the
worker past it.

The middleware stamps the deadline as it receives a request
(:meth:`_Deadline.receive`), makes it current for each attempt (the hook of
:meth:`_Deadline.started`) and forgets it as the request's session is ended
(:func:`_finished`); one ``after_begin`` listener per sessionmaker does the
rest.
"""

from __future__ import annotations

import contextvars
import time
import typing as t

from sqlalchemy import text
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from ._arguments import _check_deadline
from ._arguments import _engine_of
from .exceptions import DeadlineExceededError
from .transaction import _listen_once

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

#: Environ key of the request's deadline, a :class:`_Budget`, from the time
#: the middleware receives the request until its session is ended.
_DEADLINE = "wsgi_scoped.deadline"
_RequestStarted = t.Callable[["WSGIEnvironment", "StartResponse"], "StartResponse"]
#: ``SET LOCAL`` takes no bound parameter; ``set_config(..., true)`` does,
#: and is as local: the transaction's end undoes it.
_SET_TIMEOUT = text("SELECT set_config('statement_timeout', :ms, true)")
#: Milliseconds: 0 would turn the timeout off, and PostgreSQL takes an int.
_SHORTEST = 1
_LONGEST = 2**31 - 1

_NOT_POSTGRESQL = (
    "'deadline' is not yet supported for {backend}: deadlines set"
    " PostgreSQL's statement_timeout. Fix: drop 'deadline', or use a"
    " PostgreSQL database."
)
_NOT_A_SESSIONMAKER = (
    "'deadline' needs a registry whose session factory is a sessionmaker,"
    " got {factory!r}. Create the registry with"
    " scoped_session(sessionmaker(engine))."
)
_NO_TIME_LEFT = (
    "The request's deadline ({seconds:g} s) passed before this transaction"
    " began, so it was not begun. The middleware answers 503 Service"
    " Unavailable with Retry-After."
)

#: The deadline of the request running in this thread or greenlet.
_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "wsgi_scoped_deadline", default=None
)


class _Budget:
    """One request's deadline, on the ``time.monotonic()`` clock, and the
    registry of the layer that stamped it (which ends it)."""

    __slots__ = ("seconds", "at", "owner")

    def __init__(self, seconds: float, owner: scoped_session[t.Any]) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.owner = owner


class _Deadline:
    """A middleware's ``deadline`` option: seconds, or a callable of the
    environ returning seconds or ``None``."""

    def __init__(
        self,
        deadline: float | t.Callable[[WSGIEnvironment], float | None],
        registry: scoped_session[t.Any],
    ) -> None:
        _check_deadline(deadline)
        factory = registry.session_factory
        if not isinstance(factory, sessionmaker):
            raise TypeError(_NOT_A_SESSIONMAKER.format(factory=factory))
        backend = _engine_of(registry, "Deadlines").dialect.name
        if backend != "postgresql":
            raise ValueError(_NOT_POSTGRESQL.format(backend=backend))
        self.deadline = deadline
        self.registry = registry
        _listen_once(factory, "after_begin", _limit)

    def receive(self, environ: WSGIEnvironment) -> None:
        """Stamp the request's deadline: its clock starts now. An outer
        layer's deadline, stamped earlier, is kept."""
        if _DEADLINE in environ:
            return
        seconds: float | None
        if callable(self.deadline):
            seconds = self.deadline(environ)
            if seconds is None:
                return
            _check_deadline(seconds, returned_by=self.deadline)
        else:
            seconds = self.deadline
        environ[_DEADLINE] = _Budget(seconds, self.registry)

    def started(self, inner: _RequestStarted | None) -> _RequestStarted:
        """The per-attempt hook: make the request's deadline current for
        its sessions, then run ``inner`` (the registry's hook), if any."""

        def start(environ: WSGIEnvironment, respond: StartResponse) -> StartResponse:
            _current.set(environ.get(_DEADLINE))
            return respond if inner is None else inner(environ, respond)

        return start


def _finished(registry: scoped_session[t.Any], environ: WSGIEnvironment) -> None:
    """The request's session was ended: forget its deadline, if this
    registry's layer stamped it, so code after the request has none."""
    budget = environ.get(_DEADLINE)
    if budget is not None and budget.owner is registry:
        del environ[_DEADLINE]
        _current.set(None)


def _limit(session: Session, transaction: t.Any, connection: t.Any) -> None:
    """``after_begin``: give the new transaction the time left, or refuse
    to begin it. A savepoint (``begin_nested()``, the pytest plugin's
    session) lives in a transaction that already has its limit."""
    budget = _current.get()
    if budget is None or connection.in_nested_transaction():
        return
    left = budget.at - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(_NO_TIME_LEFT.format(seconds=budget.seconds))
    milliseconds = min(max(_SHORTEST, int(left * 1000)), _LONGEST)
    connection.execute(_SET_TIMEOUT, {"ms": str(milliseconds)})
