"""Bottle, with the Bottle application wrapped by wsgi_scoped.

``python examples/bottle_app.py``: 127.0.0.1:``$PORT`` (8000), ``$DATABASE_URL``
(``bottle_notes.sqlite3``). Handlers never commit: the middleware commits before
the status line, or rolls back a 4xx/5xx: Bottle makes error pages of ``abort()``
and of unexpected exceptions (500), so the middleware sees the status sent.
"""

import json
import os

from bottle import Bottle
from bottle import HTTPError
from bottle import abort
from bottle import request
from bottle import response
from bottle import run
from sqlalchemy import String
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column

from wsgi_scoped import Database

db = Database(os.environ.get("DATABASE_URL", "sqlite:///bottle_notes.sqlite3"))


class Base(DeclarativeBase):
    id: Mapped[int] = mapped_column(primary_key=True)  # in every table


class Note(Base):
    __tablename__ = "notes"
    text: Mapped[str] = mapped_column(String(500))


class Lookup(Base):  # one per GET /notes/<id>: kept for a 200, not for a 404
    __tablename__ = "lookups"
    path: Mapped[str] = mapped_column(String(200))


Base.metadata.create_all(db.engine)  # the engine: outside a request, no db()
notes = Bottle()
app = db.middleware(notes, commit=True)  # serve this, not ``notes``


def json_error(error: HTTPError) -> str:  # in place of Bottle's HTML page
    response.content_type = "application/json"
    return json.dumps({"error": error.body})


notes.default_error_handler = json_error


@notes.get("/notes")
def list_notes() -> dict[str, object]:  # Bottle serializes dicts, not lists
    rows = db().scalars(select(Note).order_by(Note.id))
    return {"notes": [{"id": n.id, "text": n.text} for n in rows]}


@notes.post("/notes")
def create_note() -> dict[str, object]:
    data = request.json  # 400 for malformed JSON
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        abort(400, "'text' must be a non-blank string.")
    note = Note(text=text)
    db().add(note)
    db().flush()  # for the id; the middleware commits
    response.status = 201
    return {"id": note.id, "text": note.text}


@notes.get("/notes/<note_id:int>")
def get_note(note_id: int) -> dict[str, object]:
    db().add(Lookup(path=request.path))
    note = db().get(Note, note_id)  # flushes the Lookup first
    if note is None:
        abort(404, f"No note {note_id}.")  # the middleware rolls the Lookup back
    return {"id": note.id, "text": note.text}


if __name__ == "__main__":
    run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
