"""Load benchmark: the same small handlers (benchmarks/load_apps.py) served by
``gunicorn -k gthread -w 2 --threads 8`` on 127.0.0.1 against PostgreSQL,
with the request's session ended by wsgi_scoped, a hand-written
``try/finally: Session.remove()``, werkzeug's ``ClosingIterator(...,
Session.remove)`` or Flask-SQLAlchemy.

    python benchmarks/load.py [--duration 10] [--connections 64] [--quick]
                              [--rounds 2] [--url URL] [--rst] [--slow-only]

1.  Throughput: per round, each variant in turn (the order reversed every
    round) gets a fresh server; N keep-alive connections drive
    ``GET /item/<id>`` (one SELECT by primary key, ~1 KB of JSON), then
    ``POST /event`` (one INSERT and commit), each for ``--duration``
    seconds after a short warm-up. Pool: ``pool_size=8, max_overflow=0,
    pool_pre_ping=True`` per worker, for every variant.
2.  Slow clients: 8 connections read ``GET /big`` (~2 MB, one list body)
    through a small receive window, a little at a time, while 16 fast
    connections drive ``GET /item/<id>``; ``pool_size=2, max_overflow=0,
    pool_timeout=5`` per worker. Also run: ``closing_iterator``, which ends
    the session after the body is sent (the control), and wsgi_scoped
    around a Flask application, wired by hand and with ``init_app``, without
    and with ``commit=True``.

Measured, for the requests answered in the last ``--duration`` seconds:
requests/s, p50/p99 latency (request sent to response read), errors
(non-2xx and socket errors), the CPU time of the two gunicorn workers per
request; and from ``pg_stat_activity``, polled every 100 ms by the server's
``application_name``: its peak number of connections, the most ``idle in
transaction`` seen at once and the oldest one. Connections are spread
evenly over the workers during the warm-up (a keep-alive connection stays
with the worker that accepted it, and accepts are uneven).

It prints markdown tables (reST with ``--rst``) and asserts nothing. The
load generator is one Python process (selectors, raw sockets) on the same
2 cores as the server and the database: quote the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import heapq
import http.client
import itertools
import json
import math
import multiprocessing
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from collections import Counter
from importlib.metadata import version

import load_apps
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import insert
from sqlalchemy import text
from sqlalchemy.pool import NullPool

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
URL = load_apps.URL
VARIANTS = load_apps.VARIANTS
BASELINE = "try_finally"
SLOW_VARIANTS = (
    "wsgi_scoped",
    "try_finally",
    "flask_sqlalchemy",
    "closing_iterator",
    *load_apps.FLASK_VARIANTS,
)
WORKERS = 2
THREADS = 8
POOL = {"pool_size": 8, "max_overflow": 0, "pool_timeout": 30.0}
SLOW_POOL = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5.0}
SLOW_CLIENTS = 8
SLOW_FAST_CLIENTS = 16
#: A slow client reads at most this many bytes every SLOW_INTERVAL seconds.
SLOW_CHUNK = 4096
SLOW_INTERVAL = 0.01
SLOW_RCVBUF = 4096
SLOW_MSS = 1448
#: Seconds of the slow-client runs, at most (the whole run stays < 5 min).
SLOW_DURATION = 8.0
POLL_INTERVAL = 0.1
WARMUP = 1.0
#: Seconds to open the connections and spread them over the workers, at most.
PIN_TIMEOUT = 3.0
READ = ("GET", "/item/")
WRITE = ("POST", "/event")
BIG = ("GET", "/big")
READY = ("GET", "/ready")
CAVEAT = (
    "Caveat: 2 cores shared by the load generator (one Python process),"
    " gunicorn's 2 workers, PostgreSQL and whatever else runs. On a busy"
    " machine even the ratios between the plain WSGI variants move by 30%"
    " from run to run: smaller differences are noise (per-request overhead"
    " is benchmarks/overhead.py's job). Errors, connections and the"
    " slow-client behaviour are the robust results."
)


# -- the load generator, run in a child process -------------------------------


class _Conn:
    """One client connection: keep-alive, one request at a time."""

    __slots__ = (
        "sock",
        "index",
        "slow",
        "parked",
        "buf",
        "need",
        "sent_at",
        "count",
        "worker",
        "probe",
    )

    def __init__(self, index: int, slow: bool) -> None:
        self.sock: socket.socket | None = None
        self.index = index
        self.slow = slow
        self.parked = False
        self.buf = bytearray()
        self.need = -1
        self.sent_at = 0.0
        self.count = 0
        #: The server worker this connection is pinned to; "" until known.
        self.worker = ""
        self.probe = True


def _request(kind: tuple[str, str], conn: _Conn) -> bytes:
    method, path = kind if conn.worker else READY
    if path.endswith("/"):
        path += str((conn.index * 131 + conn.count * 7) % load_apps.ROWS + 1)
    length = "Content-Length: 0\r\n" if method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{length}\r\n".encode()


def _parse_head(buf: bytearray) -> tuple[int, int, bool, str] | None:
    """Status, length of the whole response, whether the server closes the
    connection, and X-Worker; ``None`` until the head is complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).lower().split(b"\r\n")
    length, close, worker = 0, False, ""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip() == b"close"
        elif name == b"x-worker":
            worker = value.strip().decode()
    return int(lines[0][9:12]), end + 4 + length, close, worker


def drive(spec: dict[str, t.Any]) -> dict[str, t.Any]:
    """Drive the server on ``spec["port"]``: open and pin the connections,
    warm up, then measure for ``spec["duration"]`` seconds."""
    port, kind = spec["port"], spec["kind"]
    sel = selectors.DefaultSelector()
    order = itertools.count()
    wakeups: list[tuple[float, int, _Conn]] = []
    fast: list[float] = []
    slow: list[float] = []
    statuses: Counter[tuple[bool, int]] = Counter()
    socket_errors: Counter[bool] = Counter()
    received: Counter[bool] = Counter()
    # A keep-alive connection stays with the worker that accepted it, and
    # accepts are uneven (60/4 is common). So each connection first asks
    # GET /ready which worker it has; one that lands on a worker with its
    # share already is opened again. The load starts when every connection
    # is pinned (or after PIN_TIMEOUT), and the balancing ends with the
    # warm-up.
    pinned: Counter[tuple[bool, str]] = Counter()
    share = {
        False: -(-spec["connections"] // WORKERS),
        True: -(-spec.get("slow", 0) // WORKERS),
    }
    conns = [_Conn(n, False) for n in range(spec["connections"])]
    conns += [_Conn(n, True) for n in range(spec.get("slow", 0))]
    started = False
    t0 = t1 = math.inf
    pin_deadline = time.perf_counter() + PIN_TIMEOUT

    def wake(conn: _Conn, at: float) -> None:
        heapq.heappush(wakeups, (at, next(order), conn))

    def send(conn: _Conn) -> None:
        assert conn.sock is not None
        data = _request(BIG if conn.slow else kind, conn)
        conn.probe = not conn.worker
        conn.sent_at = time.perf_counter()
        if conn.sock.send(data) != len(data):
            raise OSError("short send")

    def connect(conn: _Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if conn.slow:
            # Before connect(): a small advertised window, and an Ethernet
            # MSS, without which Linux gives the server's socket a send
            # buffer of ~4 MB on loopback (64 KB MSS), the whole body fits
            # in it, and no server thread ever waits for a slow client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SLOW_MSS)
        sock.settimeout(5)
        conn.sock, conn.buf, conn.need = sock, bytearray(), -1
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, conn)
        send(conn)

    def reset(conn: _Conn, delay: float = 0.05) -> None:
        if conn.sock is not None:
            if not conn.parked:
                sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock, conn.parked = None, False
        if conn.worker:
            pinned[(conn.slow, conn.worker)] -= 1
            conn.worker = ""
        wake(conn, time.perf_counter() + delay)

    def receive(conn: _Conn, now: float) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(SLOW_CHUNK if conn.slow else 262144)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionResetError("connection closed by the server")
        conn.buf += data
        if now >= t0:
            received[conn.slow] += len(data)
        if conn.need < 0:
            head = _parse_head(conn.buf)
            if head is None:
                return
            status, conn.need, close, worker = head
            if not conn.worker:
                if now < t0 and pinned[(conn.slow, worker)] >= share[conn.slow]:
                    reset(conn, 0)
                    return
                conn.worker = worker
                pinned[(conn.slow, worker)] += 1
            elif now >= t0:
                statuses[(conn.slow, status)] += 1
            if close:
                conn.need = -2 - conn.need  # close after this response
        need = conn.need if conn.need >= 0 else -2 - conn.need
        if len(conn.buf) < need:
            return
        if now >= t0 and not conn.probe:
            (slow if conn.slow else fast).append(now - conn.sent_at)
        conn.count += 1
        if conn.need < 0:
            reset(conn)
            return
        del conn.buf[:need]
        conn.need = -1
        if started:
            send(conn)

    for conn in conns:
        wake(conn, 0)
    spread: tuple[str, str] | None = None
    cpu = 0.0
    while (now := time.perf_counter()) < t1:
        if not started and (sum(pinned.values()) == len(conns) or now >= pin_deadline):
            started = True
            t0 = now + spec["warmup"]
            t1 = t0 + spec["duration"]
            for conn in conns:
                if conn.worker and conn.sock is not None and conn.need == -1:
                    send(conn)  # its first request; idle since its probe
        if spread is None and now >= t0:
            spread = _spread(pinned, False), _spread(pinned, True)
            cpu = _cpu_seconds(spec["pids"])
        while wakeups and wakeups[0][0] <= now:
            conn = heapq.heappop(wakeups)[2]
            try:
                if conn.sock is None:
                    connect(conn)
                elif conn.parked:
                    conn.parked = False
                    sel.register(conn.sock, selectors.EVENT_READ, conn)
            except OSError:
                socket_errors[conn.slow] += now >= t0
                reset(conn)
        timeout = min(t1, pin_deadline if not started else t1) - now
        if wakeups:
            timeout = min(timeout, wakeups[0][0] - now)
        for key, _ in sel.select(max(timeout, 0)):
            conn = key.data
            now = time.perf_counter()
            try:
                receive(conn, now)
            except (OSError, ValueError):
                socket_errors[conn.slow] += now >= t0
                reset(conn)
                continue
            if conn.slow and conn.sock is not None:
                # Read a little, then sleep: stop watching the socket.
                sel.unregister(conn.sock)
                conn.parked = True
                wake(conn, now + SLOW_INTERVAL)
    cpu = _cpu_seconds(spec["pids"]) - cpu
    # Requests still unanswered, and waiting for over a second, at the end.
    waiting = [
        t1 - conn.sent_at
        for conn in conns
        if conn.sock is not None and not conn.slow and not conn.probe
    ]
    waiting = [age for age in waiting if age > 1.0]
    for conn in conns:
        if conn.sock is not None:
            conn.sock.close()
    sel.close()
    fast.sort()
    non_2xx: Counter[bool] = Counter()
    for (is_slow, code), n in statuses.items():
        if not 200 <= code < 300:
            non_2xx[is_slow] += n
    return {
        "rps": len(fast) / spec["duration"],
        "cpu": cpu / max(len(fast) + len(slow), 1),
        "p50": _quantile(fast, 0.50),
        "p99": _quantile(fast, 0.99),
        "errors": non_2xx[False] + socket_errors[False],
        "socket_errors": socket_errors[False],
        "slow_errors": non_2xx[True] + socket_errors[True],
        "statuses": {f"{code}{' slow' * s}": n for (s, code), n in statuses.items()},
        "waiting": len(waiting),
        "waiting_max": max(waiting, default=0.0),
        "fast_workers": (spread or ("-", "-"))[0],
        "slow_workers": (spread or ("-", "-"))[1],
        "slow_done": len(slow),
        "slow_rate": received[True] / spec["duration"] / max(spec.get("slow", 0), 1),
    }


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by the processes ``pids``."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def _spread(pinned: Counter[tuple[bool, str]], slow: bool) -> str:
    """Connections per server worker, most first: ``32/32``."""
    counts = sorted((n for (s, _), n in pinned.items() if s is slow), reverse=True)
    return "/".join(map(str, counts)) or "-"


# -- the database, the monitor, the server ------------------------------------

_ACTIVITY = text(
    "SELECT count(*),"
    " count(*) FILTER (WHERE state LIKE 'idle in transaction%'),"
    " coalesce(extract(epoch FROM clock_timestamp() - min(state_change)"
    "   FILTER (WHERE state LIKE 'idle in transaction%')), 0)"
    " FROM pg_stat_activity WHERE application_name = :name"
)


def setup_database(url: str) -> Engine:
    """Create and fill the tables; return an engine for the monitor."""
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    load_apps.Base.metadata.drop_all(engine)
    load_apps.Base.metadata.create_all(engine)
    with engine.connect() as connection:
        connection.execute(insert(load_apps.Item), load_apps.make_rows())
        connection.execute(text(f"ANALYZE {load_apps.Item.__tablename__}"))
    return engine


class Monitor(threading.Thread):
    """Poll ``pg_stat_activity`` for one ``application_name``; the samples
    go to the current ``phase``."""

    def __init__(self, engine: Engine, name: str) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.name = name
        self.phase = ""
        self.stats: dict[str, dict[str, float]] = {}
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            with self.engine.connect() as connection:
                while not self._done.is_set():
                    row = connection.execute(_ACTIVITY, {"name": self.name}).one()
                    stats = self.stats.setdefault(
                        self.phase, {"peak": 0, "idle_tx": 0, "idle_tx_age": 0.0}
                    )
                    stats["peak"] = max(stats["peak"], row[0])
                    stats["idle_tx"] = max(stats["idle_tx"], row[1])
                    stats["idle_tx_age"] = max(stats["idle_tx_age"], float(row[2]))
                    self._done.wait(POLL_INTERVAL)
        except BaseException as error:  # reported by the main thread
            self.error = error

    def stop(self) -> None:
        self._done.set()
        self.join()
        if self.error is not None:
            raise self.error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``gunicorn -k gthread -w 2 --threads 8`` serving one variant."""

    def __init__(self, variant: str, url: str, name: str, pool: dict[str, float]):
        self.port = _free_port()
        self.log = tempfile.TemporaryFile()
        options = ", ".join(f"{key}={value!r}" for key, value in pool.items())
        call = f"create_app({variant!r}, url={url!r}, app_name={name!r}, {options})"
        command = [
            sys.executable, "-m", "gunicorn", "-k", "gthread",
            "-w", str(WORKERS), "--threads", str(THREADS),
            "-b", f"127.0.0.1:{self.port}", "--chdir", HERE, "--pythonpath", ROOT,
            "--graceful-timeout", "3", "--log-level", "warning",
            f"load_apps:{call}",
        ]  # fmt: skip
        self.workers: list[int] = []
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=self.log, start_new_session=True
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until both workers answered ``/ready``."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < WORKERS:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn did not start:\n{self.output()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, 2)
                connection.request("GET", "/ready")
                response = connection.getresponse()
                response.read()
                seen.add(response.getheader("X-Worker", ""))
                self.workers = sorted(map(int, seen))
                connection.close()
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def errors(self) -> tuple[int, str]:
        """Requests that failed in the application, and the last reason."""
        lines = self.output().splitlines()
        failed = sum(
            "Error handling request" in line or "Exception on /" in line
            for line in lines
        )
        reasons = [line for line in lines if line and not line[0].isspace()]
        reasons = [line for line in reasons if "Error:" in line]
        return failed, reasons[-1] if reasons else ""


def serve(
    variant: str,
    args: argparse.Namespace,
    monitor_engine: Engine,
    executor: concurrent.futures.Executor,
    pool: dict[str, float],
    phases: list[tuple[str, dict[str, t.Any]]],
) -> dict[str, dict[str, t.Any]]:
    """Start a server for ``variant``, drive each phase, stop it."""
    name = f"wsgi_scoped_load_{variant}_{os.getpid()}"
    monitor = Monitor(monitor_engine, name)
    monitor.phase = phases[0][0]
    monitor.start()
    results: dict[str, dict[str, t.Any]] = {}
    server = Server(variant, args.url, name, pool)
    try:
        server.wait_ready()
        for phase, spec in phases:
            monitor.phase = phase
            spec = {"port": server.port, "pids": server.workers, **spec}
            spec.setdefault("warmup", WARMUP)
            results[phase] = executor.submit(drive, spec).result()
    finally:
        server.stop()
        monitor.stop()
    failed, reason = server.errors()
    for phase, result in results.items():
        result.update(monitor.stats.get(phase, {}))
    results[phases[-1][0]].update(server_failed=failed, server_reason=reason)
    return results


# -- the scenarios and the tables -------------------------------------------


def throughput(
    args: argparse.Namespace, engine: Engine, executor: concurrent.futures.Executor
) -> dict[tuple[str, str], list[dict[str, t.Any]]]:
    """Each round: every variant, read then write phase; order alternates."""
    runs: dict[tuple[str, str], list[dict[str, t.Any]]] = {}
    phases = [
        ("read", {"kind": READ, "connections": args.connections}),
        ("write", {"kind": WRITE, "connections": args.connections, "warmup": 0.5}),
    ]
    for phase in phases:
        phase[1]["duration"] = args.duration
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            print(f"round {round_ + 1}: {variant}", file=sys.stderr, flush=True)
            results = serve(variant, args, engine, executor, POOL, phases)
            for phase, result in results.items():
                result["round"] = round_
                runs.setdefault((phase, variant), []).append(result)
    return runs


def slow_clients(
    args: argparse.Namespace, engine: Engine, executor: concurrent.futures.Executor
) -> dict[str, dict[str, t.Any]]:
    spec = {
        "kind": READ,
        "connections": SLOW_FAST_CLIENTS,
        "slow": SLOW_CLIENTS,
        "duration": min(args.duration, SLOW_DURATION),
    }
    runs = {}
    for variant in SLOW_VARIANTS:
        print(f"slow clients: {variant}", file=sys.stderr, flush=True)
        runs[variant] = serve(
            variant, args, engine, executor, SLOW_POOL, [("slow", spec)]
        )["slow"]
    return runs


def _errors(result: dict[str, t.Any]) -> str:
    socket_errors = result["socket_errors"]
    errors = str(result["errors"])
    return f"{errors} ({socket_errors} socket)" if socket_errors else errors


def _waiting(result: dict[str, t.Any]) -> str:
    if not result["waiting"]:
        return "0"
    return f"{result['waiting']} (oldest {result['waiting_max']:.1f} s)"


def _ratio(
    results: list[dict[str, t.Any]], base: dict[int, dict[str, t.Any]], key: str
) -> str:
    """The median of the ratios to the baseline's same round, and their range."""
    ratios = [r[key] / (base[r["round"]][key] or math.nan) for r in results]
    median = f"{statistics.median(ratios):.2f}"
    return f"{median} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios[1:] else median


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def throughput_rows(
    runs: dict[tuple[str, str], list[dict[str, t.Any]]],
) -> list[list[str]]:
    rows = []
    for phase in ("read", "write"):
        base = {r["round"]: r for r in runs[(phase, BASELINE)]}
        for variant in VARIANTS:
            results = runs[(phase, variant)]
            ratio = _ratio(results, base, "rps")
            cpu_ratio = _ratio(results, base, "cpu")
            errors = sum(r["errors"] for r in results)
            rows.append(
                [
                    "SELECT by pk" if phase == "read" else "INSERT + commit",
                    variant,
                    f"{statistics.median(r['rps'] for r in results):.0f}",
                    ratio,
                    f"{statistics.median(r['cpu'] for r in results) * 1e3:.2f}",
                    cpu_ratio,
                    _ms(statistics.median(r["p50"] for r in results)),
                    _ms(statistics.median(r["p99"] for r in results)),
                    str(errors),
                    str(max(r.get("peak", 0) for r in results)),
                    str(max(r.get("idle_tx", 0) for r in results)),
                    " ".join(r["fast_workers"] for r in results),
                ]
            )
    return rows


THROUGHPUT_HEADERS = [
    "endpoint",
    "variant",
    "req/s",
    f"vs {BASELINE}",
    "server CPU ms/req",
    f"vs {BASELINE}",
    "p50 ms",
    "p99 ms",
    "errors",
    "peak PG conns",
    "max idle in tx",
    "conns per worker",
]
SLOW_HEADERS = [
    "variant",
    "fast req/s",
    "fast p50 ms",
    "fast p99 ms",
    "fast errors",
    "fast waiting > 1 s at end",
    "slow client KB/s",
    "slow errors",
    "peak PG conns",
    "max idle in tx",
    "oldest idle in tx s",
    "slow per worker",
]


def slow_rows(runs: dict[str, dict[str, t.Any]]) -> list[list[str]]:
    return [
        [
            variant,
            f"{r['rps']:.0f}",
            _ms(r["p50"]),
            _ms(r["p99"]),
            _errors(r),
            _waiting(r),
            f"{r['slow_rate'] / 1e3:.0f}",
            str(r["slow_errors"]),
            str(r.get("peak", 0)),
            str(r.get("idle_tx", 0)),
            f"{r.get('idle_tx_age', 0.0):.2f}",
            r["slow_workers"],
        ]
        for variant, r in runs.items()
    ]


def table(headers: list[str], rows: list[list[str]], rst: bool) -> list[str]:
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    if rst:
        rule = "  ".join("=" * w for w in widths)
        line = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]
        ]
        return [rule, line[0], rule, *line[1:], rule]
    return [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in [headers, ["-" * w for w in widths], *rows]
    ]


def header(args: argparse.Namespace, engine: Engine) -> list[str]:
    with engine.connect() as connection:
        server = connection.execute(text("SHOW server_version")).scalar_one()
    packages = ", ".join(
        f"{name} {version(name)}"
        for name in ("gunicorn", "SQLAlchemy", "psycopg", "Flask", "Flask-SQLAlchemy")
    )
    return [
        f"Python {platform.python_version()}, PostgreSQL {server}, {packages};"
        f" {os.cpu_count()} CPUs.",
        f"gunicorn -k gthread -w {WORKERS} --threads {THREADS}; {args.rounds}"
        f" rounds of {args.duration:g} s per endpoint and variant,"
        f" {args.connections} keep-alive connections; medians over rounds;"
        f" ratios computed within each round: median (min-max).",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 s runs")
    parser.add_argument("--url", default=os.environ.get("LOAD_DATABASE_URL", URL))
    parser.add_argument("--rst", action="store_true", help="reST tables")
    parser.add_argument(
        "--slow-only", action="store_true", help="only the slow-client runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 3.0
    started = time.monotonic()
    engine = setup_database(args.url)
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            runs = {} if args.slow_only else throughput(args, engine, pool)
            slow = slow_clients(args, engine, pool)
        lines = header(args, engine)[: 1 if args.slow_only else None]
    finally:
        load_apps.Base.metadata.drop_all(engine)
    if runs:
        rows = throughput_rows(runs)
        lines += ["", *table(THROUGHPUT_HEADERS, rows, args.rst), ""]
    size = len(json.dumps(load_apps.make_rows())) / 1e6
    lines.append(
        f"Slow clients: {SLOW_CLIENTS} connections read GET /big"
        f" ({size:.1f} MB) {SLOW_CHUNK} bytes every"
        f" {SLOW_INTERVAL * 1000:g} ms (SO_RCVBUF {SLOW_RCVBUF}, MSS {SLOW_MSS}) while"
        f" {SLOW_FAST_CLIENTS} connections drive GET /item/<id>; pool_size=2,"
        f" max_overflow=0, pool_timeout=5 per worker; one run of"
        f" {min(args.duration, SLOW_DURATION):g} s per variant."
    )
    lines += ["", *table(SLOW_HEADERS, slow_rows(slow), args.rst), ""]
    failed = [
        (f"{variant} ({phase})", r)
        for (phase, variant), results in runs.items()
        for r in results
        if r.get("server_failed")
    ]
    for label, result in [*failed, *slow.items()]:
        if result.get("server_failed"):
            lines.append(
                f"{label}: {result['server_failed']} requests failed in the"
                f" application; last: {result['server_reason']}"
            )
    lines += [f"Total time {time.monotonic() - started:.0f} s. {CAVEAT}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
