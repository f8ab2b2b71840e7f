"""Read replicas under write-then-read clients: stale reads, the share of
reads a replica served, and read latency, for four ways of routing (#13).

The benchmark starts its own PostgreSQL primary and streaming hot standby on
free loopback ports (``tests/replica_pair.py``). Client threads each POST a
row, then GET it by its id, carrying back what the POST's response gave
them, against one WSGI application (``commit=True``) under gunicorn
(gthread, 2 workers of clients / 2 threads, on 127.0.0.1, one keep-alive
connection per client), or called in this process (``--in-process``: the
clients share the server's interpreter, so every round trip also waits for
the GIL). Strategies:

-   *primary only*: ``Database(primary)``, no replica;
-   *replica, no check*: ``Database(primary, replicas=[standby])``, and the
    client drops the WAL position (a router: GET reads a replica, always);
-   *2 s pin*: the same, and the POST's response says "primary until now +
    2 s", which the client sends back; the handler calls ``use_primary()``
    while it holds (Rails' ``DatabaseSelector``);
-   *ours*: the client sends back ``X-Wsgi-Scoped-Lsn``; ``replica_wait``
    is the default.

Rounds are interleaved (the order of the strategies turns each round), and
percentiles are taken over every read of every round.

    python benchmarks/replicas.py                # 8 clients, 5 rounds of 100 pairs
    python benchmarks/replicas.py --quick        # 2 rounds of 20: a smoke run, noisy
    python benchmarks/replicas.py --in-process --clients 1

It asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import typing as t
import wsgiref.util
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import replica_pair  # noqa: E402

from wsgi_scoped import Database  # noqa: E402
from wsgi_scoped.replicas import LSN_HEADER  # noqa: E402

WSGIEnvironment = dict[str, t.Any]
StartResponse = t.Callable[..., t.Any]
WSGIApplication = t.Callable[[WSGIEnvironment, StartResponse], t.Iterable[bytes]]
#: A client's way to send a request: (method, path, query, headers) -> (body,
#: response headers).
Send = t.Callable[[str, str, str, dict[str, str]], tuple[str, dict[str, str]]]
#: The pin's response header, sent back by the client.
PIN_HEADER = "X-Primary-Until"
PIN_SECONDS = 2.0
#: Each strategy's path, and the response headers its client sends back.
STRATEGIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "primary only": ("/primary", ()),
    "replica, no check": ("/no-check", ()),
    "2 s pin": ("/pin", (PIN_HEADER,)),
    "ours": ("/ours", (LSN_HEADER,)),
}


def handler(db: Database, pin: bool) -> WSGIApplication:
    """POST inserts a row and answers its id; GET ``?id`` answers whether
    the row was found, and whether a replica served the read."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        headers: list[tuple[str, str]] = []
        if pin and float(environ.get("HTTP_X_PRIMARY_UNTIL", 0)) > time.time():
            db.use_primary()
        session = db()
        if environ["REQUEST_METHOD"] == "POST":
            insert = text("INSERT INTO item (name) VALUES ('x') RETURNING id")
            body = str(session.execute(insert).scalar_one())
            if pin:
                headers.append((PIN_HEADER, str(time.time() + PIN_SECONDS)))
        else:
            query = text("SELECT 1 FROM item WHERE id = :id")
            found = session.execute(query, {"id": int(environ["QUERY_STRING"])})
            replica = session.connection().engine is not db.engine
            body = f"{found.first() is not None:d}{replica:d}"
        start_response("200 OK", headers)
        return [body.encode()]

    return app


def build(primary: str, standby: str, pool_size: int) -> list[Database]:
    """The strategies' databases, in the order of ``STRATEGIES``."""
    pool = {"pool_size": pool_size, "max_overflow": pool_size}
    replicated = [Database(primary, replicas=[standby], **pool) for _ in range(3)]
    return [Database(primary, **pool), *replicated]


def dispatcher(databases: list[Database]) -> WSGIApplication:
    """One application serving each strategy at its path."""
    apps = {
        path: db.middleware(handler(db, name == "2 s pin"), commit=True)
        for (name, (path, _)), db in zip(STRATEGIES.items(), databases, strict=True)
    }

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        return apps[environ["PATH_INFO"]](environ, start_response)

    return app


def served() -> WSGIApplication:
    """gunicorn's application (``replicas:served()``), on the pair that the
    environment names."""
    env = os.environ
    pool = int(env["REPLICAS_POOL"])
    return dispatcher(build(env["REPLICAS_PRIMARY"], env["REPLICAS_STANDBY"], pool))


def in_process(app: WSGIApplication) -> Send:
    """Requests to ``app``, called in the client's thread."""

    def send(
        method: str, path: str, query: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
        for name, value in headers.items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        wsgiref.util.setup_testing_defaults(environ)
        sent: dict[str, str] = {}
        body = app(environ, lambda status, h, exc_info=None: sent.update(h))
        try:
            return b"".join(body).decode(), sent
        finally:
            getattr(body, "close", lambda: None)()

    return send


def over_http(port: int) -> Send:
    """Requests on one keep-alive connection to 127.0.0.1:``port``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(
        method: str, path: str, query: str, headers: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        connection.request(method, f"{path}?{query}", headers=headers)
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {body}")
        return body, dict(response.getheaders())

    return send


@contextlib.contextmanager
def gunicorn(pair: replica_pair.Pair, threads: int) -> t.Iterator[int]:
    """Serve :func:`served` under gunicorn on a free port; yield the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "2"]
    command += ["--threads", str(threads), "-b", f"127.0.0.1:{port}"]
    command += ["--log-level", "warning"]
    env = {
        **os.environ,
        "REPLICAS_PRIMARY": pair.primary.render_as_string(),
        "REPLICAS_STANDBY": pair.standby.render_as_string(),
        "REPLICAS_POOL": str(threads),
    }
    here = Path(__file__).resolve().parent
    server = subprocess.Popen([*command, "replicas:served()"], cwd=here, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                over_http(port)("GET", "/primary", "0", {})
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


class Result:
    """Every read of one strategy: latency (ms), found, served by a replica;
    and the latency of the writes."""

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.stale = 0
        self.on_replica = 0
        self.write_latency: list[float] = []


def client(
    send: Send,
    strategy: str,
    pairs: int,
    start: threading.Barrier,
    result: Result,
    lock: threading.Lock,
) -> None:
    """``pairs`` times: a write, then a read of it with what was carried."""
    path, carried = STRATEGIES[strategy]
    latency, writes, stale, on_replica = [], [], 0, 0
    start.wait()
    for _ in range(pairs):
        began = time.perf_counter()
        row, headers = send("POST", path, "", {})
        writes.append((time.perf_counter() - began) * 1000)
        sent = {name: headers[name] for name in carried if name in headers}
        began = time.perf_counter()
        body, _ = send("GET", path, row, sent)
        latency.append((time.perf_counter() - began) * 1000)
        stale += body[0] == "0"
        on_replica += body[1] == "1"
    with lock:
        result.latency += latency
        result.write_latency += writes
        result.stale += stale
        result.on_replica += on_replica


def run_round(
    sender: t.Callable[[], Send],
    strategy: str,
    clients: int,
    pairs: int,
    result: Result,
) -> None:
    """``clients`` threads, each with its own ``sender()``, started at once."""
    start = threading.Barrier(clients)
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=client, args=(sender(), strategy, pairs, start, result, lock)
        )
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--pairs", type=int, default=100, help="per client and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-process", action="store_true", help="no server")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 pairs")
    options = parser.parse_args()
    pairs, rounds = (20, 2) if options.quick else (options.pairs, options.rounds)
    reason = replica_pair.unusable_reason()
    if reason is not None:
        sys.exit(f"The benchmark needs a primary + standby pair: {reason}")
    threads = max(1, options.clients // 2)
    sender: t.Callable[[], Send]
    with replica_pair.run_pair() as pair, contextlib.ExitStack() as stack:
        if options.in_process:
            urls = (pair.primary.render_as_string(), pair.standby.render_as_string())
            databases = build(*urls, options.clients)
            for db in databases:
                for engine in (db.engine, *db.replicas):
                    stack.callback(engine.dispose)
            app = dispatcher(databases)
            sender, where = (lambda: in_process(app)), "in process"
        else:
            port = stack.enter_context(gunicorn(pair, threads))
            sender = lambda: over_http(port)  # noqa: E731
            where = f"gunicorn gthread, 2 workers x {threads} threads"
        results = {name: Result() for name in STRATEGIES}
        names = list(STRATEGIES)
        for name in names:  # pools filled, nothing recorded
            run_round(sender, name, options.clients, 5, Result())
        for number in range(rounds):
            turn = number % len(names)
            for name in names[turn:] + names[:turn]:
                run_round(sender, name, options.clients, pairs, results[name])
    print(
        f"# PostgreSQL primary + streaming hot standby on loopback, {where};"
        f" {options.clients} clients, {rounds} rounds of {pairs} write-then-read"
        f" pairs each; Python {sys.version.split()[0]}"
    )
    report(results)


def report(results: dict[str, Result]) -> None:
    base = results["primary only"]
    base_p50, base_p99 = statistics.median(base.latency), p99(base.latency)
    header = (
        "strategy            reads  stale  stale %  on replica  read p50  read p99"
        "  p50 ratio  p99 ratio  write p50"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        reads = len(result.latency)
        p50, p99_ = statistics.median(result.latency), p99(result.latency)
        print(
            f"{name:<18} {reads:>6} {result.stale:>6} {result.stale / reads:>8.1%}"
            f" {result.on_replica / reads:>11.1%} {p50:>6.2f} ms {p99_:>6.2f} ms"
            f" {p50 / base_p50:>10.2f} {p99_ / base_p99:>10.2f}"
            f" {statistics.median(result.write_latency):>7.2f} ms"
        )
    ours = results["ours"]
    gap = statistics.median(ours.latency) - base_p50
    share = ours.on_replica / len(ours.latency)
    print()
    print("goal (#13)                          ours")
    print(f"0 stale reads                       {ours.stale}")
    print(f">= 95% of reads on replicas         {share:.1%}")
    print(f"read p50 within 1 ms of primary     {gap:+.2f} ms")


if __name__ == "__main__":
    main()
