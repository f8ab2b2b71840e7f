"""Checks of the middleware's arguments, made at construction so that a
mistake fails at start-up with a message that says how to fix it."""

from __future__ import annotations

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker


def _check_arguments(app: object, registry: object) -> None:
    if isinstance(app, scoped_session):
        raise TypeError(
            "'app' is a scoped_session: the arguments are swapped."
            " Use ScopedSessionMiddleware(app, registry)."
        )
    if not callable(app):
        raise TypeError(
            "'app' must be a WSGI application (a callable taking environ and"
            f" start_response), got {type(app).__name__!r}."
        )
    if isinstance(registry, scoped_session):
        return
    expected = (
        "'registry' must be a sqlalchemy.orm.scoped_session or a"
        f" wsgi_scoped.Database, got {type(registry).__name__!r}."
    )
    if isinstance(registry, sessionmaker):
        raise TypeError(f"{expected} Wrap it: scoped_session(sessionmaker(...)).")
    if isinstance(registry, Session):
        raise TypeError(
            f"{expected} One Session would be shared by every request; pass"
            " scoped_session(sessionmaker(...)) instead."
        )
    raise TypeError(f"{expected} Create one with scoped_session(sessionmaker(engine)).")


def _check_options(
    commit: object,
    commit_veto: object,
    retries: object,
    replay_memory: object,
    replay_limit: object,
    retry_backoff: object,
) -> None:
    if not isinstance(commit, bool):
        raise TypeError(f"'commit' must be True or False, got {commit!r}.")
    if commit_veto is not None and not callable(commit_veto):
        raise TypeError(
            "'commit_veto' must be a callable (environ, status, headers) -> bool,"
            f" got {type(commit_veto).__name__!r}."
        )
    for name, value in (
        ("retries", retries),
        ("replay_memory", replay_memory),
        ("replay_limit", replay_limit),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"'{name}' must be an int >= 0, got {value!r}.")
    if not isinstance(retry_backoff, (int, float)) or retry_backoff < 0:
        raise ValueError(
            f"'retry_backoff' must be a number of seconds >= 0, got {retry_backoff!r}."
        )
    if not commit and (commit_veto is not None or retries):
        option = "commit_veto" if commit_veto is not None else "retries"
        raise ValueError(
            f"'{option}' needs commit=True: without it the handlers commit their"
            " own work, which the middleware can neither veto nor run again."
            f" Pass commit=True, or drop '{option}'."
        )
