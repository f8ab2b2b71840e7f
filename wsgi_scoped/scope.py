"""The default scope of a request's session: the current greenlet, which is
the current thread's main greenlet outside gevent/eventlet; and Database's
registry, which holds scopes weakly and closes the sessions of ended ones.
"""

from __future__ import annotations

import logging
import sys
import threading
import typing as t
import warnings
import weakref

from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry
from sqlalchemy.util import ThreadLocalRegistry

from .exceptions import WsgiScopedWarning

try:
    from greenlet import getcurrent as _current
except ImportError:  # pragma: no cover - greenlet is optional since SQLAlchemy 2.1
    from threading import get_ident as _current  # type: ignore[assignment]


_log = logging.getLogger(__name__)

#: How many sessions a new session checks for a scope that ended.
_RELEASE_BATCH = 4


def get_ident() -> t.Hashable:
    """Return the key of the current greenlet, or of the current thread when
    greenlet is not installed.

    Every thread runs in a main greenlet of its own, so one key serves
    threaded servers, gevent and eventlet workers (monkey-patched or not) and
    greenlets switched by hand inside one thread. Use it as the ``scopefunc``
    of a plain :class:`~sqlalchemy.orm.scoped_session`; :class:`Database`
    keys its sessions by the same greenlet, held weakly.

    A plain registry keeps a key, and its session's connection, until
    ``remove()`` runs in that scope: ending each request's session exactly
    once is what keeps the registry, and memory, flat. (``Database`` also
    closes the sessions of threads and greenlets that ended without it.)

    .. code-block:: python

        Session = scoped_session(sessionmaker(engine), scopefunc=get_ident)

    .. versionadded:: 0.1
    """
    return _current()


class _ThreadScope:
    """Stands for a thread's main greenlet in a registry's keys. Kept in a
    ``threading.local``, so freed as the thread ends, before ``join()``
    returns (greenlet marks a main greenlet dead later, from another thread).
    """

    __slots__ = ("__weakref__",)
    dead = False


class _ScopeRegistry(ScopedRegistry[Session]):
    """A ScopedRegistry keyed by the current greenlet, or for a thread's main
    greenlet by a :class:`_ThreadScope`, through weak references: it never
    keeps a scope alive, and the session of a scope that ended without
    ``remove()`` is closed, its connection back in the pool, when the
    registry next creates a session.

    ``check()`` (Database's fork check) runs before any session is returned,
    created, replaced or dropped; not when there is none to tell about.
    """

    __slots__ = ("_check", "_pending")

    def __init__(
        self, createfunc: t.Callable[[], Session], check: t.Callable[[], None]
    ) -> None:
        threads = threading.local()

        def key() -> weakref.ref[t.Any]:
            current = _current()
            if getattr(current, "parent", None) is not None:
                return weakref.ref(current)  # a greenlet: gevent, eventlet, by hand
            try:
                return threads.key  # type: ignore[no-any-return]
            except AttributeError:
                threads.scope = _ThreadScope()
                threads.key = weakref.ref(threads.scope)
                return threads.key  # type: ignore[no-any-return]

        super().__init__(createfunc, key)
        self._check = check
        #: Keys still to look at for an ended scope (a snapshot of registry).
        self._pending: list[weakref.ref[t.Any]] = []

    def __call__(self) -> Session:
        self._check()
        key = self.scopefunc()
        try:
            return self.registry[key]  # type: ignore[no-any-return]
        except KeyError:
            self._release_ended()
            return self.registry.setdefault(key, self.createfunc())  # type: ignore[no-any-return]

    def has(self) -> bool:
        key = self.scopefunc()
        if key not in self.registry:
            return False
        self._check()  # it may be a parent's, forgotten now
        return key in self.registry

    def set(self, obj: Session) -> None:
        self._check()
        self.registry[self.scopefunc()] = obj

    def clear(self) -> None:
        self._check()
        self.registry.pop(self.scopefunc(), None)

    def _release_ended(self) -> None:
        """Close the sessions of scopes that ended (or were freed) without
        ``remove()``. A few keys per new session, from a snapshot refilled
        when used up: constant work however many sessions are open, and every
        one is looked at within ``len(registry) / _RELEASE_BATCH`` new ones.
        """
        pending = self._pending
        if not pending:
            pending.extend(self.registry)
        for _ in range(_RELEASE_BATCH):
            try:
                key = pending.pop()
            except IndexError:  # used up, maybe by another thread
                return
            scope = key()
            if scope is None or scope.dead:
                session = self.registry.pop(key, None)
                if session is not None:  # not removed meanwhile
                    _close_orphan(session)


def _close_orphan(session: Session) -> None:
    """Close the session of an ended scope: a failure is logged, since the
    caller that found it is another request, with work of its own."""
    try:
        session.close()
    except Exception:
        _log.error(
            "Closing the session of a thread or greenlet that ended without"
            " remove() failed",
            exc_info=True,
        )


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
