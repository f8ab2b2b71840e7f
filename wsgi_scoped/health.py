"""A health-check WSGI application: a time-boxed ``SELECT 1`` and the pool's
state, as JSON with 200 or 503."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import typing as t

from sqlalchemy import Engine
from sqlalchemy import event
from sqlalchemy import text
from sqlalchemy.orm import scoped_session

from ._arguments import _engine_of
from ._servers import _measure
from ._servers import _report
from ._servers import _Server
from ._sockets import SOCKET_DRIVERS
from ._sockets import _fileno

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)

#: Set in the check thread: the connect timeout its new connections get.
_checking = threading.local()


class _CutOff(Exception):
    """The check was cut off, its timeout passed, before it could query."""


class _Check:
    """One ``SELECT 1`` in the check thread, and the means to cut it off:
    the socket of its connection, shut down from outside."""

    def __init__(
        self,
        executor: concurrent.futures.ThreadPoolExecutor,
        select_one: t.Callable[[_Check], float],
    ) -> None:
        self.started = time.monotonic()
        self.cut = False
        self.lock = threading.Lock()
        # A duplicate of the driver's socket: its number cannot be reused by
        # another connection while we may still shut it down.
        self.socket: socket.socket | None = None
        self.future = executor.submit(select_one, self)

    def attach(self, dbapi_connection: t.Any) -> None:
        """Note the connection's socket, unless the check was cut off."""
        with self.lock:
            if self.cut:
                raise _CutOff
            fileno = _fileno(dbapi_connection)
            if fileno is not None:
                self.socket = socket.socket(fileno=os.dup(fileno))

    def detach(self) -> bool:
        """Forget the socket; whether the check was cut off."""
        with self.lock:
            if self.socket is not None:
                self.socket.close()
                self.socket = None
            return self.cut

    def cut_off(self) -> None:
        with self.lock:
            self.cut = True
            if self.socket is not None:
                with contextlib.suppress(OSError):  # already disconnected
                    self.socket.shutdown(socket.SHUT_RDWR)


def _limit_connect_time(
    dialect: t.Any, record: t.Any, cargs: t.Any, cparams: dict[str, t.Any]
) -> t.Any:
    """Bound the connection attempts of the check thread."""
    seconds = getattr(_checking, "connect_timeout", None)
    if seconds is None:
        return None
    if dialect.driver != "pymysql":
        cparams["connect_timeout"] = seconds
        return None
    connection = dialect.connect(*cargs, **{**cparams, "read_timeout": seconds})
    # The pool hands the connection to requests next: PyMySQL applies the
    # configured read timeout again on its next read.
    connection._read_timeout = cparams.get("read_timeout")
    return connection


class HealthCheck:
    """Answer whether the database answers: mount it at ``/healthz`` for a
    load balancer or an orchestrator's probe.

    Each ``GET`` runs ``SELECT 1`` on a pooled connection in one worker
    thread and waits at most ``timeout`` seconds, so a hung database or an
    exhausted pool cannot hang the probe. Probes that arrive while a check
    runs share its answer. A check older than ``timeout`` is stuck: it is cut
    off (its connection's socket shut down, the connection invalidated), and
    later probes answer 503 at once until it has ended; its connection
    attempts are bounded too (psycopg, psycopg2, PyMySQL). The JSON body
    names the error's class only; the error itself is logged.

    For a :class:`Database` with ``replicas`` the primary decides the
    status; ``"replicas"`` lists each replica's URL, whether it is up (as
    this process routes) and its replay lag in bytes, measured in the check
    thread at most once a second (within ``timeout``).

    .. code-block:: json

        {"status": "ok", "database": {"ok": true, "seconds": 0.0012,
         "error": null}, "pool": {"class": "QueuePool", "size": 5,
         "checked_out": 1, "checked_in": 2, "overflow": -2}}

    :param database: a :class:`Database`, a ``scoped_session`` bound to an
        engine, or an :class:`~sqlalchemy.Engine`.
    :param timeout: seconds to wait for the answer; the check thread's
        connection attempts get this, rounded up to at least 2 s.
    :raises TypeError: if no engine can be found in ``database``.
    :raises ValueError: if ``timeout`` is not a positive number.

    .. code-block:: python

        app = DispatcherMiddleware(app, {"/healthz": HealthCheck(db)})

    .. versionadded:: 0.1
    """

    def __init__(
        self, database: Engine | scoped_session[t.Any], *, timeout: float = 2.0
    ) -> None:
        self.engine = _engine_of(database, "Health checks")
        #: A replicated Database's servers: primary first, then replicas.
        router = getattr(database, "_router", None)
        self._servers: list[_Server] = router.servers if router is not None else []
        # A Database notices a fork that ran no at-fork hook (uWSGI), so
        # that the check never uses a connection of the parent's pool.
        self._check_fork: t.Callable[[], None] = getattr(
            database, "_check_fork", lambda: None
        )
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(
                f"'timeout' must be a number of seconds > 0, got {timeout!r}."
            )
        self.timeout = timeout
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._running: _Check | None = None
        self._connect_timeout: int | None = None
        # libpq's connect_timeout covers the whole handshake (at least 2 s);
        # without it psycopg 3 waits 130 s and psycopg2 until TCP gives up.
        # PyMySQL's covers only the TCP connect: the handshake is read under
        # read_timeout.
        if self.engine.dialect.driver in SOCKET_DRIVERS:
            self._connect_timeout = max(2, math.ceil(timeout))
            for server in (self.engine, *[each.engine for each in self._servers]):
                if not event.contains(server, "do_connect", _limit_connect_time):
                    event.listen(server, "do_connect", _limit_connect_time)

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        database = self._check()
        report: dict[str, t.Any] = {
            "status": "ok" if database["ok"] else "unavailable",
            "database": database,
            "pool": self._pool(),
        }
        if self._servers:
            report["replicas"] = _report(self._servers[1:], time.monotonic())
        body = json.dumps(report).encode()
        status = "200 OK" if database["ok"] else "503 Service Unavailable"
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    def _check(self) -> dict[str, t.Any]:
        with self._lock:
            check = self._running
            if check is None or check.future.done():
                check = self._running = self._start()
            elif time.monotonic() - check.started > self.timeout:
                check.cut_off()
                return self._failed("PreviousCheckStillRunning")
        try:
            seconds = check.future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            check.cut_off()
            logger.warning("The database did not answer within %s s", self.timeout)
            return self._failed("Timeout")
        except Exception as error:
            if check.cut:  # ended by the cut-off, which the first probe logged
                return self._failed("Timeout")
            logger.warning("The database health check failed", exc_info=True)
            return self._failed(type(error).__name__)
        return {"ok": True, "seconds": round(seconds, 4), "error": None}

    @staticmethod
    def _failed(error: str) -> dict[str, t.Any]:
        return {"ok": False, "seconds": None, "error": error}

    def _start(self) -> _Check:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wsgi_scoped-health"
            )
        return _Check(self._executor, self._select_one)

    def _select_one(self, check: _Check) -> float:
        start = time.perf_counter()
        _checking.connect_timeout = self._connect_timeout
        self._check_fork()
        with self.engine.connect() as connection:
            check.attach(connection.connection.dbapi_connection)
            try:
                connection.execute(text("SELECT 1"))
            finally:
                if check.detach():  # a socket we shut down is not pooled again
                    connection.invalidate()
        seconds = time.perf_counter() - start
        if self._servers:
            self._measure_replicas()
        return seconds

    def _measure_replicas(self) -> None:
        """The lag of the replicas that are up, measured at most once a
        second; a failure is the replica's, and never fails the check."""
        now = time.monotonic()
        replicas = [each for each in self._servers[1:] if each.up(now)]
        try:
            _measure(self._servers[0], replicas, now)
        except Exception:
            logger.warning("Measuring the replicas' lag failed", exc_info=True)

    def _pool(self) -> dict[str, t.Any]:
        pool = self.engine.pool
        status: dict[str, t.Any] = {"class": type(pool).__name__}
        for name, method in (
            ("size", "size"),
            ("checked_out", "checkedout"),
            ("checked_in", "checkedin"),
            ("overflow", "overflow"),
        ):
            value = getattr(pool, method, None)
            status[name] = value() if callable(value) else None
        return status
