"""The health check (#6, #10): a time-boxed ``SELECT 1`` and the pool's
state, answered 200 when the database answers."""

from __future__ import annotations

import concurrent.futures
import http.client
import inspect
import json
import os
import sys
import threading
import time
import typing as t
import urllib.request
from pathlib import Path

import pytest
from conftest import StartResponseRecorder
from conftest import server_url
from sqlalchemy import URL
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool
from support import SilentHost
from support import free_port
from support import running
from support import wait_until_ready

from wsgi_scoped import Database
from wsgi_scoped import HealthCheck
from wsgi_scoped.health import _CutOff


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
    threads: list[str] = []
    event.listen(
        db.engine,
        "before_cursor_execute",
        lambda *args: threads.append(threading.current_thread().name),
    )
    try:
        start_response = StartResponseRecorder()
        [body] = HealthCheck(db)({"REQUEST_METHOD": "GET"}, start_response)
        assert start_response.calls == [
            (
                "200 OK",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                ],
                None,
            )
        ]
        report = json.loads(body)
        [thread] = threads  # SELECT 1, in the check's own thread
        assert thread.startswith("wsgi_scoped-health")
        assert report["status"] == "ok"
        database = report["database"]
        assert (database["ok"], database["error"]) == (True, None)
        assert 0 < database["seconds"] < 2  # a SELECT 1 on this machine
        assert database["seconds"] == round(database["seconds"], 4)
        assert report["pool"] == {
            "class": "QueuePool",
            "size": 5,
            "checked_out": 0,
            "checked_in": 1,
            "overflow": -4,
        }
        assert set(report) == {"status", "database", "pool"}  # no replicas
    finally:
        db.engine.dispose()


def test_health_check_of_a_pool_without_figures(tmp_path: t.Any) -> None:
    """NullPool keeps no connections and has no figures: the report says
    null for each, and the check answers."""
    engine = create_engine(f"sqlite:///{tmp_path / 'h.db'}", poolclass=NullPool)
    status, report = probe(HealthCheck(engine))
    assert status == "200 OK"
    assert report["pool"] == {
        "class": "NullPool",
        "size": None,
        "checked_out": None,
        "checked_in": None,
        "overflow": None,
    }
    engine.dispose()


def test_health_check_unreachable_database_is_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    status, report = probe(HealthCheck(engine, timeout=10))
    assert status == "503 Service Unavailable"
    assert report["status"] == "unavailable"
    assert report["database"] == {
        "ok": False,
        "seconds": None,
        "error": "OperationalError",
    }
    assert "127.0.0.1" not in json.dumps(report)  # details go to the log only
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == (
        "WARNING",
        "The database health check failed",
    )
    assert "127.0.0.1" in str(record.exc_info[1])  # type: ignore[index]


def test_health_check_is_time_boxed_when_the_pool_is_exhausted(
    tmp_path: t.Any, caplog: pytest.LogCaptureFixture
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
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("WARNING", "The database did not answer within 0.1 s")
        ]
    finally:
        held.close()
    stuck = check._running
    assert stuck is not None
    # The stuck check gets the freed connection, and ends without querying:
    # it was cut off.
    assert isinstance(stuck.future.exception(timeout=5), _CutOff)
    assert probe(check)[0] == "200 OK"
    db.engine.dispose()


def test_health_check_methods_and_arguments(tmp_path: t.Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    check = HealthCheck(db)
    assert probe(check, "HEAD") == ("200 OK", {})
    refused = StartResponseRecorder()
    assert check({"REQUEST_METHOD": "POST"}, refused) == [b""]
    assert refused.calls == [("405 Method Not Allowed", [("Allow", "GET, HEAD")], None)]
    # README: HealthCheck(db, timeout=2.0)
    assert inspect.signature(HealthCheck).parameters["timeout"].default == 2.0
    with pytest.raises(ValueError, match="'timeout' must be a number of seconds > 0"):
        HealthCheck(db, timeout=0)
    with pytest.raises(TypeError, match="Health checks need a wsgi_scoped.Database"):
        HealthCheck(object())  # type: ignore[arg-type]
    db.engine.dispose()


def test_overlapping_probes_share_the_check_in_flight(tmp_path: t.Any) -> None:
    """Probes that arrive while a check runs wait for that check's answer
    instead of answering 503, and no second ``SELECT 1`` runs meanwhile."""
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    check = HealthCheck(db, timeout=10)
    in_flight = threading.Event()
    gate = threading.Event()
    queries: list[str] = []

    def slow(conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        queries.append(statement)
        in_flight.set()
        gate.wait(timeout=10)

    event.listen(db.engine, "before_cursor_execute", slow)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as probers:
            first = probers.submit(probe, check)
            assert in_flight.wait(timeout=10)
            others = [probers.submit(probe, check) for _ in range(5)]
            time.sleep(0.5)  # let the others reach the check in flight
            gate.set()
            answers = [p.result(timeout=10)[0] for p in [first, *others]]
    finally:
        gate.set()
        db.engine.dispose()
    assert answers == ["200 OK"] * 6
    assert queries == ["SELECT 1"]


#: The drivers whose check a silent host must not hold: (backend, driver).
DRIVERS = [
    pytest.param("postgresql", "psycopg", id="psycopg"),
    pytest.param("postgresql", "psycopg2", id="psycopg2"),
    pytest.param("mysql", "pymysql", id="pymysql"),
]
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


def through(host: SilentHost, backend: str, driver: str) -> tuple[URL, URL]:
    """The real server's URL, and the same database reached through ``host``
    with ``driver``."""
    real = make_url(server_url(backend))
    url = real.set(drivername=f"{backend}+{driver}", host="127.0.0.1", port=host.port)
    return real, url


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wsgi_scoped-health")]


def probe_until_healthy(check: HealthCheck, seconds: float) -> list[str]:
    """Probe every 0.1 s until one answers 200, for up to ``seconds``; the
    answers' database errors, ``None`` last if the probe answered 200."""
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        errors.append(probe(check)[1]["database"]["error"])
        if errors[-1] is None:
            break
        time.sleep(0.1)
    return errors


@pytest.mark.parametrize(("backend", "driver"), DRIVERS)
def test_health_check_recovers_from_a_silent_host(backend: str, driver: str) -> None:
    """A host that accepts the connection and never answers: the first probe
    answers 503 when its timeout passes, the next ones at once while the
    check is stuck, one check thread at most; the stuck connection attempt
    ends within the driver's connect timeout, not when TCP gives up, so once
    the host answers again a probe answers 200 within seconds."""
    threads = len(health_threads())  # idle ones of earlier tests' checks
    with SilentHost() as host:
        real, url = through(host, backend, driver)
        db = Database(url)
        check = HealthCheck(db, timeout=1)
        try:
            assert probe(check)[1]["database"]["error"] == "Timeout"
            stuck = [probe(check) for _ in range(20)]
            assert stuck[0][1]["database"]["error"] == "PreviousCheckStillRunning"
            assert {status for status, _ in stuck} == {"503 Service Unavailable"}
            assert len(health_threads()) <= threads + 1
            assert host.accepted == 1  # no connection attempt piled up
            host.answer(real.host or "127.0.0.1", real.port or DEFAULT_PORTS[backend])
            errors = probe_until_healthy(check, 7)
            assert errors[-1] is None, errors
            assert len(health_threads()) <= threads + 1
            assert db.engine.pool.checkedout() == 0
        finally:
            db.engine.dispose()


@pytest.mark.parametrize(("backend", "driver"), DRIVERS)
def test_health_check_cuts_off_a_query_the_host_never_answers(
    backend: str, driver: str
) -> None:
    """A pooled connection whose host goes silent: the check's ``SELECT 1``
    is cut off when the timeout passes (its socket shut down from outside),
    the connection is invalidated, not returned to the pool, and the next
    check connects afresh and answers 200."""
    with SilentHost() as host:
        real, url = through(host, backend, driver)
        host.answer(real.host or "127.0.0.1", real.port or DEFAULT_PORTS[backend])
        engine = create_engine(url)  # no pre-ping: the check's own query hangs
        check = HealthCheck(engine, timeout=2)
        try:
            assert probe(check)[0] == "200 OK"
            assert engine.pool.checkedin() == 1
            host.freeze()
            with concurrent.futures.ThreadPoolExecutor(2) as probers:
                first = probers.submit(probe, check)
                time.sleep(0.5)
                joined = probers.submit(probe, check)  # ends with the cut-off
                answers = [p.result(timeout=10)[1] for p in (first, joined)]
            assert [a["database"]["error"] for a in answers] == ["Timeout"] * 2
            errors = probe_until_healthy(check, 7)
            assert errors[-1] is None, errors
            assert host.accepted == 2  # the silenced connection was not reused
            assert engine.pool.checkedin() == 1
            assert engine.pool.checkedout() == 0
        finally:
            engine.dispose()


def gunicorn_app() -> HealthCheck:
    """The application ``test_health_check_under_gunicorn_gthread`` serves."""
    return HealthCheck(Database(os.environ["HEALTH_APP_DATABASE_URL"]))


@pytest.mark.server
def test_health_check_under_gunicorn_gthread(tmp_path: Path) -> None:
    """Six load balancers probing one gunicorn gthread worker at once: every
    answer is 200, none a 503 for a check that merely overlapped another."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    from gunicorn.config import Config

    tests = Path(__file__).resolve().parent
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1"]
    command += ["--threads", "8", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5"]
    if "control_socket_disable" in Config().settings:
        command.append("--no-control-socket")  # gunicorn >= 25 opens ~/.gunicorn
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]),
        "HEALTH_APP_DATABASE_URL": server_url("postgresql"),
    }
    log = tmp_path / "gunicorn.log"
    address = f"http://127.0.0.1:{port}/healthz"

    def get() -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/healthz", headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return 0
        finally:
            connection.close()

    def prober(_: int) -> list[int]:
        return [get() for _ in range(50)]

    with running(
        [*command, "test_health:gunicorn_app()"], cwd=tmp_path, env=env, log=log
    ) as proc:
        wait_until_ready(
            lambda: urllib.request.urlopen(address, timeout=5).close(),
            proc,
            log,
            "gunicorn",
        )
        with concurrent.futures.ThreadPoolExecutor(6) as probers:
            statuses = [s for batch in probers.map(prober, range(6)) for s in batch]
    unhealthy = len([s for s in statuses if s != 200])
    print(f"{unhealthy} of {len(statuses)} probes were not answered 200")
    assert statuses == [200] * len(statuses), log.read_text()[-3000:]


def test_health_check_leaves_pooled_connections_unbounded() -> None:
    """The read timeout that bounds the check's PyMySQL handshake is lifted
    before the pool hands the connection to a request, and connections made
    outside the check are not bounded at all."""
    db = Database(server_url("mysql"))
    check = HealthCheck(db, timeout=1)  # reads bounded by 2 s while connecting
    try:
        assert probe(check)[0] == "200 OK"
        with db.engine.connect() as reused, db.engine.connect() as new:
            assert reused.scalar(text("SELECT SLEEP(2.5)")) == 0
            assert new.scalar(text("SELECT SLEEP(2.5)")) == 0
        assert db.engine.pool.checkedin() == 2  # the check's connection, and one more
    finally:
        db.engine.dispose()


def test_health_check_restores_a_configured_read_timeout() -> None:
    """A PyMySQL ``read_timeout`` set by the application is the one the
    check's connection has once the pool hands it to a request."""
    db = Database(server_url("mysql"), connect_args={"read_timeout": 1})
    try:
        assert probe(HealthCheck(db, timeout=5))[0] == "200 OK"
        assert db.engine.pool.checkedin() == 1
        with db.engine.connect() as reused:
            with pytest.raises(OperationalError, match="timed out"):
                reused.scalar(text("SELECT SLEEP(3)"))
    finally:
        db.engine.dispose()


@pytest.mark.parametrize(("timeout", "bound"), [(0.5, 2), (2.5, 3)])
def test_health_check_bounds_its_connection_attempts(
    timeout: float, bound: int
) -> None:
    """libpq's ``connect_timeout`` is whole seconds, at least 2 (libpq
    treats 1 as 2): the check's timeout rounded up."""
    engine = create_engine(server_url("postgresql"))
    seen: list[object] = []
    check = HealthCheck(engine, timeout=timeout)
    event.listen(
        engine,
        "do_connect",
        lambda dialect, record, cargs, cparams: seen.append(
            cparams.get("connect_timeout")
        ),
    )
    try:
        assert probe(check)[0] == "200 OK"
        with engine.connect():
            pass  # a connection made outside the check is not bounded
        with engine.connect(), engine.connect():
            pass
        assert seen == [bound, None]
    finally:
        engine.dispose()


def test_health_checks_on_one_engine_bound_connects_once() -> None:
    engine = create_engine(server_url("postgresql"))
    HealthCheck(engine, timeout=1)
    check = HealthCheck(engine, timeout=3)
    try:
        assert len(engine.dialect.dispatch.do_connect) == 1
        assert probe(check)[0] == "200 OK"
    finally:
        engine.dispose()


HEALTH_FORK_SCRIPT = """
import ctypes, json, os, sys, time, wsgiref.util
from sqlalchemy import event, text
from wsgi_scoped import Database, HealthCheck

db = Database({url!r})
check = HealthCheck(db, timeout=10)
with db.engine.connect() as connection:  # pooled in the parent
    parent = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
used = []
event.listen(
    db.engine, "checkout", lambda dbapi, *_: used.append(dbapi.info.backend_pid)
)
read, write = os.pipe()
pid = ctypes.PyDLL(None).fork()  # as uWSGI forks: no at-fork hook runs
if pid == 0:
    code = 1
    try:
        environ = {{}}
        wsgiref.util.setup_testing_defaults(environ)
        statuses = []
        body = check(environ, lambda status, headers: statuses.append(status))
        os.write(write, json.dumps({{"status": statuses[0], "used": used}}).encode())
        code = 0
    finally:
        os._exit(code)
os.close(write)
deadline = time.monotonic() + 30
while not (waited := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
    time.sleep(0.01)
if not waited[0]:
    os.kill(pid, 9)
child = json.loads(os.read(read, 4096) or b"{{}}")
with db.engine.connect() as connection:
    again = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
print(json.dumps({{"parent": parent, "child": child, "again": again}}))
db.engine.dispose()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_health_check_in_a_child_forked_without_hooks_uses_its_own_connection() -> None:
    """uWSGI forks without Python's at-fork hooks: a worker's first health
    check must not ping on the connection the master pooled."""
    from test_scope import run_script

    report = run_script(HEALTH_FORK_SCRIPT.format(url=server_url("postgresql")))
    assert report["child"]["status"] == "200 OK"
    assert report["child"]["used"] and report["parent"] not in report["child"]["used"]
    assert report["again"] == report["parent"]  # the parent's connection is intact
