"""The health check (#6, #10): a time-boxed ``SELECT 1`` and the pool's
state, answered 200 when the database answers."""

from __future__ import annotations

import json
import typing as t

import pytest
from conftest import StartResponseRecorder
from conftest import server_url
from sqlalchemy import create_engine

from wsgi_scoped import Database
from wsgi_scoped import HealthCheck


def probe(check: HealthCheck, method: str = "GET") -> tuple[str, dict[str, t.Any]]:
    start_response = StartResponseRecorder()
    body = b"".join(check({"REQUEST_METHOD": method}, start_response))
    return start_response.status, json.loads(body) if body else {}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_health_check_reports_database_and_pool(backend: str, tmp_path: t.Any) -> None:
    url = (
        f"sqlite:///{tmp_path / 'h.db'}" if backend == "sqlite" else server_url(backend)
    )
    db = Database(url)
    try:
        status, report = probe(HealthCheck(db))
        assert status == "200 OK"
        assert report["status"] == "ok"
        assert report["database"]["ok"] is True
        assert report["database"]["error"] is None
        assert report["pool"]["class"] == "QueuePool"
        assert report["pool"]["checked_out"] == 0
        assert report["pool"]["size"] == 5
    finally:
        db.engine.dispose()


def test_health_check_unreachable_database_is_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    status, report = probe(HealthCheck(engine, timeout=10))
    assert status == "503 Service Unavailable"
    assert report["status"] == "unavailable"
    assert report["database"]["error"] == "OperationalError"
    assert "127.0.0.1" not in json.dumps(report)  # details go to the log only
    assert "health check failed" in caplog.records[0].getMessage()


def test_health_check_is_time_boxed_when_the_pool_is_exhausted(
    tmp_path: t.Any,
) -> None:
    """A pool with no free connection stands for a hung database: the probe
    answers 503 within its timeout, says so again while the first check is
    stuck, and recovers when a connection is free."""
    db = Database(
        f"sqlite:///{tmp_path / 'h.db'}", pool_size=1, max_overflow=0, pool_timeout=2
    )
    check = HealthCheck(db, timeout=0.1)
    held = db.engine.connect()
    try:
        status, report = probe(check)
        assert (status, report["database"]["error"]) == (
            "503 Service Unavailable",
            "Timeout",
        )
        assert report["pool"]["checked_out"] == 1
        assert probe(check)[1]["database"]["error"] == "PreviousCheckStillRunning"
    finally:
        held.close()
    stuck = check._running
    assert stuck is not None
    stuck.result(timeout=5)  # the stuck check gets the freed connection
    assert probe(check)[0] == "200 OK"
    db.engine.dispose()


def test_health_check_methods_and_arguments(tmp_path: t.Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    check = HealthCheck(db)
    assert probe(check, "HEAD") == ("200 OK", {})
    assert probe(check, "POST")[0] == "405 Method Not Allowed"
    with pytest.raises(ValueError, match="'timeout' must be a number of seconds > 0"):
        HealthCheck(db, timeout=0)
    with pytest.raises(TypeError, match="Health checks need a wsgi_scoped.Database"):
        HealthCheck(object())  # type: ignore[arg-type]
    db.engine.dispose()
