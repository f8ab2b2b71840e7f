"""An engine and a greenlet/thread-scoped session registry, with defaults that
suit a WSGI server: shared in-memory SQLite, busy timeouts, dead pooled
connections replaced without a round trip, and pools that are safe across
``fork()``.
"""

from __future__ import annotations

import functools
import inspect
import os
import sqlite3
import threading
import typing as t
import uuid
import weakref

from sqlalchemy import URL
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import make_url
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import QueuePool

from ._arguments import _require_count
from ._arguments import _require_seconds
from ._sockets import SOCKET_DRIVERS
from ._sockets import _closed_while_idle
from .middleware import ScopedSessionMiddleware
from .replicas import _routed_class
from .replicas import _Router
from .scope import _ScopeRegistry
from .transaction import _guard_commits

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

#: Keyword options that go to the sessionmaker; every other one goes to create_engine().
_SESSION_OPTIONS = frozenset(inspect.signature(Session.__init__).parameters) - {
    "self",
    "bind",
} | {"class_"}

_NO_URL = (
    "No database URL: pass one to Database(), e.g."
    " Database('sqlite:///app.db'), or set the DATABASE_URL environment variable."
)

#: Seconds a SQLite connection waits for another one's write lock.
SQLITE_BUSY_TIMEOUT = 15

_NOT_YET = (
    "Database(replicas=...) is not yet supported for {backend}: read replicas"
    " need PostgreSQL (its WAL positions give read-your-writes). Fix: drop"
    " 'replicas', or use PostgreSQL URLs for the primary and every replica."
)


class Database(scoped_session[Session]):
    """Create an engine for ``url`` and a session registry scoped to the
    current greenlet or thread: a :class:`~sqlalchemy.orm.scoped_session`
    with defaults that suit a WSGI server.

    -   ``sqlite://`` (in memory): one database shared by every thread, handed
        to one request at a time, so two requests never share a transaction.
    -   SQLite files: a busy timeout of :data:`SQLITE_BUSY_TIMEOUT` seconds.
    -   Server databases: a connection the server closed while it sat in
        the pool (a terminated backend, a restart, a proxy's idle timeout)
        is replaced at checkout, found by looking at its socket rather than
        by a round trip (psycopg, psycopg2, PyMySQL; ``pool_pre_ping=True``
        for other drivers).
    -   After ``fork()`` the child gets a fresh pool and never touches the
        parent's connections (gunicorn ``--preload``, uWSGI).
    -   The session of a thread or greenlet that ended without ``remove()``
        is closed, its connection back in the pool, when the next session
        is created.
    -   With ``replicas`` (PostgreSQL): each request served by the
        middleware uses one server, a replica for GET, HEAD and OPTIONS, the
        primary for other methods or after :meth:`use_primary`; a response
        to a committed write carries the primary's WAL position, and a
        request that sends it back reads a replica only once the replica
        has replayed it. A server whose connections fail is left out for
        ``replica_down_for`` seconds; with every replica out, reads use the
        primary; with the primary out, writes answer 503 (README: Read
        replicas).

    :param url: the database URL; ``None`` reads ``DATABASE_URL``.
    :param replicas: URLs of streaming replicas of ``url``; each gets an
        engine with the same options as the primary's.
    :param replica_wait: seconds a request that sent back a WAL position
        waits for a replica to replay it before it uses the primary.
    :param replica_down_for: seconds a server whose connection failed is
        left out of routing in this process, before a request tries it again.
    :param replica_max_lag: bytes of WAL a replica may be behind the primary
        and still serve reads; ``None``, no limit (and no measurement).
    :param scopefunc: the key of the current scope; ``None`` means the
        current greenlet, else thread (as :func:`get_ident`), held weakly.
    :param options: session options (the keyword arguments of
        :class:`~sqlalchemy.orm.Session`, such as ``expire_on_commit``, and
        ``class_``) go to the sessionmaker; all others go to
        :func:`~sqlalchemy.create_engine` and override the defaults above.
    :raises TypeError: if there is no URL, or an option is not one of
        ``Session``'s or ``create_engine()``'s.
    :raises ValueError: if ``replicas`` are given for a database other
        than PostgreSQL, or a ``replica_*`` option is out of range.

    .. code-block:: python

        db = Database("postgresql+psycopg://app@localhost/app", pool_size=10)
        app = db.middleware(app)
        db().execute(select(User))  # inside a request

    .. versionadded:: 0.1
    """

    #: The :class:`~sqlalchemy.Engine` of the primary, which sessions use
    #: outside requests.
    engine: Engine
    #: The engines of the ``replicas``, in their order; empty without.
    replicas: tuple[Engine, ...]

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        replicas: t.Iterable[str | URL] | None = None,
        replica_wait: float = 0.02,
        replica_down_for: float = 5.0,
        replica_max_lag: int | None = None,
        scopefunc: t.Callable[[], t.Hashable] | None = None,
        **options: t.Any,
    ) -> None:
        if url is None:
            url = os.environ.get("DATABASE_URL")
        if not url:
            raise TypeError(_NO_URL)
        url = make_url(url)
        replica_urls = _replica_urls(url, replicas)
        session_options = {k: options.pop(k) for k in _SESSION_OPTIONS & set(options)}
        _require_seconds("replica_wait", replica_wait)
        _require_seconds("replica_down_for", replica_down_for)
        if replica_max_lag is not None:
            _require_count("replica_max_lag", replica_max_lag, " (bytes) or None")
        self.engine, self._keeper = _create_engine(url, options)
        self.replicas = tuple(_create_engine(each, options)[0] for each in replica_urls)
        self._router: _Router | None = None
        if self.replicas:
            self._router = _Router(
                self.engine,
                self.replicas,
                wait=replica_wait,
                down_for=replica_down_for,
                max_lag=replica_max_lag,
            )
            session_options["class_"] = _routed_class(
                session_options.get("class_", Session), self._router
            )
            #: The middleware's per-request hooks (README: Read replicas).
            self._request_started = self._router.start
            self._request_finished = self._router.finish
        # The process that owns the pool and the registered sessions.
        self._pid = os.getpid()
        self._fork_lock = threading.Lock()
        # Sessions open in a parent at fork time; kept so that garbage
        # collection never rolls back the parent's connections from a child.
        self._forked_sessions: list[Session] = []
        factory = sessionmaker(self.engine, **session_options)
        _guard_commits(factory)  # in scripts and CLI commands too
        if self._router is not None:
            event.listen(factory, "after_commit", self._router.committed)
        if scopefunc is None:
            super().__init__(factory)
            self.registry = _ScopeRegistry(factory, self._check_fork)
        else:
            super().__init__(factory, scopefunc=_checked(scopefunc, self._check_fork))
        if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
            os.register_at_fork(
                after_in_child=functools.partial(_after_fork, weakref.ref(self))
            )

    def _check_fork(self) -> None:
        """Notice a fork that ran no at-fork hook (uWSGI without
        ``py-call-osafterfork``): the pid is not the one recorded. The
        registry runs it before it returns, creates, replaces or drops a
        session."""
        if os.getpid() != self._pid:
            self._forget_parent()

    def _forget_parent(self) -> None:
        """In a forked child: forget the parent's sessions and pooled
        connections without closing them, since they belong to the parent."""
        with self._fork_lock:
            if os.getpid() == self._pid:  # another thread of the child did it
                return
            sessions = self.registry.registry
            self._forked_sessions.extend(sessions.values())
            sessions.clear()
            for engine in (self.engine, *self.replicas):
                engine.dispose(close=False)
            self._pid = os.getpid()

    def use_primary(self) -> None:
        """Send the current request's statements to the primary, not to a
        replica; call it in the handler before the first query. Without
        ``replicas``, or outside a request, there is nothing to do.

        :raises WsgiScopedError: if the request's first query already ran
            on a replica.

        .. versionadded:: 0.1
        """
        if self._router is not None:
            self._router.use_primary()

    def middleware(
        self, app: WSGIApplication, **options: t.Any
    ) -> ScopedSessionMiddleware:
        """Wrap ``app`` in a :class:`ScopedSessionMiddleware` driving this
        registry; ``options`` are that class's keyword arguments.

        .. versionadded:: 0.1
        """
        return ScopedSessionMiddleware(app, self, **options)

    def init_app(self, app: t.Any, **options: t.Any) -> ScopedSessionMiddleware:
        """Wire this registry into the Flask application ``app``, as
        :func:`wsgi_scoped.flask.init_app` does; ``options`` are
        :class:`ScopedSessionMiddleware`'s keyword arguments.

        .. code-block:: python

            db = Database()  # DATABASE_URL
            db.init_app(app, commit=True)

        .. versionadded:: 0.1
        """
        from .flask import init_app  # Flask is optional

        return init_app(app, self, **options)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<{type(self).__name__} {url!r}>"


def _create_engine(
    url: URL, options: dict[str, t.Any]
) -> tuple[Engine, sqlite3.Connection | None]:
    """An engine for ``url`` with the defaults for its dialect, overridden
    by ``options``; and for in-memory SQLite the connection keeping it."""
    url, engine_options, keeper = _engine_defaults(url)
    connect_args = {**engine_options.pop("connect_args", {})}
    connect_args.update(options.get("connect_args", {}))
    # A connection closed while pooled is found at checkout: by a look at
    # its socket where the driver shows it, else by a ping.
    watched = url.get_driver_name() in SOCKET_DRIVERS
    if url.get_backend_name() != "sqlite" and not watched:
        engine_options["pool_pre_ping"] = True
    engine_options.update(options)
    if connect_args:
        engine_options["connect_args"] = connect_args
    engine = create_engine(url, **engine_options)
    if watched:
        event.listen(engine, "checkout", _closed_while_idle)
    return engine, keeper


def _replica_urls(primary: URL, replicas: t.Iterable[str | URL] | None) -> list[URL]:
    """The replicas' URLs, checked: a list of PostgreSQL URLs, as the
    primary's must be."""
    if replicas is None:
        return []
    if isinstance(replicas, (str, URL)):
        raise TypeError(
            "'replicas' must be a list of URLs, got one URL. Fix:"
            " Database(url, replicas=[replica_url])."
        )
    urls = [make_url(each) for each in replicas]
    backends = {url.get_backend_name() for url in (primary, *urls)} - {"postgresql"}
    if urls and backends:
        raise ValueError(_NOT_YET.format(backend=" and ".join(sorted(backends))))
    return urls


def _engine_defaults(
    url: URL,
) -> tuple[URL, dict[str, t.Any], sqlite3.Connection | None]:
    """The URL and default engine options for ``url``, and for in-memory
    SQLite the connection that keeps the shared database alive."""
    if url.get_backend_name() != "sqlite":
        return url, {}, None
    if url.database not in (None, "", ":memory:"):
        return url, {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}, None
    # A named in-memory database that every connection of this process can
    # open, kept alive by one idle connection; the pool holds one more
    # connection, so requests take turns instead of sharing a transaction.
    name = f"file:wsgi_scoped_{uuid.uuid4().hex}"
    keeper = sqlite3.connect(
        f"{name}?mode=memory&cache=shared", uri=True, check_same_thread=False
    )
    shared = url.set(
        database=name, query={"mode": "memory", "cache": "shared", "uri": "true"}
    )
    options = {
        "poolclass": QueuePool,
        "pool_size": 1,
        "max_overflow": 0,
        "connect_args": {"check_same_thread": False},
    }
    return shared, options, keeper


def _checked(
    scopefunc: t.Callable[[], t.Hashable], check: t.Callable[[], None]
) -> t.Callable[[], t.Hashable]:
    """``scopefunc``, running ``check()`` first."""

    def scope() -> t.Hashable:
        check()
        return scopefunc()

    return scope


def _after_fork(ref: weakref.ReferenceType[Database]) -> None:
    """The at-fork hook, in a child forked by ``os.fork()``."""
    db = ref()
    if db is not None:
        db._fork_lock = threading.Lock()  # a parent's thread may have held it
        db._forget_parent()
