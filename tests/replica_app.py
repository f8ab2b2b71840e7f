"""The WSGI application that ``tests/test_replicas.py`` runs under gunicorn:
a ``Database`` with one replica, from ``REPLICA_APP_PRIMARY`` and
``REPLICA_APP_STANDBY`` (``REPLICA_APP_DOWN_FOR``: its ``replica_down_for``);
``commit=True``.

``POST /?name=N`` inserts a row; ``GET /?name=N`` looks for it. Both answer
``{"replica": <served by the standby>, "found": <the row is visible>}``.
"""

from __future__ import annotations

import json
import os
import typing as t
import urllib.parse

from sqlalchemy import text

from wsgi_scoped import Database

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment

db = Database(
    os.environ["REPLICA_APP_PRIMARY"],
    replicas=[os.environ["REPLICA_APP_STANDBY"]],
    replica_down_for=float(os.environ.get("REPLICA_APP_DOWN_FOR", "5")),
    connect_args={"application_name": "wsgi_scoped_replica_app"},
)


def _app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    name = urllib.parse.parse_qs(environ["QUERY_STRING"]).get("name", [""])[0]
    session = db()
    if environ["REQUEST_METHOD"] == "POST":
        session.execute(text("INSERT INTO item (name) VALUES (:n)"), {"n": name})
    replica = session.execute(text("SELECT pg_is_in_recovery()")).scalar()
    found = session.execute(text("SELECT 1 FROM item WHERE name = :n"), {"n": name})
    body = json.dumps({"replica": replica, "found": found.first() is not None})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]


app = db.middleware(_app, commit=True)
