"""A health-check WSGI application: a time-boxed ``SELECT 1`` and the pool's
state, as JSON with 200 or 503."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import typing as t

from sqlalchemy import Engine
from sqlalchemy import text
from sqlalchemy.orm import scoped_session

from ._arguments import _engine_of

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

logger = logging.getLogger(__name__)


class HealthCheck:
    """Answer whether the database answers: mount it at ``/healthz`` for a
    load balancer or an orchestrator's probe.

    Each ``GET`` runs ``SELECT 1`` on a pooled connection in a worker thread
    and waits at most ``timeout`` seconds, so a hung database or an exhausted
    pool cannot hang the probe. While an earlier check is still stuck, later
    ones answer 503 at once instead of piling up. The JSON body names the
    error's class only; the error itself is logged.

    .. code-block:: json

        {"status": "ok", "database": {"ok": true, "seconds": 0.0012,
         "error": null}, "pool": {"class": "QueuePool", "size": 5,
         "checked_out": 1, "checked_in": 2, "overflow": -2}}

    :param database: a :class:`Database`, a ``scoped_session`` bound to an
        engine, or an :class:`~sqlalchemy.Engine`.
    :param timeout: seconds to wait for the answer.
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
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(
                f"'timeout' must be a number of seconds > 0, got {timeout!r}."
            )
        self.timeout = timeout
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: concurrent.futures.Future[float] | None = None

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        database = self._check(environ)
        report = {
            "status": "ok" if database["ok"] else "unavailable",
            "database": database,
            "pool": self._pool(),
        }
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

    def _check(self, environ: WSGIEnvironment) -> dict[str, t.Any]:
        if self._running is not None and not self._running.done():
            return {"ok": False, "seconds": None, "error": "PreviousCheckStillRunning"}
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wsgi_scoped-health"
            )
        self._running = self._executor.submit(self._select_one)
        try:
            seconds = self._running.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("The database did not answer within %s s", self.timeout)
            return {"ok": False, "seconds": None, "error": "Timeout"}
        except Exception as error:
            logger.warning("The database health check failed", exc_info=True)
            return {"ok": False, "seconds": None, "error": type(error).__name__}
        return {"ok": True, "seconds": round(seconds, 4), "error": None}

    def _select_one(self) -> float:
        start = time.perf_counter()
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return time.perf_counter() - start

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
