"""Two applications under werkzeug's ``DispatcherMiddleware``, and one session.

``python examples/dispatcher_app.py``: 127.0.0.1:``$PORT`` (8000), ``$DATABASE_URL``
(``dispatcher_notes.sqlite3``). Each mount and the whole are wrapped with ``db``:
only the outermost layer manages the session, the inner ones pass requests on.
"""

import json
import os

from sqlalchemy import String
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import run_simple
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response

from wsgi_scoped import Database

db = Database(os.environ.get("DATABASE_URL", "sqlite:///dispatcher_notes.sqlite3"))


class Base(DeclarativeBase):
    id: Mapped[int] = mapped_column(primary_key=True)  # in every table


class Note(Base):
    __tablename__ = "notes"
    text: Mapped[str] = mapped_column(String(500))


class Hit(Base):  # one per request, in the same transaction as the request's work
    __tablename__ = "hits"
    path: Mapped[str] = mapped_column(String(200))


def as_json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status, mimetype="application/json")


@Request.application
def notes(request: Request) -> Response:  # GET and POST /notes
    if request.path not in ("", "/"):
        raise NotFound()  # turned into a 404 response: the Hit is rolled back
    if request.method == "POST":
        note = Note(text=request.form["text"])  # a 400 if missing
        db().add(note)
        db().flush()  # for the id; the middleware commits
        return as_json({"id": note.id, "text": note.text}, 201)
    rows = db().scalars(select(Note).order_by(Note.id))
    return as_json({"notes": [{"id": n.id, "text": n.text} for n in rows]})


@Request.application
def stats(request: Request) -> Response:  # GET /stats
    notes_count = db().scalar(select(func.count(Note.id)))
    hits_count = db().scalar(select(func.count(Hit.id)))  # with this request's Hit
    return as_json({"notes": notes_count, "hits": hits_count})


def log_hits(app):  # plain WSGI: writes through the session the mounted app uses
    def logged(environ, start_response):
        db().add(Hit(path=environ.get("PATH_INFO", "/")))
        return app(environ, start_response)

    return logged


Base.metadata.create_all(db.engine)  # the engine: outside a request, no db()
mounts = {"/notes": notes, "/stats": stats}  # each can be served alone, as wrapped:
mounts = {path: db.middleware(mount, commit=True) for path, mount in mounts.items()}
app = db.middleware(log_hits(DispatcherMiddleware(NotFound(), mounts)), commit=True)

if __name__ == "__main__":
    run_simple("127.0.0.1", int(os.environ.get("PORT", "8000")), app)
