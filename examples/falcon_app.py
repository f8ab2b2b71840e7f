"""Falcon, with the ``falcon.App`` wrapped by wsgi_scoped.

``python examples/falcon_app.py``: 127.0.0.1:``$PORT`` (8000), ``$DATABASE_URL``
(``falcon_notes.sqlite3``). Responders never commit; the middleware rolls back
4xx/5xx: Falcon renders ``HTTPError`` and unexpected exceptions (500) first.
"""

import os
from wsgiref.simple_server import make_server

import falcon
from sqlalchemy import String
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from wsgi_scoped import Database

db = Database(os.environ.get("DATABASE_URL", "sqlite:///falcon_notes.sqlite3"))


class Base(DeclarativeBase):
    id: Mapped[int] = mapped_column(primary_key=True)  # in every table


class Note(Base):
    __tablename__ = "notes"
    text: Mapped[str] = mapped_column(String(500))


class Lookup(Base):  # one per GET /notes/<id>: kept for a 200, not for a 404
    __tablename__ = "lookups"
    path: Mapped[str] = mapped_column(String(200))


class NoteCollection:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rows = db().scalars(select(Note).order_by(Note.id))
        resp.media = {"notes": [{"id": n.id, "text": n.text} for n in rows]}

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        data = req.get_media()  # 400 for a missing or malformed body
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise falcon.HTTPBadRequest(
                description="'text' must be a non-blank string."
            )
        note = Note(text=text)
        db().add(note)
        db().flush()  # for the id; the middleware commits
        resp.status = falcon.HTTP_201
        resp.media = {"id": note.id, "text": note.text}


class NoteItem:
    def on_get(self, req: falcon.Request, resp: falcon.Response, note_id: int) -> None:
        db().add(Lookup(path=req.path))
        note = db().get(Note, note_id)  # flushes the Lookup first
        if note is None:  # a 404: the middleware rolls the Lookup back
            raise falcon.HTTPNotFound(description=f"No note {note_id}.")
        resp.media = {"id": note.id, "text": note.text}


Base.metadata.create_all(db.engine)  # the engine: outside a request, no db()
notes = falcon.App()
notes.add_route("/notes", NoteCollection())
notes.add_route("/notes/{note_id:int}", NoteItem())
app = db.middleware(notes, commit=True)  # serve this, not ``notes``

if __name__ == "__main__":
    with make_server("127.0.0.1", int(os.environ.get("PORT", "8000")), app) as server:
        print(f"Serving on http://127.0.0.1:{server.server_port}/notes")
        server.serve_forever()
