"""wsgi_scoped under real servers against a real PostgreSQL (#4): gunicorn
sync, gthread, gevent and ``--preload``, waitress, uWSGI with its defaults
(#10), and PgBouncer in transaction pooling mode. Each test starts
``tests/server_app.py`` on 127.0.0.1, sends a bounded number of requests
with timeouts, and asks PostgreSQL itself (``pg_stat_activity``) whether a
connection was left in a transaction.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import typing as t
import uuid
from pathlib import Path

import pgbouncer
import pytest
from conftest import server_url
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.pool import NullPool
from support import free_port

TESTS = Path(__file__).resolve().parent
#: Seconds any one HTTP request, or any wait for the server to settle, may take.
TIMEOUT = 20.0
#: Server log lines that mean a connection was shared or broken under a request.
BROKEN = ("SSL SYSCALL", "server closed the connection", "lost synchronization")


@dataclasses.dataclass
class Target:
    """The database side of one test: the application's name (its
    connections' ``application_name`` and its table), and an engine of the
    test's own to look at them."""

    url: str
    name: str
    admin: Engine

    def query(self, sql: str, **params: t.Any) -> list[t.Any]:
        with self.admin.connect() as connection:
            return list(connection.execute(text(sql), {"name": self.name, **params}))

    def states(self) -> dict[str, int]:
        """How many of the application's connections are in each state."""
        rows = self.query(
            "SELECT coalesce(state, ''), count(*) FROM pg_stat_activity"
            " WHERE application_name = :name GROUP BY 1"
        )
        return {state: count for state, count in rows}

    def idle_in_transaction(self) -> int:
        return int(
            self.query(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                " AND state LIKE 'idle in transaction%'"
            )[0][0]
        )

    def backends(self) -> set[int]:
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
        )
        return {pid for (pid,) in rows}

    def terminate(self) -> int:
        """Terminate every connection of the application, as an administrator
        or a failover would; return how many."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = :name"
        )
        return len(rows)

    def rows(self, tag: str | None = None) -> int:
        where = "" if tag is None else " WHERE tag LIKE :tag"
        return int(
            self.query(f"SELECT count(*) FROM {self.name}{where}", tag=tag)[0][0]
        )


@pytest.fixture
def target(request: pytest.FixtureRequest) -> t.Iterator[Target]:
    """A unique application name and table for this test. The application
    creates the table when it is imported (two workers race to do so); the
    fixture drops it, after ending whatever connection the test left."""
    url = server_url("postgresql")
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:36]
    name = f"ws_{slug}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        url, poolclass=NullPool, connect_args={"application_name": "wsgi_scoped_tests"}
    )
    target = Target(url, name, admin)
    try:
        yield target
    finally:
        target.terminate()
        with admin.begin() as connection:
            connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def bouncer(target: Target) -> t.Iterator[pgbouncer.PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the test database,
    with 4 server connections."""
    reason = pgbouncer.unusable_reason()
    if reason is not None:
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    with pgbouncer.run_pgbouncer(make_url(target.url), pool_size=4) as running:
        yield running


@dataclasses.dataclass(frozen=True)
class Setup:
    """How to serve the application: ``server`` is a gunicorn worker class
    (``sync``, ``gthread``, ``gevent``), ``waitress`` or ``uwsgi`` (its
    defaults: a master that imports the application, then forks ``workers``
    single-threaded processes); ``bouncer`` puts
    PgBouncer between it and PostgreSQL, with a ``small pool`` or
    ``NullPool`` in each worker."""

    server: str
    workers: int = 2
    threads: int = 4
    bouncer: str | None = None

    def options(self) -> dict[str, str]:
        """The application's pool: as many connections as requests served at
        once by one worker (README, Deployment)."""
        if self.bouncer == "NullPool":
            return {"SERVER_APP_NULLPOOL": "1", "SERVER_APP_NO_PREPARE": "1"}
        size = {"sync": 1, "uwsgi": 1, "gevent": 5}.get(self.server, self.threads)
        options = {
            "SERVER_APP_POOL_SIZE": str(size),
            "SERVER_APP_MAX_OVERFLOW": "0",
            "SERVER_APP_POOL_TIMEOUT": str(int(TIMEOUT)),
        }
        if self.bouncer is not None:
            options["SERVER_APP_NO_PREPARE"] = "1"
        return options


SYNC = Setup("sync")
GTHREAD = Setup("gthread")
GEVENT = Setup("gevent")
WAITRESS = Setup("waitress", workers=1)
UWSGI = Setup("uwsgi")


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _uwsgi() -> str:
    """The ``uwsgi`` executable of this environment; skip the test without it
    (fail it in CI, where ``WSGI_SCOPED_REQUIRE_SERVERS`` is set)."""
    path = Path(sys.executable).with_name("uwsgi")
    if not path.exists():
        reason = (
            f"uWSGI is not installed ({path} not found): install it with"
            " pip install -e '.[test,uwsgi]' (it compiles, about 80 s)"
        )
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    return str(path)


def _command(setup: Setup, port: int, extra: t.Sequence[str]) -> list[str]:
    if setup.server == "uwsgi":
        # uWSGI's defaults otherwise: no lazy-apps, no py-call-osafterfork, no
        # threads. --die-on-term: SIGTERM stops it (uWSGI 2.0 would reload).
        return [
            _uwsgi(),
            "--master",
            "--processes",
            str(setup.workers),
            "--http-socket",
            f"127.0.0.1:{port}",
            "--virtualenv",
            sys.prefix,
            "--module",
            "server_app:app",
            "--need-app",
            "--die-on-term",
            "--strict",
            *extra,
        ]
    if setup.server == "waitress":
        pytest.importorskip("waitress", reason="waitress is not installed")
        return [
            sys.executable,
            "-m",
            "waitress",
            f"--listen=127.0.0.1:{port}",
            f"--threads={setup.threads}",
            *extra,
            "server_app:app",
        ]
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    if setup.server == "gevent":
        pytest.importorskip("gevent", reason="gevent is not installed")
    from gunicorn.config import Config

    args = ["-k", setup.server, "-w", str(setup.workers), "-b", f"127.0.0.1:{port}"]
    args += ["--graceful-timeout", "5"]
    if setup.server == "gthread":  # sync with --threads > 1 would be gthread
        args += ["--threads", str(setup.threads)]
    if "control_socket_disable" in Config().settings:
        args.append("--no-control-socket")  # gunicorn >= 25 opens ~/.gunicorn
    return [sys.executable, "-m", "gunicorn", *args, *extra, "server_app:app"]


@contextlib.contextmanager
def serve(
    setup: Setup,
    target: Target,
    tmp_path: Path,
    *,
    url: str | None = None,
    extra: t.Sequence[str] = (),
    options: dict[str, str] | None = None,
    bouncer: pgbouncer.PgBouncer | None = None,
) -> t.Iterator[Server]:
    """Run ``tests/server_app.py`` under ``setup`` until the block ends, and
    print the logs' ends if the block failed."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]
        ),
        "SERVER_APP_DATABASE_URL": url or target.url,
        "SERVER_APP_NAME": target.name,
        **setup.options(),
        **(options or {}),
    }
    log = tmp_path / f"{setup.server}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(setup, port, extra),
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, port, log)
    try:
        _wait_until_ready(server)
        if setup.server not in ("waitress", "uwsgi"):
            assert f"Using worker: {setup.server}\n" in server.log_text()
        yield server
    except BaseException:
        _stop(proc)
        print(f"---- end of the {setup} log ----\n{server.log_tail()}")
        if bouncer is not None:
            print(f"---- end of the PgBouncer log ----\n{bouncer.log_tail()}")
        raise
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: its workers too
        proc.wait()


def _wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + 30
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited with {server.proc.returncode}")
        try:
            status, body = call(server, "GET", "/pool", timeout=2)
        except (OSError, http.client.HTTPException):  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer within 30 s")
            time.sleep(0.1)
            continue
        assert status == 200, body
        return


def call(
    server: Server, method: str, path: str, timeout: float = TIMEOUT
) -> tuple[int, bytes]:
    """One request on a new connection: the status and the whole body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclasses.dataclass
class Result:
    method: str
    path: str
    status: int  # 0: no response
    body: bytes
    seconds: float


def load(
    server: Server, requests: t.Sequence[tuple[str, str]], concurrency: int
) -> list[Result]:
    """Send ``requests`` from ``concurrency`` client threads; a request that
    got no response is a result with status 0 and the error as its body."""

    def send(request: tuple[str, str]) -> Result:
        start = time.monotonic()
        try:
            status, body = call(server, *request)
        except (OSError, http.client.HTTPException) as error:
            status, body = 0, repr(error).encode()
        return Result(*request, status, body, time.monotonic() - start)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(send, requests))


def failures(results: list[Result], expected: int | None = None) -> list[str]:
    """The requests that were not a success, or not ``expected``."""
    return [
        f"{r.method} {r.path}: {r.status} {r.body[:300]!r}"
        for r in results
        if (r.status != expected if expected else not 200 <= r.status < 300)
    ]


def pools(server: Server, workers: int) -> dict[int, int | None]:
    """``engine.pool.checkedout()`` of each worker that answered ``/pool``:
    up to 10 requests per worker, until every worker was heard from."""
    seen: dict[int, int | None] = {}
    for _ in range(10 * workers):
        status, body = call(server, "GET", "/pool")
        assert status == 200, body
        report = json.loads(body)
        seen[report["pid"]] = report["checkedout"]
        if len(seen) == workers:
            break
    return seen


def settle(
    target: Target, server: Server, workers: int
) -> tuple[dict[str, int], dict[int, int | None]]:
    """Poll until no connection of the application is running a query or in
    a transaction and no worker has one checked out, or ``TIMEOUT`` passed;
    return the states and pools last seen. (A server ends a streamed
    body's session in ``close()``, which may come after the client has read
    the whole response: hence polling, not one look.)"""
    deadline = time.monotonic() + TIMEOUT
    while True:
        states = target.states()
        busy = {s: n for s, n in states.items() if s != "idle"}
        checked_out = pools(server, workers)
        if not busy and not any(checked_out.values()):
            return states, checked_out
        if time.monotonic() > deadline:
            return states, checked_out
        time.sleep(0.1)


def assert_settled(target: Target, server: Server, workers: int) -> None:
    states, checked_out = settle(target, server, workers)
    assert states, "no connection of the application in pg_stat_activity"
    # From the settled view: a second look could catch the next transaction.
    assert not any(s.startswith("idle in transaction") for s in states), states
    assert "active" not in states, states
    assert set(states) <= {"idle"}, states
    assert checked_out, "no worker answered /pool"
    assert all(n in (0, None) for n in checked_out.values()), checked_out


def assert_clean_log(server: Server, *, errors: int = 0) -> None:
    """The server logged ``errors`` failed requests and, if none, no
    traceback and none of the ``BROKEN`` lines; and the leak guard never
    found a session that an earlier request had left behind."""
    output = server.log_text()
    assert "WsgiScopedWarning" not in output, output
    if errors:
        assert output.count("Error handling request") == errors, output
        return
    assert "Traceback" not in output, output
    broken = [line for line in output.splitlines() if any(b in line for b in BROKEN)]
    assert broken == [], output


def open_response(
    server: Server, path: str, *, rcvbuf: int | None = None
) -> tuple[socket.socket, bytes]:
    """Send ``GET path`` on a raw socket and read the response's head and at
    least one byte of its body; return the socket and the status line."""
    sock = socket.socket()
    try:
        if rcvbuf is not None:  # before connect, so the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", server.port))
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        sock.sendall(head.encode() + b"\r\n")
        data = b""
        while not re.search(rb"\r\n\r\n.", data, re.DOTALL):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except BaseException:
        sock.close()
        raise
    return sock, data.split(b"\r\n", 1)[0]


def hang_up(sock: socket.socket, *, reset: bool) -> None:
    """Close a client socket, with a TCP reset if ``reset`` (a client killed
    or a proxy timing out), else with a FIN (a user closing the tab)."""
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


#: Every server kind, run directly against PostgreSQL.
SERVERS = [
    pytest.param(SYNC, id="gunicorn sync"),
    pytest.param(GTHREAD, id="gunicorn gthread"),
    pytest.param(GEVENT, id="gunicorn gevent"),
    pytest.param(WAITRESS, id="waitress"),
    pytest.param(UWSGI, id="uwsgi"),
]

#: Scenario 1: 60 writes, 20 reads and 20 streams that write while streaming.
MIXED = [
    ("POST", "/items?tag=post"),
    ("GET", "/items/count"),
    ("POST", "/items?tag=post"),
    ("GET", "/stream?n=8&size=4096&write=1&tag=stream"),
    ("POST", "/items?tag=post"),
] * 20


@pytest.mark.server
@pytest.mark.parametrize(
    "setup",
    [
        *SERVERS,
        pytest.param(
            dataclasses.replace(GTHREAD, bouncer="small pool"),
            id="gunicorn gthread, pgbouncer, small pool",
        ),
        pytest.param(
            dataclasses.replace(GTHREAD, bouncer="NullPool"),
            id="gunicorn gthread, pgbouncer, NullPool",
        ),
    ],
)
def test_concurrent_requests_commit_and_leave_no_transaction_open(
    setup: Setup, target: Target, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """100 concurrent requests from 25 clients, more than the server serves
    at once: every one succeeds, every write (streamed ones too) is
    committed, and afterwards PostgreSQL shows no connection of the
    application in a transaction or running a query, and no worker has a
    connection checked out."""
    bouncer = request.getfixturevalue("bouncer") if setup.bouncer else None
    url = bouncer.url.render_as_string(hide_password=False) if bouncer else None
    with serve(setup, target, tmp_path, url=url, bouncer=bouncer) as server:
        results = load(server, MIXED, concurrency=25)
        assert failures(results) == []
        for result in results:
            if result.path.startswith("/stream"):
                assert result.body == (b"x" * 4095 + b"\n") * 8
        # A stream's own work commits in close(), after its last byte went
        # out: count once every request has settled.
        assert_settled(target, server, setup.workers)
        status, body = call(server, "GET", "/items/count")
        assert (status, json.loads(body)) == (200, {"count": 80})
        assert (target.rows("post"), target.rows("stream")) == (60, 20)
    assert_clean_log(server)


@pytest.mark.server
@pytest.mark.parametrize(
    ("setup", "extra"),
    [
        pytest.param(SYNC, ["--preload"], id="gunicorn --preload"),
        # uWSGI forks without running Python's at-fork hooks (#10).
        pytest.param(UWSGI, [], id="uwsgi defaults"),
    ],
)
def test_preload_workers_never_use_the_masters_connection(
    setup: Setup, extra: list[str], target: Target, tmp_path: Path
) -> None:
    """Under ``gunicorn --preload``, and uWSGI's defaults, the master imports
    the application, which queries the database, and forks with that
    connection in its pool: each worker opens connections of its own, and
    the master's connection is still alive afterwards (no child closed it or
    talked on it)."""
    options = {"SERVER_APP_REPORT_IMPORT": "1"}
    with serve(setup, target, tmp_path, extra=extra, options=options) as server:
        imported = re.findall(
            r"server_app imported: pid=(\d+) backend=(\d+)", server.log_text()
        )
        assert len(imported) == 1, server.log_text()
        master, master_backend = (int(n) for n in imported[0])
        # Each request holds its worker a little, so that both workers serve.
        results = load(server, [("GET", "/pid?sleep=0.02")] * 60, concurrency=6)
        assert failures(results) == []
        backends: dict[int, set[int]] = collections.defaultdict(set)
        for result in results:
            report = json.loads(result.body)
            backends[report["pid"]].add(report["backend"])
        assert len(backends) == 2, backends
        assert master not in backends
        first, second = backends.values()
        assert not first & second, backends
        assert master_backend not in first | second, (master_backend, backends)
        assert master_backend in target.backends()
        assert_settled(target, server, workers=2)
    assert server.log_text().count("server_app imported") == 1
    assert_clean_log(server)


@pytest.mark.server
@pytest.mark.parametrize(
    "setup",
    [
        *SERVERS,
        pytest.param(
            dataclasses.replace(GTHREAD, bouncer="NullPool"),
            id="gunicorn gthread, pgbouncer, NullPool",
        ),
    ],
)
def test_client_gone_mid_stream_rolls_back_the_streams_work(
    setup: Setup, target: Target, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Four clients read the head and first bytes of a long streamed body,
    whose generator has written a row, and hang up (two with a reset, two
    with a FIN): none of those rows is committed, while the row of a stream
    read to its end is; and no connection stays in a transaction or checked
    out. One worker, so that ``/pool`` speaks for the whole server."""
    setup = dataclasses.replace(setup, workers=1)
    bouncer = request.getfixturevalue("bouncer") if setup.bouncer else None
    url = bouncer.url.render_as_string(hide_password=False) if bouncer else None
    long = "/stream?n=400&size=65536&delay=0.005&write=1&tag="

    def hang_up_early(number: int) -> bytes:
        sock, status = open_response(server, f"{long}gone{number}", rcvbuf=16384)
        hang_up(sock, reset=number % 2 == 0)
        return status

    with serve(setup, target, tmp_path, url=url, bouncer=bouncer) as server:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            gone = [pool.submit(hang_up_early, number) for number in range(4)]
            complete = pool.submit(
                call,
                server,
                "GET",
                "/stream?n=20&size=65536&delay=0.005&write=1&tag=done",
            )
            statuses = [future.result() for future in gone]
            status, body = complete.result()
        assert statuses == [b"HTTP/1.1 200 OK"] * 4
        assert (status, len(body)) == (200, 20 * 65536)
        assert_settled(target, server, workers=1)
        assert target.rows("gone%") == 0
        assert target.rows("done") == 1
    assert_clean_log(server)


@pytest.mark.server
@pytest.mark.parametrize(
    "commit",
    [
        pytest.param("0", id="commit=False"),
        pytest.param("1", id="commit=True"),
    ],
)
def test_slow_readers_of_materialized_bodies_hold_no_connection(
    commit: str, target: Target, tmp_path: Path
) -> None:
    """8 gthread threads share a pool of 2 connections (``pool_timeout`` 3 s).
    Six clients read a 32 MB list body very slowly, keeping six threads
    busy sending it; meanwhile ``/pool`` shows no connection checked out,
    and 30 writes from other clients all succeed, well before a pool
    timeout: the list body's session, and with ``commit=False`` its
    transaction, ended before its first byte was sent. (With
    ``commit=True`` the commit before the status line releases the
    connection too.)
    """
    setup = dataclasses.replace(GTHREAD, workers=1, threads=8)
    options = {
        "SERVER_APP_POOL_SIZE": "2",
        "SERVER_APP_MAX_OVERFLOW": "0",
        "SERVER_APP_POOL_TIMEOUT": "3",
        "SERVER_APP_COMMIT": commit,
    }
    with serve(setup, target, tmp_path, options=options) as server:
        results, read = beside_slow_readers(
            server, target, "/big?mb=32", [("POST", "/items?tag=fast")] * 30
        )
        seconds = sorted(result.seconds for result in results)
        median = statistics.median(seconds)
        print(
            f"commit={commit == '1'}: 30 writes beside 6 slow readers of 32 MiB:"
            f" median {median:.3f} s, max {seconds[-1]:.3f} s;"
            f" the readers had got {sorted(n for n, _ in read)} bytes"
        )
        assert failures(results, expected=201) == []
        # The test means something only if the readers were still being sent
        # their bodies while the writes ran.
        assert not any(done for _, done in read), read
        assert seconds[-1] < 3, seconds
        assert_settled(target, server, workers=1)
        assert target.rows("fast") == 30
    assert_clean_log(server)


@pytest.mark.server
@pytest.mark.parametrize(
    ("app", "commit", "path"),
    [
        pytest.param("init_app", "0", "/big?mb=24", id="flask init_app, commit=False"),
        pytest.param("init_app", "1", "/big?mb=24", id="flask init_app, commit=True"),
        pytest.param(
            "", "0", "/big?mb=24&object=rendered", id="response object, rendered"
        ),
    ],
)
def test_slow_readers_of_rendered_lazy_bodies_hold_no_connection(
    app: str, commit: str, path: str, target: Target, tmp_path: Path
) -> None:
    """The slow-client scenario of #11 for bodies that are lazy iterables but
    already rendered: a 24 MB Flask response wired with ``init_app``, and a
    Django-style response object announced in ``wsgi_scoped.rendered``. 8
    gthread threads, a pool of 2 (``pool_timeout`` 3 s), six slow readers:
    no connection is held while they read, and 12 fast writes all succeed.
    (Wired with ``app.wsgi_app = db.middleware(app.wsgi_app)``, or with the
    object not announced, the readers hold both connections.)"""
    setup = dataclasses.replace(GTHREAD, workers=1, threads=8)
    options = {
        "SERVER_APP_POOL_SIZE": "2",
        "SERVER_APP_MAX_OVERFLOW": "0",
        "SERVER_APP_POOL_TIMEOUT": "3",
        "SERVER_APP_COMMIT": commit,
        "SERVER_APP_FLASK": app,
    }
    if app:
        pytest.importorskip("flask", reason="Flask is not installed")
    with serve(setup, target, tmp_path, options=options) as server:
        results, read = beside_slow_readers(
            server, target, path, [("POST", "/items?tag=fast")] * 12
        )
        assert failures(results, expected=201) == []
        assert not any(done for _, done in read), read
        assert_settled(target, server, workers=1)
        assert target.rows("fast") == 12
    assert_clean_log(server)


def beside_slow_readers(
    server: Server, target: Target, path: str, requests: list[tuple[str, str]]
) -> tuple[list[Result], list[tuple[int, bool]]]:
    """Six clients start reading ``GET path`` very slowly (4 KiB every 50 ms
    through an 8 KiB window); while they read, check that the one worker
    has no connection checked out and none idle in a transaction, then send
    ``requests`` from 4 other clients. Return their results and, for each
    slow reader, the bytes it had read and whether its body had ended."""
    stop = threading.Event()

    def read_slowly(sock: socket.socket) -> tuple[int, bool]:
        received = 0
        while not stop.is_set():
            chunk = sock.recv(4096)
            if not chunk:
                return received, True
            received += len(chunk)
            stop.wait(0.05)
        return received, False

    socks: list[socket.socket] = []
    try:
        for _ in range(6):
            sock, status = open_response(server, path, rcvbuf=8192)
            socks.append(sock)
            assert status == b"HTTP/1.1 200 OK"
        with concurrent.futures.ThreadPoolExecutor(6) as readers:
            reading = [readers.submit(read_slowly, sock) for sock in socks]
            try:
                assert pools(server, workers=1) == {server_pid(server): 0}
                assert target.idle_in_transaction() == 0
                results = load(server, requests, 4)
            finally:
                stop.set()
            read = [future.result() for future in reading]
    finally:
        for sock in socks:
            hang_up(sock, reset=True)
    return results, read


def server_pid(server: Server) -> int:
    status, body = call(server, "GET", "/pool")
    assert status == 200, body
    return int(json.loads(body)["pid"])


@pytest.mark.server
def test_terminated_connections_are_replaced_and_inflight_work_rolled_back(
    target: Target, tmp_path: Path
) -> None:
    """Every connection of the application is terminated by PostgreSQL while
    one request waits in a query and others sit in the pools: that request
    fails with a 500 and its row is not committed; the requests after it
    all succeed (pre-ping replaces the dead pooled connections), and
    nothing is left in a transaction."""
    with serve(GTHREAD, target, tmp_path) as server:
        before = load(server, [("POST", "/items?tag=before")] * 20, concurrency=8)
        assert failures(before, expected=201) == []
        pooled = target.backends()
        assert pooled
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(call, server, "POST", "/items?tag=inflight&sleep=30")
            deadline = time.monotonic() + TIMEOUT
            while not target.query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = :name"
                " AND state = 'active' AND query LIKE '%pg_sleep%'"
            ):
                assert time.monotonic() < deadline, "the request never ran pg_sleep"
                assert not inflight.done(), inflight.result()
                time.sleep(0.05)
            assert target.terminate() >= 1
            status, body = inflight.result()
        assert status == 500, body
        deadline = time.monotonic() + TIMEOUT
        while pooled & target.backends():
            assert time.monotonic() < deadline, "terminated backends are still there"
            time.sleep(0.05)
        after = load(server, [("POST", "/items?tag=after")] * 20, concurrency=8)
        assert failures(after, expected=201) == []
        assert not pooled & target.backends()
        assert_settled(target, server, workers=2)
        rows = [target.rows(tag) for tag in ("before", "inflight", "after")]
        assert rows == [20, 0, 20]
    # One error: the request in flight; none for the requests after it.
    assert_clean_log(server, errors=1)
