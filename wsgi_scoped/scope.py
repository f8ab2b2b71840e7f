"""The default scope of a request's session: the current greenlet, which is
the current thread's main greenlet outside gevent/eventlet.
"""

from __future__ import annotations

import sys
import typing as t
import warnings

from sqlalchemy.util import ThreadLocalRegistry

from .exceptions import WsgiScopedWarning

try:
    from greenlet import getcurrent as _current
except ImportError:  # pragma: no cover - greenlet is optional since SQLAlchemy 2.1
    from threading import get_ident as _current  # type: ignore[assignment]


def get_ident() -> t.Hashable:
    """Return the key of the current greenlet, or of the current thread when
    greenlet is not installed.

    Every thread runs in a main greenlet of its own, so one key serves
    threaded servers, gevent and eventlet workers (monkey-patched or not) and
    greenlets switched by hand inside one thread. Use it as the ``scopefunc``
    of a plain :class:`~sqlalchemy.orm.scoped_session`; :class:`Database`
    uses it by default.

    A registry keeps a key until ``remove()`` runs in that scope: ending each
    request's session exactly once is what keeps the registry, and memory,
    flat.

    .. code-block:: python

        Session = scoped_session(sessionmaker(engine), scopefunc=get_ident)

    .. versionadded:: 0.1
    """
    return _current()


def _has_session(sessions: t.Any) -> bool:
    """``sessions.has()`` for a registry's ``registry`` attribute, without the
    AttributeError that ThreadLocalRegistry.has() raises and swallows when
    the thread has no session: half a microsecond, twice on every request.
    """
    if type(sessions) is ThreadLocalRegistry:
        return "value" in sessions.registry.__dict__
    return bool(sessions.has())


_SHARED = (
    "This request runs in a greenlet, but the registry keeps its session in a"
    " threading.local that is not greenlet-local: every greenlet of this thread"
    " would share one session. This happens when the scoped_session was made"
    " before gevent/eventlet monkey-patched threading (gunicorn --preload), or"
    " without patching. Fix: scoped_session(..., scopefunc=wsgi_scoped.get_ident),"
    " or wsgi_scoped.Database, which keys sessions by greenlet."
)
_PSYCOPG2 = (
    "psycopg2 is used under gevent without a wait callback: every query blocks"
    " the whole worker process, not just its greenlet. Fix: call"
    " psycogreen.gevent.patch_psycopg() at start-up, or use psycopg 3, which"
    " cooperates with gevent's monkey-patching."
)


def _check_concurrency(sessions: t.Any) -> None:
    """Warn, once per middleware, about greenlet setups that share sessions or
    block the process; quiet unless gevent or eventlet is in use."""
    if "gevent" not in sys.modules and "eventlet" not in sys.modules:
        return
    in_greenlet = getattr(_current(), "parent", None) is not None
    if (
        in_greenlet
        and type(sessions) is ThreadLocalRegistry
        # The stdlib's, even once patching made threading.local gevent's.
        and type(sessions.registry).__module__ == "_thread"
    ):
        warnings.warn(_SHARED, WsgiScopedWarning, stacklevel=3)
    psycopg2 = sys.modules.get("psycopg2.extensions")
    if (
        in_greenlet
        and psycopg2 is not None
        and _socket_patched()
        and psycopg2.get_wait_callback() is None
    ):
        warnings.warn(_PSYCOPG2, WsgiScopedWarning, stacklevel=3)


def _socket_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))
