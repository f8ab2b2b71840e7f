"""The sockets of DBAPI connections: whether a pooled connection was closed
by its server while it sat idle, found without a round trip, and the socket
a health check shuts down to cut off a query that never ends.
"""

from __future__ import annotations

import select
import typing as t

from sqlalchemy.exc import DisconnectionError

#: Drivers whose connections expose their socket (``fileno()``, or PyMySQL's
#: ``_sock``), so that a checkout can look at it instead of pinging, and whose
#: connection attempts a health check can bound.
SOCKET_DRIVERS = frozenset({"psycopg", "psycopg2", "pymysql"})


def _fileno(dbapi_connection: t.Any) -> int | None:
    """The socket of a psycopg, psycopg2 or PyMySQL connection, else None."""
    owner = getattr(dbapi_connection, "_sock", dbapi_connection)  # PyMySQL
    fileno = getattr(owner, "fileno", None)
    return fileno() if callable(fileno) else None


def _closed_while_idle(dbapi_connection: t.Any, record: t.Any, proxy: t.Any) -> None:
    """The pool's "checkout" listener: a connection whose socket has
    something to read before the request said anything was closed by the
    server (a terminated backend, a restart, a proxy's idle timeout: each
    sends an error or end-of-file), so the pool replaces it. A poll, not a
    round trip; a peer that vanished without closing is not seen here."""
    try:
        fileno = _fileno(dbapi_connection)
    except Exception as error:  # the driver knows it is closed
        raise DisconnectionError("The pooled connection is closed.") from error
    if fileno is None or fileno < 0:
        raise DisconnectionError("The pooled connection has no socket.")
    if _readable(fileno):
        raise DisconnectionError(
            "The server closed this pooled connection while it was idle."
        )


def _readable(fileno: int) -> bool:
    """Whether the socket has something to read (or hung up), now."""
    if not hasattr(select, "poll"):  # pragma: no cover - Windows
        return bool(select.select([fileno], [], [], 0)[0])
    poller = select.poll()  # not select(): no limit on the socket's number
    poller.register(fileno, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))  # POLLHUP and POLLERR are always reported
