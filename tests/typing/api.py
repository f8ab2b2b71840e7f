"""Checked by mypy --strict, not run: the public API as users type it."""

from __future__ import annotations

import typing as t

from sqlalchemy import create_engine
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import RequestStats
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import get_ident
from wsgi_scoped import is_active
from wsgi_scoped.pytest_plugin import paused_replica
from wsgi_scoped.pytest_plugin import wait_for_replica

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment


def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


Registry = scoped_session(sessionmaker(create_engine("sqlite://")), scopefunc=get_ident)
wrapped: ScopedSessionMiddleware = ScopedSessionMiddleware(app, Registry)

db = Database("sqlite://", expire_on_commit=False)
session: Session = db()
one: int | None = db().execute(select(1)).scalar()
wrapped_too: ScopedSessionMiddleware = db.middleware(app)
active: bool = is_active({}, db)


def role(stats: RequestStats) -> t.Literal["primary", "replica"] | None:
    return stats.role


def lagging(replicated: Database) -> str:
    with paused_replica(replicated.replicas[0]):
        pass
    with paused_replica("postgresql+psycopg://app@replica/app"):
        pass
    wait_for_replica(replicated.engine, replicated.replicas[0], timeout=1.5)
    return wait_for_replica(replicated)
