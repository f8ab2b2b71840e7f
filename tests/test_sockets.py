"""The checkout's look at a pooled connection's socket, on real drivers."""

from __future__ import annotations

import time

import pytest
from conftest import server_url
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import DisconnectionError

from wsgi_scoped._sockets import _closed_while_idle


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_idle_live_connection_passes_and_closed_ones_are_replaced(backend: str) -> None:
    engine = create_engine(server_url(backend))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            dbapi = connection.connection.dbapi_connection
            _closed_while_idle(dbapi, None, None)  # nothing to read: alive
        dbapi.close()  # type: ignore[union-attr]
        with pytest.raises(DisconnectionError, match="closed|no socket"):
            _closed_while_idle(dbapi, None, None)
    finally:
        engine.dispose()


def test_connection_the_server_closed_is_replaced() -> None:
    """The server ends the session: its FATAL message (or end-of-file) waits
    on the socket, and the check sees it without a round trip."""
    engine = create_engine(server_url("postgresql"))
    admin = create_engine(server_url("postgresql"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            dbapi = connection.connection.dbapi_connection
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = :p"
                deadline = time.monotonic() + 10
                while other.execute(text(gone), {"p": pid}).scalar_one():
                    assert time.monotonic() < deadline, "the backend did not end"
                    time.sleep(0.01)
            with pytest.raises(DisconnectionError, match="while it was idle"):
                _closed_while_idle(dbapi, None, None)
            connection.invalidate()
    finally:
        engine.dispose()
        admin.dispose()
