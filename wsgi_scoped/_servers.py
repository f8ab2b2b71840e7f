"""The health of a replicated :class:`Database`'s servers, as this process
sees it: a server whose connections fail is taken out for a while, and a
replica's replay lag is measured at most once a second. Nothing runs in the
background (``fork()`` would copy no thread): requests update it as they use
the servers."""

from __future__ import annotations

import functools
import time
import typing as t

from sqlalchemy import Connection
from sqlalchemy import Engine
from sqlalchemy import text

from .exceptions import logger

#: Seconds between two measurements of a replica's lag, per process.
LAG_INTERVAL = 1.0
_POSITION = text("SELECT pg_current_wal_lsn()")
_REPLAYED = text("SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)")
#: Bytes of the primary's WAL (at ``:lsn``) that the replica has not replayed.
_LAG = text("SELECT pg_wal_lsn_diff(CAST(:lsn AS pg_lsn), pg_last_wal_replay_lsn())")


class _Server:
    """One server (primary or replica) of a router, in this process."""

    __slots__ = ("engine", "down_for", "down_until", "lag", "measured")

    def __init__(self, engine: Engine, down_for: float) -> None:
        self.engine = engine
        self.down_for = down_for
        #: ``time.monotonic()`` before which the server is not used.
        self.down_until = 0.0
        #: Bytes of WAL behind the primary at the last measurement.
        self.lag: int | None = None
        #: ``time.monotonic()`` of that measurement.
        self.measured: float | None = None

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, error: BaseException) -> None:
        """A connection to the server failed: take it out for ``down_for``
        seconds; say so as it goes out (not again while it is out), since
        nobody else will."""
        now = time.monotonic()
        if self.up(now):
            url = self.engine.url.render_as_string(hide_password=True)
            logger.warning(
                "Taking %s out for %s s: %s", url, self.down_for, str(error).strip()
            )
        self.down_until = now + self.down_for

    def connection_failed(self, context: t.Any) -> bool:
        """The engine's ``handle_error``: whether the error is the server's
        (a failed connect, a lost connection), which takes it out."""
        failed = context.connection is None or context.is_disconnect
        if failed and context.sqlalchemy_exception is not None:
            self.failed(context.original_exception)
            return True
        return False

    def reachable(self) -> bool:
        """Whether a connection can be had: a pooled one, whose socket the
        checkout looks at (no round trip), else a new one."""
        return _survived([self], lambda: self.engine.connect().close())

    def measure(self, position: str, now: float) -> None:
        """The replica's lag behind the primary's ``position``: one round
        trip, in autocommit."""
        with _autocommit(self.engine) as connection:
            lag = connection.execute(_LAG, {"lsn": position}).scalar()
        self.lag = max(0, int(lag or 0))
        self.measured = now


def _autocommit(engine: Engine) -> Connection:
    """A connection that sends each statement alone, without BEGIN and
    ROLLBACK: one round trip per statement."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _position(primary: Engine) -> str:
    """The primary's WAL position (``pg_current_wal_lsn()``, not the insert
    position): one round trip, in autocommit."""
    with _autocommit(primary) as connection:
        return str(connection.execute(_POSITION).scalar_one())


def _replayed(replica: Engine, lsn: str, seconds: float, poll: float) -> bool:
    """Whether ``replica`` has replayed the WAL up to ``lsn``, looking every
    ``poll`` seconds for at most ``seconds`` (at least once)."""
    deadline = time.monotonic() + seconds
    with _autocommit(replica) as connection:
        while not connection.execute(_REPLAYED, {"lsn": lsn}).scalar():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(poll, left))
    return True


def _survived(servers: list[_Server], action: t.Callable[[], object]) -> bool:
    """Run ``action`` on ``servers``; ``False`` if it failed because one of
    them did (its ``handle_error`` took it out). Any other error is raised."""
    try:
        action()
    except Exception:
        now = time.monotonic()
        if all(server.up(now) for server in servers):
            raise
        return False
    return True


def _measure(primary: _Server, replicas: list[_Server], now: float) -> None:
    """Measure the lag of the ``replicas`` not measured for
    :data:`LAG_INTERVAL` seconds: one round trip to the primary for its
    position, one to each of them. While the primary is down the last
    measurements stand; a replica that fails is taken out, and the others
    measured still."""
    stale = [
        each
        for each in replicas
        if each.measured is None or now - each.measured >= LAG_INTERVAL
    ]
    positions: list[str] = []
    if stale and primary.up(now):
        _survived([primary], lambda: positions.append(_position(primary.engine)))
    for replica in stale if positions else ():
        _survived([replica], functools.partial(replica.measure, positions[0], now))


def _within_lag(
    primary: _Server, replicas: list[_Server], limit: int, now: float
) -> list[_Server]:
    """The ``replicas`` no more than ``limit`` bytes behind the primary, as
    measured at most :data:`LAG_INTERVAL` seconds ago (a replica never
    measured is kept). While the primary is down, all of them: reads are
    still served."""
    _measure(primary, replicas, now)
    if not primary.up(time.monotonic()):
        return replicas
    return [
        each
        for each in replicas
        if each.up(now) and (each.lag is None or each.lag <= limit)
    ]


def _report(servers: list[_Server], now: float) -> list[dict[str, t.Any]]:
    """Each server's state for :class:`HealthCheck`."""
    return [
        {
            "url": each.engine.url.render_as_string(hide_password=True),
            "up": each.up(now),
            "lag_bytes": each.lag,
        }
        for each in servers
    ]
