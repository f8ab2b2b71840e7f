"""Round trips per request, and request latency with a fixed network delay.

Each wiring serves the same WSGI application (GET: one SELECT; POST: one
INSERT) through a loopback TCP proxy that counts the client's turns to speak
(one request/response exchange each) and, for the latency rounds, holds every
chunk for ``--delay`` milliseconds in each direction. With a fixed delay the
latency is round trips × RTT plus a little CPU, so it shows the round trips
directly and hardly moves with this machine's CPU noise.

Wirings: ``Database`` defaults, a bare ``create_engine(url)``, a bare engine
with ``pool_pre_ping=True``, and Flask-SQLAlchemy's defaults (when it is
installed: the ``benchmarks`` extra), each in both commit modes where that
applies. Rounds are interleaved; medians are reported.

    python benchmarks/roundtrips.py --url postgresql+psycopg://postgres@127.0.0.1/test
    python benchmarks/roundtrips.py --url mysql+pymysql://root@127.0.0.1/test

It asserts nothing; ``tests/test_roundtrips.py`` holds the guarantees.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import typing as t
import uuid
import wsgiref.util
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from proxy import Proxy  # noqa: E402

from wsgi_scoped import Database  # noqa: E402
from wsgi_scoped import ScopedSessionMiddleware  # noqa: E402

WSGIApplication = t.Callable[..., t.Any]
WSGIEnvironment = dict[str, t.Any]
StartResponse = t.Callable[..., t.Any]
Wiring = t.Callable[[str, str, bool], tuple[WSGIApplication, t.Callable[[], None]]]


def handler(session: t.Callable[[], t.Any], table: str, commits: bool) -> t.Any:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
        if environ["REQUEST_METHOD"] == "POST":
            session().execute(text(f"INSERT INTO {table} (n) VALUES (1)"))
            if commits:
                session().commit()
        else:
            session().execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
        start_response("200 OK", [])
        return [b"ok"]

    return app


def database(url: str, table: str, commit: bool) -> tuple[t.Any, t.Any]:
    db = Database(url)
    app = db.middleware(handler(db, table, not commit), commit=commit)
    return app, db.engine.dispose


def bare(url: str, table: str, commit: bool, **options: t.Any) -> tuple[t.Any, t.Any]:
    engine = create_engine(url, **options)
    registry = scoped_session(sessionmaker(engine))
    app = ScopedSessionMiddleware(
        handler(registry, table, not commit), registry, commit=commit
    )
    return app, engine.dispose


def pre_ping(url: str, table: str, commit: bool) -> tuple[t.Any, t.Any]:
    return bare(url, table, commit, pool_pre_ping=True)


def flask_sqlalchemy(url: str, table: str, commit: bool) -> tuple[t.Any, t.Any]:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    fsa = SQLAlchemy(app)
    method = handler(lambda: fsa.session, table, True)

    @app.route("/", methods=["GET", "POST"])
    def view() -> str:
        from flask import request

        method(request.environ, lambda status, headers: None)
        return "ok"

    def dispose() -> None:
        with app.app_context():
            fsa.engine.dispose()

    return app, dispose


WIRINGS: dict[str, tuple[Wiring, tuple[bool, ...]]] = {
    "Database defaults": (database, (False, True)),
    "bare create_engine(url)": (bare, (False, True)),
    "bare, pool_pre_ping=True": (pre_ping, (False, True)),
    "Flask-SQLAlchemy defaults": (flask_sqlalchemy, (False,)),
}


def call(app: WSGIApplication, method: str) -> None:
    environ: WSGIEnvironment = {"REQUEST_METHOD": method}
    wsgiref.util.setup_testing_defaults(environ)
    body = app(environ, lambda status, headers, exc_info=None: lambda data: None)
    try:
        for _ in body:
            pass
    finally:
        getattr(body, "close", lambda: None)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a PostgreSQL or MySQL URL")
    parser.add_argument("--delay", type=float, default=1.0, help="ms each way")
    parser.add_argument("-n", type=int, default=30, help="requests per round")
    parser.add_argument("-r", type=int, default=5, help="rounds")
    options = parser.parse_args()
    target = make_url(options.url)
    table = f"ws_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(options.url)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} (n INTEGER)"))
    wirings: list[tuple[str, bool, WSGIApplication, t.Callable[[], None]]] = []
    try:
        with Proxy((str(target.host), int(target.port or 0))) as proxy:
            url = proxy.url(options.url)
            for name, (wire, modes) in WIRINGS.items():
                for commit in modes:
                    try:
                        app, dispose = wire(url, table, commit)
                    except ImportError as error:
                        print(f"# skipped {name}: {error}")
                        break
                    wirings.append((name, commit, app, dispose))
            trips: dict[tuple[str, bool, str], int] = {}
            latency: dict[tuple[str, bool, str], list[float]] = {}
            for name, commit, app, _ in wirings:
                for method in ("GET", "POST"):
                    call(app, method)  # a pooled connection, made once
                    before = proxy.round_trips
                    call(app, method)
                    trips[name, commit, method] = proxy.round_trips - before
            proxy.delay = options.delay / 1000
            for _ in range(options.r):
                for name, commit, app, _ in wirings:
                    for method in ("GET", "POST"):
                        start = time.perf_counter()
                        for _ in range(options.n):
                            call(app, method)
                        per = (time.perf_counter() - start) / options.n * 1000
                        latency.setdefault((name, commit, method), []).append(per)
            for *_, dispose in wirings:
                dispose()
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP TABLE {table}"))
        admin.dispose()
    print(
        f"# {target.get_backend_name()}+{target.get_driver_name()},"
        f" {options.delay} ms each way, {options.r} rounds of {options.n} requests,"
        f" Python {sys.version.split()[0]}"
    )
    header = "wiring                      commit  trips GET/POST  ms GET  ms POST"
    print(header)
    print("-" * len(header))
    for name, commit, *_ in wirings:
        mode = "True " if commit else "False"
        row = [trips[name, commit, m] for m in ("GET", "POST")]
        ms = [statistics.median(latency[name, commit, m]) for m in ("GET", "POST")]
        cells = f"{row[0]:>5} / {row[1]:<5}  {ms[0]:>6.2f}  {ms[1]:>7.2f}"
        print(f"{name:<27} {mode}   {cells}")


if __name__ == "__main__":
    main()
