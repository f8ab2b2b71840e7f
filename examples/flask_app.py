"""Flask, with wsgi_scoped in place of Flask-SQLAlchemy's ``db.session``.

``python examples/flask_app.py``: 127.0.0.1:``$PORT`` (8000), ``$DATABASE_URL``
(``flask_notes.sqlite3``). Handlers never commit; the middleware rolls back 4xx/5xx.
"""

import os

from flask import Flask
from flask import abort
from flask import request
from sqlalchemy import String
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from werkzeug.exceptions import HTTPException

from wsgi_scoped import Database

db = Database(os.environ.get("DATABASE_URL", "sqlite:///flask_notes.sqlite3"))


class Base(DeclarativeBase):
    id: Mapped[int] = mapped_column(primary_key=True)  # in every table


class Note(Base):
    __tablename__ = "notes"
    text: Mapped[str] = mapped_column(String(500))


class Lookup(Base):  # one per GET /notes/<id>: kept for a 200, not for a 404
    __tablename__ = "lookups"
    path: Mapped[str] = mapped_column(String(200))


Base.metadata.create_all(db.engine)  # the engine: outside a request, no db()
app = Flask(__name__)
db.init_app(app, commit=True)  # commits before the status; ends sessions early


@app.get("/notes")
def list_notes() -> dict[str, object]:
    rows = db().scalars(select(Note).order_by(Note.id))
    return {"notes": [{"id": n.id, "text": n.text} for n in rows]}


@app.post("/notes")
def create_note() -> tuple[dict[str, object], int]:
    data = request.get_json(silent=True)
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        abort(400, "'text' must be a non-blank string.")
    note = Note(text=text)
    db().add(note)
    db().flush()  # for the id; the middleware commits
    return {"id": note.id, "text": note.text}, 201


@app.get("/notes/<int:note_id>")
def get_note(note_id: int) -> dict[str, object]:
    db().add(Lookup(path=request.path))
    note = db().get(Note, note_id)  # flushes the Lookup first
    if note is None:
        abort(404, f"No note {note_id}.")  # the middleware rolls the Lookup back
    return {"id": note.id, "text": note.text}


@app.errorhandler(HTTPException)  # also gets the 500 of an unexpected exception
def json_error(error: HTTPException) -> tuple[dict[str, object], int]:
    return {"error": error.description}, error.code or 500


if __name__ == "__main__":
    app.run("127.0.0.1", int(os.environ.get("PORT", "8000")))
