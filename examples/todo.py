"""A JSON todo API in plain WSGI, with one request-scoped session per request.

Run ``python examples/todo.py`` (127.0.0.1, port ``$PORT`` or 8000) or
``gunicorn -w 2 --chdir examples todo:app``. The database is ``$DATABASE_URL``,
by default ``todos.sqlite3`` in the current directory, shared by all workers.

-   ``GET /todos``: all todos by id. ``POST /todos`` ``{"title": str, "done":
    bool}`` (``done`` optional): 201, the todo, and a ``Location`` header.
-   ``GET``, ``PATCH`` (``title`` and/or ``done``), ``DELETE`` (204)
    ``/todos/<id>``. ``PUT`` gets 405: as a partial update it would mislead.
-   ``GET /todos.ndjson``: one JSON line per todo, from a generator that
    queries through ``db()`` while the server sends it.
-   ``HEAD`` answers like ``GET``, without the body. Request bodies may be sent
    chunked to a server that decodes them (waitress, gunicorn).
-   Errors: ``{"error": "..."}`` with 400, 404, 405 (and ``Allow``), 411 or 413.
"""

from __future__ import annotations

import json
import os
import re
import typing as t

from sqlalchemy import String
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from wsgi_scoped import Database

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

#: Largest request body read, in bytes; a larger one gets 413.
MAX_BODY_SIZE = 1024 * 1024

db = Database(os.environ.get("DATABASE_URL", "sqlite:///todos.sqlite3"))


class Base(DeclarativeBase):
    pass


class Todo(Base):
    __tablename__ = "todos"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    done: Mapped[bool] = mapped_column(default=False)

    def to_json(self) -> dict[str, t.Any]:
        return {"id": self.id, "title": self.title, "done": self.done}


# On the engine, not through db(): outside a request there is no session. If
# two gunicorn workers both find the table missing, the loser retries once.
try:
    Base.metadata.create_all(db.engine)
except OperationalError:
    Base.metadata.create_all(db.engine)


class HTTPError(Exception):
    """An error response with a JSON ``{"error": message}`` body."""

    def __init__(
        self, message: str, status: str = "400 Bad Request", *headers: tuple[str, str]
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


_ITEM = re.compile(r"/todos/([0-9]{1,18})")  # longer ids overflow SQLite


def api(environ: WSGIEnvironment, start_response: StartResponse) -> t.Iterable[bytes]:
    """The todo API, without session handling: wrap it with ``db.middleware``."""
    if environ["REQUEST_METHOD"] == "HEAD":  # GET's status and headers, no body
        body = api({**environ, "REQUEST_METHOD": "GET"}, start_response)
        getattr(body, "close", lambda: None)()  # a stream never starts its query
        return []
    try:
        return _dispatch(environ, start_response)
    except HTTPError as e:
        return _json(start_response, e.status, {"error": str(e)}, *e.headers)


def _dispatch(
    environ: WSGIEnvironment, start_response: StartResponse
) -> t.Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if path == "/todos.ndjson":
        _allow(method, "GET", "HEAD")
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        return _stream_todos()  # lazy: its queries run while the server sends it
    if path == "/todos":
        _allow(method, "GET", "HEAD", "POST")
        if method == "GET":
            todos = db().scalars(select(Todo).order_by(Todo.id))
            return _json(start_response, "200 OK", [todo.to_json() for todo in todos])
        new = Todo(**_read_todo(environ, partial=False))
        db().add(new)
        db().commit()  # the middleware ends the session; it never commits
        location = ("Location", f"{environ.get('SCRIPT_NAME', '')}/todos/{new.id}")
        return _json(start_response, "201 Created", new.to_json(), location)
    match = _ITEM.fullmatch(path)
    if match is None:
        raise HTTPError(f"No route for {path!r}.", "404 Not Found")
    _allow(method, "GET", "HEAD", "PATCH", "DELETE")
    todo = db().get(Todo, int(match[1]))
    if todo is None:
        raise HTTPError(f"No todo with id {match[1]}.", "404 Not Found")
    if method == "DELETE":
        db().delete(todo)
        db().commit()
        start_response("204 No Content", [])
        return []
    if method == "PATCH":
        for name, value in _read_todo(environ, partial=True).items():
            setattr(todo, name, value)
        db().commit()
    return _json(start_response, "200 OK", todo.to_json())


def _stream_todos() -> t.Iterator[bytes]:
    # Runs as the server iterates the body: db() is still this request's
    # session, and the middleware ends it when the server closes the body.
    query = select(Todo).order_by(Todo.id).execution_options(yield_per=100)
    for todo in db().scalars(query):
        yield json.dumps(todo.to_json()).encode() + b"\n"


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        allow = ", ".join(allowed)
        raise HTTPError(f"Use {allow}.", "405 Method Not Allowed", ("Allow", allow))


def _read_todo(environ: WSGIEnvironment, partial: bool) -> dict[str, t.Any]:
    """Return the validated fields of the JSON object in the request body."""
    try:
        data = json.loads(_read_body(environ))
    except ValueError:
        raise HTTPError("The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise HTTPError("The body must be a JSON object.")
    if unknown := data.keys() - {"title", "done"}:
        raise HTTPError(f"Unknown fields: {sorted(unknown)}.")
    if "title" in data or not partial:
        title = data.get("title")
        if not isinstance(title, str) or not title.strip() or len(title) > 200:
            raise HTTPError("'title' must be non-blank, at most 200 characters.")
    if not isinstance(data.get("done", False), bool):
        raise HTTPError("'done' must be true or false.")
    return data


def _read_body(environ: WSGIEnvironment) -> bytes:
    """Return the request body, of at most ``MAX_BODY_SIZE`` bytes."""
    too_large = HTTPError(f"Body over {MAX_BODY_SIZE} bytes.", "413 Content Too Large")
    length = environ.get("CONTENT_LENGTH") or ""
    if length and not (length.isascii() and length.isdigit()):
        raise HTTPError(f"Invalid Content-Length {length!r}.")
    if length:
        if int(length) > MAX_BODY_SIZE:
            raise too_large
        return t.cast("bytes", environ["wsgi.input"].read(int(length)))
    if environ.get("wsgi.input_terminated"):  # a chunked body the server decoded
        body = environ["wsgi.input"].read(MAX_BODY_SIZE + 1)  # to its end, or past
        if len(body) > MAX_BODY_SIZE:
            raise too_large
        return t.cast("bytes", body)
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        raise HTTPError(
            "This server does not decode chunked request bodies: send a"
            " Content-Length, or serve the app with waitress or gunicorn.",
            "411 Length Required",
        )
    return b""


def _json(
    start_response: StartResponse,
    status: str,
    payload: object,
    *headers: tuple[str, str],
) -> list[bytes]:
    body = json.dumps(payload).encode()
    length = ("Content-Length", str(len(body)))
    start_response(status, [("Content-Type", "application/json"), length, *headers])
    return [body]


app = db.middleware(api)

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(f"Serving on http://127.0.0.1:{port}/todos; press Ctrl+C to stop.")
    try:
        # waitress decodes chunked request bodies; wsgiref answers them 411.
        from waitress import serve
    except ImportError:
        from wsgiref.simple_server import make_server

        with make_server("127.0.0.1", port, app) as server:
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
    else:
        serve(app, host="127.0.0.1", port=port)
