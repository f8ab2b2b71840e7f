"""The WSGI application that ``tests/test_servers.py`` runs under real
servers (gunicorn, waitress), configured by environment variables:

``SERVER_APP_DATABASE_URL``
    The database (PostgreSQL): required.
``SERVER_APP_NAME``
    The ``application_name`` of its connections, so that a test finds them
    in ``pg_stat_activity``; also the name of its table.
``SERVER_APP_POOL_SIZE``, ``SERVER_APP_MAX_OVERFLOW``, ``SERVER_APP_POOL_TIMEOUT``
    The engine's pool options, when set.
``SERVER_APP_NULLPOOL=1``
    No pool: each request opens its own connection (behind PgBouncer).
``SERVER_APP_NO_PREPARE=1``
    psycopg's ``prepare_threshold=None``: no server-side prepared statements,
    which PgBouncer in transaction mode cannot carry between connections.
``SERVER_APP_COMMIT=0``
    The middleware's ``commit=False``, where the handlers commit their own
    work; by default ``commit=True``.
``SERVER_APP_FLASK=init_app`` or ``SERVER_APP_FLASK=wsgi_app``
    Serve ``/big`` and ``POST /items`` from a Flask application instead,
    wired with ``wsgi_scoped.flask.init_app`` or with ``app.wsgi_app =
    db.middleware(app.wsgi_app)``.
``SERVER_APP_REPORT_IMPORT=1``
    Query ``pg_backend_pid()`` on ``db.engine`` at import and print it with
    the process id, so that under ``gunicorn --preload`` the master holds a
    pooled connection when it forks and the test knows which one.

The table is created at import through the engine, never through ``db()``,
so that no session is left registered in a thread that later serves requests.
"""

from __future__ import annotations

import json
import os
import time
import typing as t
import urllib.parse

from sqlalchemy import exc
from sqlalchemy import make_url
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from wsgi_scoped import Database

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

URL = make_url(os.environ["SERVER_APP_DATABASE_URL"])
NAME = os.environ.get("SERVER_APP_NAME", "wsgi_scoped_server_app")
TABLE = NAME
COMMIT = os.environ.get("SERVER_APP_COMMIT", "1") == "1"


def _options() -> dict[str, t.Any]:
    options: dict[str, t.Any] = {"connect_args": {"application_name": NAME}}
    if os.environ.get("SERVER_APP_NO_PREPARE") and URL.get_driver_name() == "psycopg":
        options["connect_args"]["prepare_threshold"] = None
    if os.environ.get("SERVER_APP_NULLPOOL"):
        options["poolclass"] = NullPool
    for name in ("pool_size", "max_overflow", "pool_timeout"):
        value = os.environ.get(f"SERVER_APP_{name.upper()}")
        if value:
            options[name] = int(value)
    return options


db = Database(URL, **_options())


def _create_table() -> None:
    """Create the table unless it exists. Workers importing the app at once
    may both try: the loser of that race sees the table on its next try."""
    for attempt in range(3):
        try:
            with db.engine.begin() as connection:
                connection.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY,"
                        " source varchar(10) NOT NULL, tag varchar(64))"
                    )
                )
            return
        except (exc.IntegrityError, exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.1)


_create_table()
if os.environ.get("SERVER_APP_REPORT_IMPORT"):
    with db.engine.connect() as _connection:
        _backend = _connection.scalar(text("SELECT pg_backend_pid()"))
    print(f"server_app imported: pid={os.getpid()} backend={_backend}", flush=True)


def _json(start_response: StartResponse, status: str, data: object) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


def _insert(source: str, tag: str | None) -> int:
    return int(
        db()
        .execute(
            text(
                f"INSERT INTO {TABLE} (source, tag) VALUES (:source, :tag) RETURNING id"
            ),
            {"source": source, "tag": tag},
        )
        .scalar_one()
    )


def _stream(
    n: int, size: int, delay: float, write: bool, tag: str | None
) -> t.Iterator[bytes]:
    """The chunks of ``/stream``: the row is written once streaming started,
    in the body's own transaction, committed only if every chunk was sent."""
    chunk = b"x" * (size - 1) + b"\n"
    for number in range(n):
        if write and number == 0:
            _insert("stream", tag)
        yield chunk
        if delay:
            time.sleep(delay)


def handler(
    environ: WSGIEnvironment, start_response: StartResponse
) -> t.Iterable[bytes]:
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
    query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
    tag = query.get("tag")
    if method == "POST" and path == "/items":
        item = _insert("post", tag)
        if "sleep" in query:  # a request in flight, for the test to disturb
            db().execute(text("SELECT pg_sleep(:s)"), {"s": float(query["sleep"])})
        if not COMMIT:
            db().commit()
        return _json(start_response, "201 Created", {"id": item})
    if path == "/items/count":
        count = db().scalar(text(f"SELECT count(*) FROM {TABLE}"))
        return _json(start_response, "200 OK", {"count": count})
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _stream(
            int(query.get("n", "10")),
            int(query.get("size", "1024")),
            float(query.get("delay", "0")),
            query.get("write") == "1",
            tag,
        )
    if path == "/big":
        # A materialized body: its session ends, and under commit=False its
        # transaction with it, before the first byte is sent.
        db().execute(text("SELECT 1"))
        chunk = b"b" * 65536
        chunks = int(query.get("mb", "8")) * 16
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/octet-stream"),
                ("Content-Length", str(len(chunk) * chunks)),
            ],
        )
        if "object" in query:
            # A Django-style response object, declared rendered or not.
            body = _ResponseObject([chunk] * chunks)
            if query["object"] == "rendered":
                environ["wsgi_scoped.rendered"] = body
            return body
        return [chunk] * chunks
    if path == "/pid":
        backend = db().scalar(text("SELECT pg_backend_pid()"))
        if "sleep" in query:
            time.sleep(float(query["sleep"]))
        return _json(start_response, "200 OK", {"pid": os.getpid(), "backend": backend})
    return _json(start_response, "404 Not Found", {"error": f"No route {path!r}"})


class _ResponseObject:
    """A rendered response that is its own body, as Django's is: lazy in
    the middleware's eyes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.chunks = []


def _flask_app(wiring: str) -> t.Any:
    """``/big`` and ``POST /items`` as Flask views: rendered responses."""
    from flask import Flask
    from flask import Response
    from flask import request

    from wsgi_scoped.flask import init_app

    flask = Flask(__name__)

    @flask.get("/big")
    def big() -> Response:
        db().execute(text("SELECT 1"))  # a read: under commit=False, no commit
        size = int(request.args.get("mb", "8")) * 1024 * 1024
        return Response(b"b" * size, mimetype="application/octet-stream")

    @flask.post("/items")
    def items() -> tuple[dict[str, int], int]:
        item = _insert("post", request.args.get("tag"))
        if not COMMIT:
            db().commit()
        return {"id": item}, 201

    if wiring == "init_app":
        init_app(flask, db, commit=COMMIT)
    else:
        flask.wsgi_app = db.middleware(flask.wsgi_app, commit=COMMIT)  # type: ignore[method-assign]
    return flask


FLASK = os.environ.get("SERVER_APP_FLASK")
scoped = _flask_app(FLASK) if FLASK else db.middleware(handler, commit=COMMIT)


def app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Iterable[bytes]:
    """``/pool`` reports the worker's checked-out connections from outside the
    middleware, whose leak guard would otherwise end a session leaked by an
    earlier request on the same thread before it could be seen."""
    if environ.get("PATH_INFO") == "/pool":
        checkedout = getattr(db.engine.pool, "checkedout", None)
        report = {"pid": os.getpid(), "checkedout": checkedout and checkedout()}
        return _json(start_response, "200 OK", report)
    return scoped(environ, start_response)
