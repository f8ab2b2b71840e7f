"""Pyramid, with wsgi_scoped in place of pyramid_tm and zope.sqlalchemy.

``python examples/pyramid_app.py``: 127.0.0.1:``$PORT`` (8000), ``$DATABASE_URL``
(``pyramid_notes.sqlite3``). Views never commit; the middleware rolls back 4xx/5xx."""

import logging
import os
from wsgiref.simple_server import make_server

from pyramid import httpexceptions as http
from pyramid.config import Configurator
from pyramid.view import view_config
from sqlalchemy import String
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from wsgi_scoped import Database

db = Database(os.environ.get("DATABASE_URL", "sqlite:///pyramid_notes.sqlite3"))


class Base(DeclarativeBase):
    id: Mapped[int] = mapped_column(primary_key=True)  # in every table


class Note(Base):
    __tablename__ = "notes"
    text: Mapped[str] = mapped_column(String(500))


class Lookup(Base):  # one per GET /notes/<id>: kept for a 200, not for a 404
    __tablename__ = "lookups"
    path: Mapped[str] = mapped_column(String(200))


@view_config(route_name="notes", request_method="GET", renderer="json")
def list_notes(request):
    rows = db().scalars(select(Note).order_by(Note.id))
    return {"notes": [{"id": n.id, "text": n.text} for n in rows]}


@view_config(route_name="notes", request_method="POST", renderer="json")
def create_note(request):
    try:
        text = request.json_body.get("text")
    except (ValueError, AttributeError):  # not JSON, not an object: 400, not 500
        text = None
    if not isinstance(text, str) or not text.strip():
        raise http.HTTPBadRequest("'text' must be a non-blank string.")
    note = Note(text=text)
    db().add(note)
    db().flush()  # for the id; the middleware commits
    request.response.status_int = 201
    return {"id": note.id, "text": note.text}


@view_config(route_name="note", request_method="GET", renderer="json")
def get_note(request):
    db().add(Lookup(path=request.path))
    note = db().get(Note, int(request.matchdict["id"]))  # flushes the Lookup first
    if note is None:
        raise http.HTTPNotFound(f"No note {request.matchdict['id']}.")  # rolled back
    return {"id": note.id, "text": note.text}


@view_config(context=http.HTTPException, renderer="json")  # Pyramid's are HTML
@view_config(context=Exception, renderer="json")
def failed(exc, request):  # a 4xx or 5xx status (a 2xx would commit)
    if not isinstance(exc, http.HTTPException):  # a bug: log it, answer 500
        logging.getLogger(__name__).error("%s failed", request.path, exc_info=exc)
        exc = http.HTTPInternalServerError()
    request.response.status = exc.status  # a router's 404 details only the path
    return {"error": request.matched_route and exc.detail or exc.title}


Base.metadata.create_all(db.engine)  # the engine: outside a request, no db()
with Configurator() as config:  # no config.include("pyramid_tm")
    config.add_route("notes", "/notes")
    config.add_route("note", r"/notes/{id:\d+}")
    config.scan()
    app = db.middleware(config.make_wsgi_app(), commit=True)

if __name__ == "__main__":
    make_server("127.0.0.1", int(os.environ.get("PORT", "8000")), app).serve_forever()
