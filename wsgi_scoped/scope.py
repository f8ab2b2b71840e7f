"""The default scope of a request's session: the current greenlet, which is
the current thread's main greenlet outside gevent/eventlet.
"""

from __future__ import annotations

import typing as t

from sqlalchemy.util import ThreadLocalRegistry

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
