"""The WSGI middleware that gives each request one SQLAlchemy session and
ends it, exactly once, when the response ends.
"""

from __future__ import annotations

import logging
import typing as t
import warnings

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from .exceptions import WsgiScopedWarning

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

#: Environ key holding the registries whose sessions an outer layer manages.
_ACTIVE = "wsgi_scoped.active"
_Registries = tuple["scoped_session[t.Any]", ...]

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

    -   A list, tuple or ``wsgi.file_wrapper`` body is already produced: the
        session is ended before this middleware returns, so the connection
        is free before the first byte goes to a slow client. The body is
        returned unchanged.
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
    :raises TypeError: if ``app`` is not callable or ``registry`` is not a
        ``scoped_session``.

    .. code-block:: python

        Session = scoped_session(sessionmaker(engine))
        app = ScopedSessionMiddleware(app, Session)

    .. versionadded:: 0.1
    """

    def __init__(self, app: WSGIApplication, registry: scoped_session[t.Any]) -> None:
        _check_arguments(app, registry)
        self.app = app
        self.registry = registry

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> t.Iterable[bytes]:
        registry = self.registry
        outer = environ.get(_ACTIVE, ())
        if registry in outer:
            # An outer layer owns this request's session and will end it.
            return self.app(environ, start_response)
        if registry.registry.has():
            _end_quietly(registry, environ, outer)
            warnings.warn(_STALE, WsgiScopedWarning, stacklevel=2)
        environ[_ACTIVE] = (*outer, registry)

        try:
            body = self.app(environ, start_response)
        except BaseException:
            _end_quietly(registry, environ, outer)
            raise

        if type(body) is list or type(body) is tuple or _is_file(body, environ):
            try:
                _end(registry, environ, outer)
            except BaseException:
                _close_quietly(body, environ)
                raise
            return body
        return _ScopedBody(body, registry, environ, outer)


class _ScopedBody:
    """A lazy body: iterated as it is, ending the session in ``close()``."""

    __slots__ = ("_body", "_registry", "_environ", "_outer", "_closed")

    def __init__(
        self,
        body: t.Iterable[bytes],
        registry: scoped_session[t.Any],
        environ: WSGIEnvironment,
        outer: _Registries,
    ) -> None:
        self._body = body
        self._registry = registry
        self._environ = environ
        self._outer = outer
        self._closed = False

    def __iter__(self) -> t.Iterator[bytes]:
        # The server iterates the body itself: no Python work per chunk.
        return iter(self._body)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._body, "close", None)
        if close is not None:
            try:
                close()
            except BaseException:
                _end_quietly(self._registry, self._environ, self._outer)
                raise
        _end(self._registry, self._environ, self._outer)


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
    else:
        environ.pop(_ACTIVE, None)
    sessions = registry.registry
    if sessions.has():
        try:
            sessions().close()
        finally:
            sessions.clear()


def _end_quietly(
    registry: scoped_session[t.Any], environ: WSGIEnvironment, outer: _Registries
) -> None:
    """End the session while another exception is in flight: a failure here
    is logged, so that the original exception is the one that propagates.
    """
    try:
        _end(registry, environ, outer)
    except Exception:
        logger.error(
            "Ending the session failed for %s %s",
            environ.get("REQUEST_METHOD"),
            environ.get("PATH_INFO"),
            exc_info=True,
        )


def _close_quietly(body: t.Iterable[bytes], environ: WSGIEnvironment) -> None:
    """Close a body the server will never see, so its file is not leaked."""
    close = getattr(body, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            logger.error(
                "Closing the response body failed for %s %s",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
                exc_info=True,
            )


def _is_file(body: t.Iterable[bytes], environ: WSGIEnvironment) -> bool:
    """Whether ``body`` is the server's ``wsgi.file_wrapper``, whose bytes
    come from a file, not from the session."""
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


def _check_arguments(app: object, registry: object) -> None:
    if isinstance(app, scoped_session):
        raise TypeError(
            "'app' is a scoped_session: the arguments are swapped."
            " Use ScopedSessionMiddleware(app, registry)."
        )
    if not callable(app):
        raise TypeError(
            "'app' must be a WSGI application (a callable taking environ and"
            f" start_response), got {type(app).__name__!r}."
        )
    if isinstance(registry, scoped_session):
        return
    expected = (
        "'registry' must be a sqlalchemy.orm.scoped_session or a"
        f" wsgi_scoped.Database, got {type(registry).__name__!r}."
    )
    if isinstance(registry, sessionmaker):
        raise TypeError(f"{expected} Wrap it: scoped_session(sessionmaker(...)).")
    if isinstance(registry, Session):
        raise TypeError(
            f"{expected} One Session would be shared by every request; pass"
            " scoped_session(sessionmaker(...)) instead."
        )
    raise TypeError(f"{expected} Create one with scoped_session(sessionmaker(engine)).")
