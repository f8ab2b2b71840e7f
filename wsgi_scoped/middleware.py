"""The WSGI middleware that gives each request one SQLAlchemy session and
ends it, exactly once, when the response ends.
"""

from __future__ import annotations

import functools
import itertools
import random
import reprlib
import sys
import time
import typing as t
import warnings

from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session

from ._arguments import _check_arguments
from ._arguments import _check_nesting
from ._arguments import _check_observing
from ._arguments import _check_options
from ._arguments import _describe
from ._arguments import _engine_of
from .deadline import _Deadline
from .deadline import _finished as _deadline_finished
from .exceptions import PrimaryUnavailableError
from .exceptions import WsgiScopedWarning
from .exceptions import _log_failure
from .observe import STATS_KEY
from .observe import _Observer
from .scope import _check_concurrency
from .scope import _has_session
from .transaction import CommitVeto
from .transaction import _commit_body
from .transaction import _finish_handler
from .transaction import _guard_commits
from .transaction import _HeldResponse
from .transaction import _out_of_time
from .transaction import _Replay
from .transaction import _replayable_input
from .transaction import _roll_back
from .transaction import default_commit_veto
from .transaction import is_transient

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

#: Environ key holding the registries whose sessions an outer layer manages.
_ACTIVE = "wsgi_scoped.active"
_Registries = tuple["scoped_session[t.Any]", ...]
_RequestStarted = t.Callable[["WSGIEnvironment", "StartResponse"], "StartResponse"]
#: Environ key holding the attempt number (1, 2, ...) under commit=True.
_ATTEMPT = "wsgi_scoped.attempt"
#: Environ key of a session a test hands to the request; the test owns it.
_SESSION = "wsgi_scoped.session"
#: Environ key holding the layers that own the registries in ``_ACTIVE``.
_LAYERS = "wsgi_scoped.layers"
#: Environ key of a lazy body that its application declares already rendered.
_RENDERED = "wsgi_scoped.rendered"

_UNUSABLE = (
    "The application {app!r} returned {body}, which is not a response body:"
    " a WSGI application must return an iterable of bytes (PEP 3333), such as"
    " [b'Hello'] or a generator of bytes. Nothing was committed."
)
#: The answers to a request that found the connection pool exhausted, and
#: to one that ran out of time (``deadline``): 503 with Retry-After.
_EXHAUSTED = b"Service Unavailable: no database connection is free. Retry later.\n"
_OUT_OF_TIME = b"Service Unavailable: the request ran out of time. Retry later.\n"
#: The answer to a request that needed an unreachable primary.
_PRIMARY_DOWN = b"Service Unavailable: the database primary cannot be reached.\n"

_STALE = (
    "A session was still registered for this thread or greenlet when a request"
    " started. Either something upstream of ScopedSessionMiddleware did not"
    " call close() on the previous response body (PEP 3333 requires it; check"
    " the server and any middleware outside this one), or code outside a"
    " request used the registry without calling remove() afterwards. The stale"
    " session was closed and its transaction rolled back. Fix: close response"
    " bodies, and call registry.remove() after using the session outside a"
    " request."
)


def is_active(
    environ: WSGIEnvironment, registry: scoped_session[t.Any] | None = None
) -> bool:
    """Return whether a :class:`ScopedSessionMiddleware` manages the session of
    this request, for ``registry`` if one is given.

    :param environ: the request's WSGI environ.
    :param registry: the registry to ask about; ``None`` asks about any.

    .. versionadded:: 0.1
    """
    active = environ.get(_ACTIVE)
    if not active:
        return False
    return registry is None or registry in active


class ScopedSessionMiddleware:
    """Wrap a WSGI application so that every request gets one session from
    ``registry``, ended (rolled back if still open, closed, its connection
    back in the pool) when the response ends, on every path.

    -   A list, tuple or ``wsgi.file_wrapper`` body is already produced, as
        is a body the application put in ``environ["wsgi_scoped.rendered"]``
        (as :func:`wsgi_scoped.flask.init_app` does): the session is ended
        before this middleware returns, so the connection is free before the
        first byte goes to a slow client. The body is returned unchanged.
    -   Any other body is produced lazily: the session stays current while
        the server iterates it, and is ended in ``close()``, after the
        body's own ``close()``.
    -   If the application or the body raises, the session is ended and the
        original exception propagates; a failure to end the session is then
        logged, not raised in its place.
    -   Wrapping the same registry twice is safe: inner layers pass through.

    :param app: the WSGI application to wrap.
    :param registry: a :class:`~sqlalchemy.orm.scoped_session`, or a
        :class:`Database`, whose session code calls during the request.
    :param commit: commit each request's transaction before its status line
        is sent, unless it failed or ``commit_veto`` says abort; ``False``
        leaves commits to the handlers and rolls back the rest.
    :param commit_veto: ``(environ, status, headers) -> bool``, ``True`` to
        abort; ``None`` means :func:`default_commit_veto`. Needs ``commit``.
    :param retries: how many more times to run a request whose transaction
        failed with a transient error (:func:`is_transient`) before anything
        was sent. Needs ``commit``.
    :param replay_memory: bytes of a request body kept in memory for a
        retry; larger bodies are spooled to a temporary file.
    :param replay_limit: bytes of a request body above which the request is
        not retried.
    :param retry_backoff: seconds; before attempt *n + 1* the middleware
        sleeps a random time up to ``retry_backoff * 2 ** (n - 1)``.
    :param stats: put a :class:`RequestStats` in
        ``environ["wsgi_scoped.stats"]``; off, no listener is installed.
    :param server_timing: add a ``Server-Timing`` header (database time and
        statement count) before the status line goes out.
    :param warn_statements: log requests that run more statements than this.
    :param warn_db_time: log requests that spend more seconds than this in
        the database.
    :param trace: tag every statement with a SQL comment naming the request
        (method and path), or with the value of the request header named
        here, such as ``"X-Request-Id"``.
    :param deadline: seconds a request may take, counted from the moment
        this middleware receives it, or a callable taking the environ and
        returning such seconds (``None``: no deadline for that request).
        Each transaction of the request's session gets PostgreSQL's
        ``statement_timeout`` set to the time left; a statement it cancels,
        or a transaction begun with no time left, answers 503 and is never
        retried. ``None`` (the default) costs nothing. PostgreSQL only.
    :raises TypeError: if ``app`` is not callable, ``registry`` is not a
        ``scoped_session``, or an option has the wrong type.
    :raises ValueError: if an option is out of range, or needs ``commit``,
        or ``deadline`` is given for a database other than PostgreSQL.

    .. code-block:: python

        Session = scoped_session(sessionmaker(engine))
        app = ScopedSessionMiddleware(app, Session, commit=True, retries=2)

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        app: WSGIApplication,
        registry: scoped_session[t.Any],
        *,
        commit: bool = False,
        commit_veto: CommitVeto | None = None,
        retries: int = 0,
        replay_memory: int = 1024 * 1024,
        replay_limit: int = 16 * 1024 * 1024,
        retry_backoff: float = 0.05,
        stats: bool = False,
        server_timing: bool = False,
        warn_statements: int | None = None,
        warn_db_time: float | None = None,
        trace: bool | str = False,
        deadline: float | t.Callable[[WSGIEnvironment], float | None] | None = None,
    ) -> None:
        _check_arguments(app, registry)
        _check_options(
            commit, commit_veto, retries, replay_memory, replay_limit, retry_backoff
        )
        _check_observing(stats, server_timing, warn_statements, warn_db_time, trace)
        self.app = app
        self.registry = registry
        self.commit = commit
        self.commit_veto = commit_veto or default_commit_veto
        self.retries = retries
        self.replay_memory = replay_memory
        self.replay_limit = replay_limit
        self.retry_backoff = retry_backoff
        self._observer: _Observer | None = None
        warns = warn_statements is not None or warn_db_time is not None
        if stats or server_timing or warns or trace:
            self._observer = _Observer(
                registry,
                commit=commit,
                server_timing=server_timing,
                warn_statements=warn_statements,
                warn_db_time=warn_db_time,
                trace=trace,
            )
        #: What an outer layer must share for this one to pass through.
        self._policy = (
            commit,
            commit_veto,
            retries,
            stats,
            server_timing,
            warn_statements,
            warn_db_time,
            trace,
            deadline,
        )
        # Server-Timing must be in the headers before they go out.
        self._hold = commit or server_timing
        self._concurrency_checked = False
        _guard_commits(registry.session_factory)
        #: A registry's optional per-request hook, such as Database's with
        #: replicas; ``_end()`` calls its ``_request_finished()``. With a
        #: deadline, the deadline's hook runs first.
        self._started: _RequestStarted | None = getattr(
            registry, "_request_started", None
        )
        self._deadline: _Deadline | None = None
        if deadline is not None:
            self._deadline = _Deadline(deadline, registry)
            self._started = self._deadline.started(self._started)

    def __repr__(self) -> str:
        return f"<ScopedSessionMiddleware({self.app!r}{_describe(self._policy)})>"

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> t.Iterable[bytes]:
        registry = self.registry
        if not self._concurrency_checked:
            self._concurrency_checked = True  # once is enough, and racing is harmless
            _check_concurrency(registry.registry)
        outer = environ.get(_ACTIVE, ())
        if registry in outer:
            # An outer layer owns this request's session and will end it.
            layers = environ.get(_LAYERS, ())
            position = outer.index(registry)
            _check_nesting(self, layers[position] if position < len(layers) else None)
            return self.app(environ, start_response)
        injected = environ.get(_SESSION)
        if _has_session(registry.registry) and registry.registry() is not injected:
            _end_quietly(registry, environ, outer)
            warnings.warn(_STALE, WsgiScopedWarning, stacklevel=2)
        if injected is not None:
            registry.registry.set(injected)
        if self._deadline is not None:
            self._deadline.receive(environ)
        environ[_ACTIVE] = (*outer, registry)
        environ[_LAYERS] = (*environ.get(_LAYERS, ())[: len(outer)], self)
        if self._hold:
            return self._transaction(environ, start_response, outer)
        if self._observer is not None:
            self._observer.start(environ)
        if self._started is not None:
            start_response = self._started(environ, start_response)

        try:
            body = self.app(environ, start_response)
            materialized = _is_materialized(body, environ, self.app)
        except BaseException as error:
            _end_quietly(registry, environ, outer)
            if self._unavailable(error):
                return _answer_unavailable(registry, environ, start_response, error)
            raise
        if materialized:
            _end_materialized(registry, environ, outer, body)
            return body
        return _ScopedBody(body, registry, environ, outer)

    def _transaction(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        outer: _Registries,
    ) -> t.Iterable[bytes]:
        """Run the request with its status line held (``commit=True`` or
        ``server_timing``), again on transient errors."""
        veto = self.commit_veto if self.commit else None
        attempts, replay = 1, None
        if self.retries:
            replay = _replayable_input(environ, self.replay_memory, self.replay_limit)
        if replay is not None:
            attempts += self.retries
            pristine = dict(environ)
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                limit = self.retry_backoff * 2 ** (attempt - 2)
                time.sleep(random.uniform(0, limit))
                # Frameworks cache parsed requests in environ: start afresh.
                environ.clear()
                environ.update(pristine)
                replay.rewind()  # type: ignore[union-attr]
            environ[_ATTEMPT] = attempt
            if self._observer is not None:
                self._observer.start(environ)
            finish = functools.partial(_finish_handler, self.registry, veto, environ)
            server_start = start_response
            if self._started is not None:
                server_start = self._started(environ, start_response)
            response = _HeldResponse(server_start, finish)
            try:
                return self._attempt(environ, response, outer, replay)
            except BaseException as error:
                if (
                    attempt == attempts
                    or response.released
                    or not replay.replayable  # type: ignore[union-attr]
                    or not is_transient(error)
                ):
                    if replay is not None:
                        replay.close()
                    if not response.released and self._unavailable(error):
                        return _answer_unavailable(
                            self.registry, environ, start_response, error
                        )
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` is answered 503 (if nothing was sent yet): the
        pool was exhausted, a replicated Database's primary cannot be
        reached, or, with a deadline, the request ran out of time."""
        if isinstance(error, (PoolTimeout, PrimaryUnavailableError)):
            return True
        return self._deadline is not None and _out_of_time(error)

    def _attempt(
        self,
        environ: WSGIEnvironment,
        response: _HeldResponse,
        outer: _Registries,
        replay: _Replay | None,
    ) -> t.Iterable[bytes]:
        """One run of the application: its work is committed, or rolled
        back, before the status line is released to the server."""
        registry = self.registry
        body: t.Iterable[bytes] | None = None
        try:
            body = self.app(environ, response)
            materialized = _is_materialized(body, environ, self.app)
            chunks: t.Iterator[bytes] | None = None
            if not materialized and response.status is None:
                # An iterable that calls start_response when first iterated.
                iterator = iter(body)
                chunks = itertools.chain(tuple(itertools.islice(iterator, 1)), iterator)
            if not response.released:
                response.finish(response)
        except BaseException:
            if body is not None:
                _close_quietly(body, environ)
            _end_quietly(registry, environ, outer)
            raise
        if materialized:
            _end_materialized(registry, environ, outer, body)
            if replay is not None:
                replay.close()
            return body
        return _ScopedBody(
            body, registry, environ, outer, chunks, replay, commit=response.committed
        )


class _ScopedBody:
    """A lazy body: iterated as it is, ending the session in ``close()``.
    Under commit=True, work done while it was produced is committed there if
    the request committed and the body was produced to its end."""

    __slots__ = (
        "_body",
        "_registry",
        "_environ",
        "_outer",
        "_chunks",
        "_replay",
        "_closed",
        "_done",
        "_commit",
    )

    def __init__(
        self,
        body: t.Iterable[bytes],
        registry: scoped_session[t.Any],
        environ: WSGIEnvironment,
        outer: _Registries,
        chunks: t.Iterator[bytes] | None = None,
        replay: _Replay | None = None,
        *,
        commit: bool = False,
    ) -> None:
        self._body = body
        self._registry = registry
        self._environ = environ
        self._outer = outer
        self._chunks = chunks
        self._replay = replay
        self._closed = False
        self._done = False
        self._commit = commit

    def __iter__(self) -> t.Iterator[bytes]:
        # The server iterates the body itself: no Python work per chunk.
        if not self._commit:
            return self._chunks or iter(self._body)
        return itertools.chain(self._chunks or self._body, self._finished())

    def _finished(self) -> t.Iterator[bytes]:
        """Reached only when the body was produced to its end."""
        self._done = True
        yield from ()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
            if self._done:
                _commit_body(self._registry, self._environ)
        except BaseException:
            _end_quietly(self._registry, self._environ, self._outer)
            raise
        finally:
            if self._replay is not None:
                self._replay.close()
        _end(self._registry, self._environ, self._outer)


def _is_materialized(
    body: t.Iterable[bytes], environ: WSGIEnvironment, app: WSGIApplication
) -> bool:
    """A list, tuple or the server's file wrapper, or the very body that the
    application declared rendered: nothing left for the session to produce.
    Refuse what is no body at all, before any commit."""
    if type(body) is list or type(body) is tuple:
        return True
    wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(wrapper, type) and isinstance(body, wrapper):
        return True
    if body is None or isinstance(body, (str, bytes)) or not hasattr(body, "__iter__"):
        raise TypeError(_UNUSABLE.format(app=app, body=reprlib.repr(body)))
    # By identity: a layer in between that wraps the body voids the claim.
    return environ.get(_RENDERED) is body


def _answer_unavailable(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    start_response: StartResponse,
    error: BaseException,
) -> list[bytes]:
    """Answer 503 with Retry-After to a request that found the pool
    exhausted (logged with the pool's figures), the primary unreachable, or
    ran out of time."""
    if isinstance(error, PoolTimeout):
        try:
            figures = _engine_of(registry, "").pool.status()
        except TypeError:
            figures = "the registry is not bound to one engine"
        what, body = f"Getting a pooled connection ({figures})", _EXHAUSTED
    elif isinstance(error, PrimaryUnavailableError):
        what, body = "Connecting to the primary", _PRIMARY_DOWN
    else:
        what, body = "Finishing the request before its deadline", _OUT_OF_TIME
    _log_failure(what, environ)
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Retry-After", "1"),
    ]
    start_response("503 Service Unavailable", headers, sys.exc_info())
    return [body]


def _end_materialized(
    registry: scoped_session[t.Any],
    environ: WSGIEnvironment,
    outer: _Registries,
    body: t.Iterable[bytes],
) -> None:
    """End the session before returning a body; close the body if that
    fails, since the server will never see it."""
    try:
        _end(registry, environ, outer)
    except BaseException:
        _close_quietly(body, environ)
        raise


def _end(
    registry: scoped_session[t.Any], environ: WSGIEnvironment, outer: _Registries
) -> None:
    """Close the current session and clear the registry, even if
    ``Session.close()`` raised (``scoped_session.remove()`` would not).

    This is the only place a request's session is ended. The nesting marker
    goes back to what it was, so an environ used again is a new request.
    """
    if outer:
        environ[_ACTIVE] = outer
        environ[_LAYERS] = environ.get(_LAYERS, ())[: len(outer)]
    else:
        environ.pop(_ACTIVE, None)
        environ.pop(_LAYERS, None)
    stats = environ.get(STATS_KEY)
    if stats is not None and stats._observer.registry is not registry:
        stats = None  # another layer's
    sessions = registry.registry
    try:
        if _has_session(sessions):
            session: Session = sessions()
            if session is environ.get(_SESSION):
                # The test owns it: undo only what the request left uncommitted.
                _roll_back(session)
                return
            if stats is not None:
                stats._observer.before_end(stats, session, environ)
            try:
                session.close()
            finally:
                sessions.clear()
    finally:
        finished = getattr(registry, "_request_finished", None)
        if finished is not None:
            finished()
        _deadline_finished(registry, environ)
        if stats is not None:
            stats._observer.finish(stats, environ)


def _end_quietly(
    registry: scoped_session[t.Any], environ: WSGIEnvironment, outer: _Registries
) -> None:
    """End the session while another exception is in flight: a failure here
    is logged, so that the original exception is the one that propagates.
    """
    try:
        _end(registry, environ, outer)
    except Exception:
        _log_failure("Ending the session", environ)


def _close_quietly(body: t.Iterable[bytes], environ: WSGIEnvironment) -> None:
    """Close a body the server will never see, so its file is not leaked."""
    close = getattr(body, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            _log_failure("Closing the response body", environ)
