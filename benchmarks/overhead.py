"""Per-request overhead of ending a request's SQLAlchemy session: the bare
application, the classic recipes, wsgi_scoped, and the framework
integrations (Flask-SQLAlchemy, pyramid_tm, repoze.tm2), on the same three
handlers.

Every application is called in process, as a server would call it: a copy of
one prebuilt environ per request, a no-op ``start_response``, the body
iterated and closed. Each round serves N requests per variant, in slices
that take turns with the same handler's other variants in a shuffled order.
The table gives, per variant, the median over the rounds of the time per
request, and ratios and differences computed within each round (so that
drift of the machine cancels out), then reduced to their median.

    python benchmarks/overhead.py [--requests N] [--rounds R] [--quick]
                                  [--clock {wall,cpu}]

It prints two markdown tables (results, then target checks) and asserts
nothing. See README.rst in this directory.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import typing as t
import wsgiref.util
from dataclasses import dataclass
from dataclasses import field
from importlib.metadata import version

from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import delete
from sqlalchemy import event
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import ScopedSessionMiddleware

App = t.Callable[[dict[str, t.Any], t.Callable[..., t.Any]], t.Iterable[bytes]]

#: A batch of N requests runs as this many slices of N / SLICES.
SLICES = 10
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "2")]
SELECT_1 = text("SELECT 1")
CAVEAT = (
    "Caveat: a small (2-core), shared and noisy machine. Absolute times vary"
    " from run to run by 10% or more, and differences of a few µs between"
    " variants costing 100 µs or more are within the noise: quote the"
    " ratios, computed round by round, not the times."
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


@event.listens_for(Engine, "connect")
def _pragmas(dbapi_connection: t.Any, record: t.Any) -> None:
    # No fsync and an in-memory rollback journal: a durable commit costs
    # milliseconds here and would drown what is measured (WAL stays off).
    dbapi_connection.execute("PRAGMA synchronous=OFF")
    dbapi_connection.execute("PRAGMA journal_mode=MEMORY")


# The three handlers. ``own(factory)`` does the work in a session of its own
# (``with Session() as s:``), as an application without session handling
# must; ``shared(session, commit)`` does it in the request's session and
# commits only if ``commit`` (otherwise a transaction manager does).


def _nothing_own(factory: sessionmaker[t.Any]) -> None:
    pass


def _nothing_shared(session: t.Any, commit: bool) -> None:
    pass


def _select_own(factory: sessionmaker[t.Any]) -> None:
    with factory() as session:
        session.scalar(SELECT_1)


def _select_shared(session: t.Any, commit: bool) -> None:
    session.scalar(SELECT_1)


def _insert_own(factory: sessionmaker[t.Any]) -> None:
    with factory() as session:
        session.add(Item(name="x"))
        session.commit()


def _insert_shared(session: t.Any, commit: bool) -> None:
    session.add(Item(name="x"))
    if commit:
        session.commit()


@dataclass
class Handler:
    name: str
    method: str
    own: t.Callable[[sessionmaker[t.Any]], None]
    shared: t.Callable[[t.Any, bool], None]
    writes: bool = False
    #: Batches run ``scale * N`` requests: the cheap handler's batches would
    #: otherwise last a millisecond, shorter than a time slice.
    scale: int = 1


HANDLERS = [
    Handler("no DB", "GET", _nothing_own, _nothing_shared, scale=10),
    Handler("SELECT 1", "GET", _select_own, _select_shared),
    Handler("INSERT + commit", "POST", _insert_own, _insert_shared, writes=True),
]


@dataclass
class Variant:
    handler: Handler
    key: str
    label: str
    baseline: str | None
    app: App
    environ: dict[str, t.Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)


def make_environ(method: str) -> dict[str, t.Any]:
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "CONTENT_LENGTH": "0" if method == "POST" else "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": wsgiref.util.FileWrapper,
    }


def _write(data: bytes) -> None:
    pass


def start_response(
    status: str, headers: list[tuple[str, str]], exc_info: t.Any = None
) -> t.Callable[[bytes], None]:
    return _write


#: ``wall``: elapsed time, which counts the moments the process waited for a
#: CPU; ``cpu``: this thread's CPU time, which does not (and so varies far
#: less on a shared machine).
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
clock = CLOCKS["wall"]


def run_batch(app: App, environ: dict[str, t.Any], n: int) -> float:
    """Serve ``n`` requests like a server; return µs per request."""
    copy = environ.copy
    sr = start_response
    now = clock
    gc.collect()
    start = now()
    for _ in range(n):
        body = app(copy(), sr)
        try:
            for _chunk in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
    return (now() - start) / n / 1000


# -- the applications ---------------------------------------------------------


def plain_app(work: t.Callable[[], None]) -> App:
    def app(environ: dict[str, t.Any], start_response: t.Any) -> list[bytes]:
        work()
        start_response("200 OK", HEADERS)
        return [b"ok"]

    return app


def try_finally(app: App, registry: scoped_session[t.Any]) -> App:
    """The classic recipe."""

    def middleware(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        try:
            return app(environ, start_response)
        finally:
            registry.remove()

    return middleware


def closing_iterator(app: App, registry: scoped_session[t.Any]) -> App:
    from werkzeug.wsgi import ClosingIterator

    def middleware(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        return ClosingIterator(app(environ, start_response), registry.remove)

    return middleware


def flask_app(
    make_view: t.Callable[[t.Any], t.Callable[[], str]],
    database_url: str | None = None,
) -> App:
    """A Flask app with one view, ``make_view(db)``; ``db`` is the
    Flask-SQLAlchemy extension if ``database_url`` is given, else ``None``."""
    from flask import Flask

    app = Flask(__name__)
    db = None
    if database_url is not None:
        from flask_sqlalchemy import SQLAlchemy

        app.config["SQLALCHEMY_DATABASE_URI"] = database_url
        db = SQLAlchemy(app)
    app.add_url_rule("/", "index", make_view(db), methods=["GET", "POST"])
    return app


def pyramid_app(view: t.Callable[[t.Any], t.Any], tm: bool = False) -> App:
    from pyramid.config import Configurator

    with Configurator(settings={}) as config:
        if tm:
            config.include("pyramid_tm")
        config.add_route("index", "/")
        config.add_view(view, route_name="index")
        return config.make_wsgi_app()  # type: ignore[no-any-return]


def build_variants(database_url: str, engine: Engine) -> list[Variant]:
    import zope.sqlalchemy
    from pyramid.response import Response
    from repoze.tm import TM

    factory = sessionmaker(engine)
    Session = scoped_session(factory)
    # stats=True installs listeners on its engine: an engine of its own, so
    # that the other variants do not run them.
    StatsSession = scoped_session(sessionmaker(create_engine(database_url)))
    # zope.sqlalchemy listens on the sessionmaker's own class: a second one.
    ZopeSession = scoped_session(sessionmaker(engine))
    zope.sqlalchemy.register(ZopeSession)

    variants: list[Variant] = []
    for h in HANDLERS:

        def own(h: Handler = h) -> None:
            h.own(factory)

        def handler_commits(h: Handler = h) -> None:
            h.shared(Session, True)

        def stats_handler_commits(h: Handler = h) -> None:
            h.shared(StatsSession, True)

        def middleware_commits(h: Handler = h) -> None:
            h.shared(Session, False)

        def zope_work(h: Handler = h) -> None:
            h.shared(ZopeSession, False)

        def flask_view(db: None, h: Handler = h) -> t.Callable[[], str]:
            def view() -> str:
                h.own(factory)
                return "ok"

            return view

        def flask_sqla_view(db: t.Any, h: Handler = h) -> t.Callable[[], str]:
            def view() -> str:
                h.shared(db.session, True)
                return "ok"

            return view

        def pyramid_view(request: t.Any, h: Handler = h) -> Response:
            h.own(factory)
            return Response(b"ok", content_type="text/plain")

        def pyramid_tm_view(request: t.Any, h: Handler = h) -> Response:
            h.shared(ZopeSession, False)
            return Response(b"ok", content_type="text/plain")

        scoped = plain_app(handler_commits)
        rows: list[tuple[str, str, str | None, App]] = [
            ("bare", "bare app", None, plain_app(own)),
            ("try", "try/finally remove()", "bare", try_finally(scoped, Session)),
            (
                "closing",
                "werkzeug ClosingIterator(remove)",
                "bare",
                closing_iterator(scoped, Session),
            ),
            ("ws", "wsgi_scoped", "bare", ScopedSessionMiddleware(scoped, Session)),
            (
                "ws_stats",
                "wsgi_scoped stats=True",
                "bare",
                ScopedSessionMiddleware(
                    plain_app(stats_handler_commits), StatsSession, stats=True
                ),
            ),
            (
                "ws_commit",
                "wsgi_scoped commit=True",
                "bare",
                ScopedSessionMiddleware(
                    plain_app(middleware_commits), Session, commit=True
                ),
            ),
            ("flask", "Flask", "bare", flask_app(flask_view)),
            (
                "fsa",
                "Flask + Flask-SQLAlchemy",
                "flask",
                flask_app(flask_sqla_view, database_url),
            ),
            ("pyramid", "Pyramid", "bare", pyramid_app(pyramid_view)),
            (
                "pyramid_tm",
                "Pyramid + pyramid_tm + zope.sqlalchemy",
                "pyramid",
                pyramid_app(pyramid_tm_view, tm=True),
            ),
            (
                "repoze",
                "repoze.tm2 + zope.sqlalchemy",
                "bare",
                TM(plain_app(zope_work)),
            ),
        ]
        for key, label, baseline, app in rows:
            variants.append(
                Variant(h, key, label, baseline, app, make_environ(h.method))
            )
    return variants


# -- running ------------------------------------------------------------------


def count_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(Item)) or 0


def clear_rows(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(delete(Item))


def warm_up(variants: list[Variant], engine: Engine, n: int) -> None:
    """Run each variant ``n`` times; check it answers, and that a writing
    handler's rows were committed (a benchmark of work silently rolled back
    would measure nothing)."""
    for v in variants:
        body = v.app(v.environ.copy(), start_response)
        try:
            produced = b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()
        if produced != b"ok":
            raise RuntimeError(f"{v.handler.name} / {v.label} answered {produced!r}")
        before = count_rows(engine)
        run_batch(v.app, v.environ, n)
        if v.handler.writes and count_rows(engine) - before != n:
            raise RuntimeError(f"{v.handler.name} / {v.label} lost its inserts")
    clear_rows(engine)


def run(variants: list[Variant], engine: Engine, n: int, rounds: int) -> None:
    """Each round runs every variant's batch of N requests as SLICES slices,
    handler by handler (starting with a different handler each round); the
    slices of one handler's variants take turns in a shuffled order, so a
    busy moment of the machine falls on all of them alike."""
    rng = random.Random(7)
    groups = [[v for v in variants if v.handler is h] for h in HANDLERS]
    for i in range(rounds):
        for group in groups[i % len(groups) :] + groups[: i % len(groups)]:
            totals = [0.0] * len(group)
            order = list(range(len(group)))
            for _ in range(SLICES):
                rng.shuffle(order)
                for j in order:
                    v = group[j]
                    size = n * v.handler.scale // SLICES
                    totals[j] += run_batch(v.app, v.environ, size)
            for v, total in zip(group, totals, strict=True):
                v.times.append(total / SLICES)
        clear_rows(engine)


# -- reporting ----------------------------------------------------------------


def per_round(
    a: Variant, b: Variant, op: t.Callable[[float, float], float]
) -> list[float]:
    return [op(x, y) for x, y in zip(a.times, b.times, strict=True)]


def ratio(a: Variant, b: Variant) -> float:
    return statistics.median(per_round(a, b, lambda x, y: x / y))


def added(a: Variant, b: Variant) -> float:
    return statistics.median(per_round(a, b, lambda x, y: x - y))


def results_table(variants: list[Variant]) -> list[str]:
    by_key = {(v.handler.name, v.key): v for v in variants}
    lines = [
        "| handler | variant | µs/request | × bare | × try/finally"
        " | added µs | added over |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for v in variants:
        bare = by_key[v.handler.name, "bare"]
        classic = by_key[v.handler.name, "try"]
        if v.baseline is None:
            extra, over = "", ""
        else:
            base = by_key[v.handler.name, v.baseline]
            extra, over = f"{added(v, base):+.1f}", base.label
        lines.append(
            f"| {v.handler.name} | {v.label} | {statistics.median(v.times):.1f}"
            f" | {ratio(v, bare):.2f}× | {ratio(v, classic):.2f}×"
            f" | {extra} | {over} |"
        )
    return lines


def target_table(variants: list[Variant]) -> list[str]:
    by_key = {(v.handler.name, v.key): v for v in variants}
    lines = [
        "Targets (met: on the medians; rounds held: in how many rounds the"
        " comparison held on its own):",
        "",
        "| handler | target | measured | rounds held | met |",
        "|---|---|---|--:|---|",
    ]

    def row(h: str, target: str, measured: str, met: bool, held: list[bool]) -> None:
        lines.append(
            f"| {h} | {target} | {measured} | {sum(held)}/{len(held)}"
            f" | {'yes' if met else 'no'} |"
        )

    for h in HANDLERS:
        v = {key: by_key[h.name, key] for key in ("bare", "try")}
        limit = 1.00 if h.name == "no DB" else 1.05
        for key in ("ws",):
            if (h.name, key) not in by_key:
                continue
            ratios = per_round(by_key[h.name, key], v["try"], lambda x, y: x / y)
            row(
                h.name,
                f"{by_key[h.name, key].label} ≤ {limit:.2f}× try/finally",
                f"{statistics.median(ratios):.3f}×",
                statistics.median(ratios) <= limit,
                [r <= limit for r in ratios],
            )
        for key in ("ws", "ws_commit"):
            if (h.name, key) not in by_key:
                continue
            ours = per_round(by_key[h.name, key], v["bare"], lambda x, y: x - y)
            our_median = statistics.median(ours)
            for theirs_key, base_key, name in (
                ("fsa", "flask", "Flask-SQLAlchemy"),
                ("pyramid_tm", "pyramid", "pyramid_tm"),
            ):
                theirs = per_round(
                    by_key[h.name, theirs_key],
                    by_key[h.name, base_key],
                    lambda x, y: x - y,
                )
                their_median = statistics.median(theirs)
                row(
                    h.name,
                    f"{by_key[h.name, key].label} added < {name} added",
                    f"{our_median:+.1f} vs {their_median:+.1f} µs",
                    our_median < their_median,
                    [a < b for a, b in zip(ours, theirs, strict=True)],
                )
    return lines


def header(n: int, rounds: int, clock_name: str) -> list[str]:
    packages = [
        "SQLAlchemy",
        "Flask",
        "Flask-SQLAlchemy",
        "Werkzeug",
        "pyramid",
        "pyramid_tm",
        "zope.sqlalchemy",
        "transaction",
        "repoze.tm2",
    ]
    versions = ", ".join(f"{p} {version(p)}" for p in packages)
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()},"
        f" {platform.machine()}, {os.cpu_count()} CPUs); {versions}",
        f"N = {n} requests per variant and round ({HANDLERS[0].scale * n} for"
        f" {HANDLERS[0].name}), run as"
        f" {SLICES} slices interleaved with the same handler's other variants"
        f" in a shuffled order; R = {rounds} rounds. gc.freeze() after the"
        " warm-up, gc.collect() before each slice. SQLite file database"
        " (synchronous=OFF, journal_mode=MEMORY).",
        f"Clock: {clock_name} ({CLOCKS[clock_name].__name__}). µs/request:"
        " median over the rounds. × bare, × try/finally, added µs:"
        " computed within each round, then the median over the rounds.",
        CAVEAT,
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", "-n", type=int, default=600, help="requests per batch"
    )
    parser.add_argument("--rounds", "-r", type=int, default=15, help="rounds")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: N=100, R=3 (noisy)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter_ns (default); cpu: time.thread_time_ns,"
        " steadier when other processes compete for the CPUs",
    )
    args = parser.parse_args(argv)
    n, rounds = (100, 3) if args.quick else (args.requests, args.rounds)
    n = max(n // SLICES, 1) * SLICES
    global clock
    clock = CLOCKS[args.clock]

    with tempfile.TemporaryDirectory() as directory:
        database_url = f"sqlite:///{os.path.join(directory, 'bench.db')}"
        engine = create_engine(database_url)
        Base.metadata.create_all(engine)
        variants = build_variants(database_url, engine)
        warm_up(variants, engine, min(n, 200))
        # What exists now lives to the end: collections then skip it.
        gc.freeze()
        run(variants, engine, n, rounds)
        engine.dispose()

    lines = header(n, rounds, args.clock)
    print("\n".join(lines + results_table(variants)))
    print()
    print("\n".join(target_table(variants)))


if __name__ == "__main__":
    main()
