"""A small Flask-SQLAlchemy application, as it was before the migration that
docs/migrating.rst describes; ``after/notes.py`` is its port. Both run the
same tests (tests/test_migrating.py)."""

from flask import Blueprint
from flask import Flask
from flask import request
from flask_sqlalchemy import SQLAlchemy
from werkzeug.exceptions import HTTPException

db = SQLAlchemy()

note_tags = db.Table(
    "note_tags",
    db.Column("note_id", db.Integer, db.ForeignKey("notes.id"), primary_key=True),
    db.Column("tag_id", db.Integer, db.ForeignKey("tags.id"), primary_key=True),
)


class Note(db.Model):
    __tablename__ = "notes"
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.String(500), nullable=False)
    tags = db.relationship("Tag", secondary=note_tags, backref=db.backref("notes"))


class Tag(db.Model):
    __tablename__ = "tags"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(50), unique=True, nullable=False)


bp = Blueprint("notes", __name__)


def as_json(note):
    return {"id": note.id, "text": note.text, "tags": [t.name for t in note.tags]}


@bp.get("/notes")
def list_notes():
    after = request.args.get("after", 0)
    notes = Note.query.filter(Note.id > after).order_by(Note.id)
    return {"notes": [as_json(note) for note in notes]}


@bp.post("/notes")
def create_note():
    data = request.get_json()
    note = Note(text=data["text"])
    db.session.add(note)
    for name in data.get("tags", []):
        note.tags.append(Tag.query.filter_by(name=name).first() or Tag(name=name))
    db.session.commit()
    return as_json(note), 201


@bp.get("/notes/<int:note_id>")
def get_note(note_id):
    return as_json(db.get_or_404(Note, note_id))


@bp.get("/tags/<name>")
def get_tag(name):
    tag = Tag.query.filter_by(name=name).first_or_404()
    return {"name": tag.name, "notes": [note.id for note in tag.notes]}


@bp.put("/notes/<int:note_id>")
def edit_note(note_id):
    note = db.get_or_404(Note, note_id)
    note.text = request.get_json()["text"]
    db.session.flush()
    if "!" in note.text:
        raise ValueError("no shouting")  # a bug: Flask answers 500
    db.session.commit()
    return as_json(note)


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(config or {})  # SQLALCHEMY_DATABASE_URI
    db.init_app(app)
    app.register_blueprint(bp)

    @app.errorhandler(HTTPException)
    def json_error(error):
        return {"error": error.description}, error.code

    return app
