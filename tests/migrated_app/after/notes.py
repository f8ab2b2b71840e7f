"""The application of ``before/notes.py``, ported from Flask-SQLAlchemy to
wsgi_scoped as docs/migrating.rst says; the guide's code blocks are quoted
from this file (tests/test_migrating.py checks it)."""

from flask import Blueprint
from flask import Flask
from flask import abort
from flask import request
from sqlalchemy import Column
from sqlalchemy import ForeignKey
from sqlalchemy import Integer
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import backref
from sqlalchemy.orm import relationship
from werkzeug.exceptions import HTTPException

from wsgi_scoped import Database

db = Database()  # DATABASE_URL, read once, when this module is imported


class Base(DeclarativeBase):
    pass


Base.query = db.query_property()  # Note.query: a Query on the request's session

note_tags = Table(
    "note_tags",
    Base.metadata,
    Column("note_id", Integer, ForeignKey("notes.id"), primary_key=True),
    Column("tag_id", Integer, ForeignKey("tags.id"), primary_key=True),
)


class Note(Base):
    __tablename__ = "notes"
    id = Column(Integer, primary_key=True)
    text = Column(String(500), nullable=False)
    tags = relationship("Tag", secondary=note_tags, backref=backref("notes"))


class Tag(Base):
    __tablename__ = "tags"
    id = Column(Integer, primary_key=True)
    name = Column(String(50), unique=True, nullable=False)


bp = Blueprint("notes", __name__)


def as_json(note):
    return {"id": note.id, "text": note.text, "tags": [t.name for t in note.tags]}


def get_or_404(model, ident):
    return db().get(model, ident) or abort(404)


@bp.get("/notes")
def list_notes():
    after = request.args.get("after", 0, type=int)  # an int, for psycopg 3
    notes = Note.query.filter(Note.id > after).order_by(Note.id)
    return {"notes": [as_json(note) for note in notes]}


@bp.post("/notes")
def create_note():
    data = request.get_json()
    note = Note(text=data["text"])
    db().add(note)
    for name in data.get("tags", []):
        note.tags.append(Tag.query.filter_by(name=name).first() or Tag(name=name))
    db().flush()  # for the id; the middleware commits
    return as_json(note), 201


@bp.get("/notes/<int:note_id>")
def get_note(note_id):
    return as_json(get_or_404(Note, note_id))


@bp.get("/tags/<name>")
def get_tag(name):
    tag = Tag.query.filter_by(name=name).first() or abort(404)
    return {"name": tag.name, "notes": [note.id for note in tag.notes]}


@bp.put("/notes/<int:note_id>")
def edit_note(note_id):
    note = get_or_404(Note, note_id)
    note.text = request.get_json()["text"]
    db().flush()
    if "!" in note.text:
        raise ValueError("no shouting")  # a bug: Flask answers 500
    return as_json(note)


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(config or {})
    db.init_app(app, commit=True)  # commits 2xx/3xx, rolls back the rest
    app.register_blueprint(bp)

    @app.errorhandler(HTTPException)
    def json_error(error):
        return {"error": error.description}, error.code

    return app
