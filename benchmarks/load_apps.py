"""The applications that benchmarks/load.py serves under gunicorn: one set of
handlers, several ways of ending the request's session.

-   ``wsgi_scoped``: ``Database(...)`` and ``db.middleware(app)``; the insert
    endpoint is wrapped with ``commit=True`` and its handler does not commit.
-   ``try_finally``: a hand-written ``try: return app(...) finally:
    Session.remove()`` middleware.
-   ``closing_iterator``: werkzeug's ``ClosingIterator(app(environ, sr),
    Session.remove)``, which ends the session after the body is sent.
-   ``flask_sqlalchemy``: the same handlers as Flask views on
    Flask-SQLAlchemy's ``db.session``.
-   ``flask_wsgi_scoped``, ``flask_wsgi_scoped_commit``: the Flask views on
    ``db()``, with ``app.wsgi_app = db.middleware(app.wsgi_app)``, without
    and with ``commit=True``.
-   ``flask_init_app``, ``flask_init_app_commit``: the same views wired with
    ``wsgi_scoped.flask.init_app(app, db)``, without and with ``commit=True``.

Endpoints: ``GET /item/<id>`` (one SELECT by primary key, about 1 KB of
JSON), ``POST /event`` (one INSERT, committed), ``GET /big`` (every row,
about 2 MB of JSON in one list body) and ``GET /ready`` (no database). Every
response carries ``X-Worker: <pid>``.

    gunicorn -k gthread -w 2 --threads 8 --chdir benchmarks \\
        "load_apps:create_app('wsgi_scoped', url='postgresql+psycopg://...')"
"""

from __future__ import annotations

import json
import os
import typing as t

from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import create_engine
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

App = t.Callable[[dict[str, t.Any], t.Callable[..., t.Any]], t.Iterable[bytes]]

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
VARIANTS = ("wsgi_scoped", "try_finally", "closing_iterator", "flask_sqlalchemy")
#: wsgi_scoped around a Flask application, wired by hand and with init_app,
#: without and with commit=True (examples/flask_app.py: init_app, commit=True).
FLASK_VARIANTS = (
    "flask_wsgi_scoped",
    "flask_wsgi_scoped_commit",
    "flask_init_app",
    "flask_init_app_commit",
)
ALL_VARIANTS = VARIANTS + FLASK_VARIANTS
#: Rows in the items table; ``/big`` returns all of them (about 2 MB).
ROWS = 2000
#: Characters of payload per row: one row is about 1 KB of JSON.
PAYLOAD = 940
JSON = "application/json"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "load_bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)


class Event(Base):
    __tablename__ = "load_bench_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    worker: Mapped[int]


def make_rows() -> list[dict[str, t.Any]]:
    """The items table's rows."""
    return [
        {"id": n, "name": f"item-{n:06d}", "payload": (f"{n:x}-" * PAYLOAD)[:PAYLOAD]}
        for n in range(1, ROWS + 1)
    ]


def _as_dict(item: Item) -> dict[str, t.Any]:
    return {"id": item.id, "name": item.name, "payload": item.payload}


def item_json(session: Session, item_id: int) -> bytes | None:
    """One SELECT by primary key; ``None`` if there is no such row."""
    item = session.get(Item, item_id)
    return None if item is None else json.dumps(_as_dict(item)).encode()


def event_json(session: Session, *, commit: bool) -> bytes:
    """One INSERT, flushed for its id; committed here if ``commit``."""
    event = Event(worker=os.getpid())
    session.add(event)
    session.flush()
    body = json.dumps({"id": event.id, "worker": event.worker}).encode()
    if commit:
        session.commit()
    return body


def big_json(session: Session) -> bytes:
    """Every row, about 2 MB."""
    items = session.scalars(select(Item).order_by(Item.id)).all()
    return json.dumps([_as_dict(item) for item in items]).encode()


def plain_app(get_session: t.Callable[[], Session], *, commits: bool) -> App:
    """The handlers as a plain WSGI application returning list bodies;
    ``commits``: the insert handler commits its own work."""

    def app(
        environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]
    ) -> t.Iterable[bytes]:
        path = environ["PATH_INFO"]
        method = environ["REQUEST_METHOD"]
        status, body = "200 OK", None
        if path.startswith("/item/") and method == "GET":
            body = item_json(get_session(), int(path[6:]))
        elif path == "/event" and method == "POST":
            body = event_json(get_session(), commit=commits)
            status = "201 Created"
        elif path == "/big" and method == "GET":
            body = big_json(get_session())
        elif path == "/ready":
            body = b"{}"
        if body is None:
            status, body = "404 Not Found", b"{}"
        start_response(status, _headers(body))
        return [body]

    return app


def _headers(body: bytes) -> list[tuple[str, str]]:
    return [
        ("Content-Type", JSON),
        ("Content-Length", str(len(body))),
        ("X-Worker", str(os.getpid())),
    ]


def _engine_options(
    app_name: str, pool_size: int, max_overflow: int, pool_timeout: float
) -> dict[str, t.Any]:
    return {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": pool_timeout,
        "pool_pre_ping": True,
        "connect_args": {"application_name": app_name},
    }


def _by_path(routes: dict[str, App], default: App) -> App:
    def app(
        environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]
    ) -> t.Iterable[bytes]:
        return routes.get(environ["PATH_INFO"], default)(environ, start_response)

    return app


def create_app(
    variant: str,
    *,
    url: str = URL,
    app_name: str = "wsgi_scoped_load",
    pool_size: int = 8,
    max_overflow: int = 0,
    pool_timeout: float = 30.0,
) -> App:
    """The WSGI application of ``variant``, its connections named
    ``app_name`` in ``pg_stat_activity``."""
    options = _engine_options(app_name, pool_size, max_overflow, pool_timeout)
    if variant == "wsgi_scoped":
        from wsgi_scoped import Database

        db = Database(url, **options)
        reads = db.middleware(plain_app(db, commits=False))
        writes = db.middleware(plain_app(db, commits=False), commit=True)
        return _by_path({"/event": writes}, reads)
    if variant == "try_finally":
        registry = scoped_session(sessionmaker(create_engine(url, **options)))
        inner = plain_app(registry, commits=True)

        def try_finally(
            environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]
        ) -> t.Iterable[bytes]:
            try:
                return inner(environ, start_response)
            finally:
                registry.remove()

        return try_finally
    if variant == "closing_iterator":
        from werkzeug.wsgi import ClosingIterator

        registry = scoped_session(sessionmaker(create_engine(url, **options)))
        wrapped = plain_app(registry, commits=True)

        def closing(
            environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]
        ) -> t.Iterable[bytes]:
            return ClosingIterator(wrapped(environ, start_response), registry.remove)

        return closing
    if variant == "flask_sqlalchemy":
        from flask_sqlalchemy import SQLAlchemy

        flask = _flask_app(lambda: fsa.session(), commits=True)
        flask.config["SQLALCHEMY_DATABASE_URI"] = url
        flask.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
        fsa = SQLAlchemy(flask)
        return flask
    if variant in FLASK_VARIANTS:
        from wsgi_scoped import Database
        from wsgi_scoped.flask import init_app

        db = Database(url, **options)
        commit = variant.endswith("_commit")
        flask = _flask_app(db, commits=not commit)
        if variant.startswith("flask_init_app"):
            init_app(flask, db, commit=commit)
        else:
            flask.wsgi_app = db.middleware(flask.wsgi_app, commit=commit)
        return flask
    raise ValueError(f"'variant' must be one of {ALL_VARIANTS!r}, got {variant!r}.")


def _flask_app(get_session: t.Callable[[], Session], *, commits: bool) -> t.Any:
    """The handlers as Flask views; ``commits``: the insert view commits."""
    from flask import Flask
    from flask import Response
    from flask import abort

    app = Flask(__name__)

    def respond(body: bytes | None, status: int = 200) -> Response:
        if body is None:
            abort(404)
        headers = [("X-Worker", str(os.getpid()))]
        return Response(body, status, headers=headers, mimetype=JSON)

    @app.get("/item/<int:item_id>")
    def item(item_id: int) -> Response:
        return respond(item_json(get_session(), item_id))

    @app.post("/event")
    def event() -> Response:
        return respond(event_json(get_session(), commit=commits), 201)

    @app.get("/big")
    def big() -> Response:
        return respond(big_json(get_session()))

    @app.get("/ready")
    def ready() -> Response:
        return respond(b"{}")

    return app
