"""Flask wiring: :func:`init_app` puts a Flask application's ``wsgi_app`` in
a :class:`~wsgi_scoped.ScopedSessionMiddleware`, ends the session of every
rendered response before its body is sent, and ends a session used outside a
request (a CLI command, ``flask shell``) when its application context ends.
"""

from __future__ import annotations

import functools
import typing as t

from flask import Flask
from flask import Response
from flask import appcontext_pushed
from flask import g
from flask import request
from flask import request_finished
from flask import request_started
from sqlalchemy.orm import scoped_session

from .middleware import _RENDERED
from .middleware import ScopedSessionMiddleware
from .middleware import _end
from .middleware import is_active
from .scope import _has_session

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIApplication
    from _typeshed.wsgi import WSGIEnvironment

#: Environ key: Flask finished a response whose body is a list (private).
_SEQUENCE = "wsgi_scoped.flask.sequence"
#: ``g`` attribute: for each registry, who ends a session made in this context.
_OWNERS = "_wsgi_scoped_owners"
#: A session that was registered before the application context was pushed.
_KEPT = object()


def init_app(
    app: Flask, registry: scoped_session[t.Any], **options: t.Any
) -> ScopedSessionMiddleware:
    """Wire ``registry`` into the Flask application ``app``: every request's
    session is ended as :class:`~wsgi_scoped.ScopedSessionMiddleware` does,
    and a response Flask has already rendered ends it before its body is
    sent.

    -   ``app.wsgi_app`` is wrapped in the middleware, with ``options``.
    -   A rendered response (a string, bytes, JSON, a template: a list
        body in werkzeug's terms) is announced to the middleware through
        ``environ["wsgi_scoped.rendered"]``, so its session ends, and its
        connection goes back to the pool, before a slow client gets the
        first byte, in both commit modes. A streamed response (a generator,
        ``stream_with_context``) keeps its session until ``close()``.
    -   A session used outside a request, in a CLI command, ``flask shell``
        or ``with app.app_context()``, is ended (rolled back if not
        committed, closed) when that application context ends. A session
        that was registered before the context was pushed is left alone.

    Call it once per registry, in the application factory if there is one.

    :param app: the :class:`~flask.Flask` application.
    :param registry: a :class:`~wsgi_scoped.Database` or ``scoped_session``.
    :param options: the keyword arguments of
        :class:`~wsgi_scoped.ScopedSessionMiddleware`, such as ``commit``.
    :return: the middleware, now ``app.wsgi_app``.
    :raises TypeError: if ``app`` is not a Flask application, or the
        middleware refuses ``registry`` or an option.

    .. code-block:: python

        db = Database(os.environ["DATABASE_URL"])
        app = Flask(__name__)
        init_app(app, db, commit=True)

    .. versionadded:: 0.1
    """
    if not isinstance(app, Flask):
        raise TypeError(
            f"'app' must be a flask.Flask application, got {type(app).__name__!r}."
            " Call init_app(app, db) with the Flask object itself, before"
            " wrapping its wsgi_app in other middleware."
        )
    middleware = ScopedSessionMiddleware(_announcing(app.wsgi_app), registry, **options)
    app.wsgi_app = middleware  # type: ignore[method-assign]
    request_finished.connect(_note_rendered, app)
    ends = _ContextSessions(registry)
    appcontext_pushed.connect(ends.pushed, app, weak=False)
    request_started.connect(ends.started, app, weak=False)
    app.teardown_appcontext(ends.teardown)
    return middleware


def _announcing(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Flask's ``wsgi_app``, putting the body of a rendered response in
    ``environ["wsgi_scoped.rendered"]`` for the middleware around it."""

    @functools.wraps(wsgi_app)
    def announcing(
        environ: WSGIEnvironment, start_response: StartResponse
    ) -> t.Iterable[bytes]:
        body = wsgi_app(environ, start_response)
        if environ.pop(_SEQUENCE, False):
            environ[_RENDERED] = body
        return body

    return announcing


def _note_rendered(sender: Flask, response: Response, **extra: t.Any) -> None:
    """The final response of a request: a list body is already rendered;
    a generator is not."""
    if response.is_sequence:
        request.environ[_SEQUENCE] = True


class _ContextSessions:
    """Ends the session that code used in an application context that no
    middleware serves, when that context ends."""

    def __init__(self, registry: scoped_session[t.Any]) -> None:
        self.registry = registry

    def pushed(self, sender: Flask, **extra: t.Any) -> None:
        if _has_session(self.registry.registry):
            # Whoever made it ends it: an outer context, a test's fixture.
            g.setdefault(_OWNERS, {})[self.registry] = _KEPT

    def started(self, sender: Flask, **extra: t.Any) -> None:
        g.setdefault(_OWNERS, {})[self.registry] = request.environ

    def teardown(self, error: BaseException | None) -> None:
        # Not popped: a streamed response pushes this context again.
        owner = g.get(_OWNERS, {}).get(self.registry)
        if owner is _KEPT or (owner is not None and is_active(owner, self.registry)):
            return  # the middleware ends it when the response ends
        _end(self.registry, {}, ())  # outside a request: no environ to restore
