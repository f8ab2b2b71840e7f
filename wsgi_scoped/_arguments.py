"""Checks of the middleware's arguments, made at construction so that a
mistake fails at start-up with a message that says how to fix it, and of
layers nested around one registry."""

from __future__ import annotations

import math
import typing as t

from sqlalchemy import Engine
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
    _require_bool("commit", commit)
    if commit_veto is not None and not callable(commit_veto):
        raise TypeError(
            "'commit_veto' must be a callable (environ, status, headers) -> bool,"
            f" got {type(commit_veto).__name__!r}."
        )
    _require_count("retries", retries)
    _require_count("replay_memory", replay_memory)
    _require_count("replay_limit", replay_limit)
    _require_seconds("retry_backoff", retry_backoff)
    if not commit and (commit_veto is not None or retries):
        option = "commit_veto" if commit_veto is not None else "retries"
        raise ValueError(
            f"'{option}' needs commit=True: without it the handlers commit their"
            " own work, which the middleware can neither veto nor run again."
            f" Pass commit=True, or drop '{option}'."
        )


def _check_observing(
    stats: object,
    server_timing: object,
    warn_statements: object,
    warn_db_time: object,
    trace: object,
) -> None:
    _require_bool("stats", stats)
    _require_bool("server_timing", server_timing)
    if warn_statements is not None:
        _require_count("warn_statements", warn_statements, " or None")
    if warn_db_time is not None:
        _require_seconds("warn_db_time", warn_db_time, " or None")
    if not isinstance(trace, (bool, str)) or trace == "":
        raise TypeError(
            "'trace' must be True, False or the name of a request id header"
            f" such as 'X-Request-Id', got {trace!r}."
        )


def _check_deadline(deadline: object, returned_by: object = None) -> None:
    """``deadline`` is a finite number of seconds > 0, a callable or
    ``None``; or, with ``returned_by``, what that callable returned."""
    if returned_by is None:
        if deadline is None or callable(deadline):
            return
        problem = (
            "'deadline' must be a number of seconds > 0, or a callable taking"
            f" the environ and returning one (or None), got {deadline!r}."
            " Fix: pass e.g. deadline=2.5, or None for no deadline."
        )
    else:
        name = getattr(returned_by, "__qualname__", type(returned_by).__qualname__)
        problem = (
            f"The 'deadline' callable {name!r} returned {deadline!r}: it must"
            " return a number of seconds > 0, or None for no deadline."
        )
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        raise TypeError(problem)
    if not (deadline > 0 and math.isfinite(deadline)):
        raise ValueError(problem)


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"'{name}' must be True or False, got {value!r}.")


def _require_count(name: str, value: object, alternative: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"'{name}' must be an int >= 0{alternative}, got {value!r}.")


def _require_seconds(name: str, value: object, alternative: str = "") -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"'{name}' must be a number of seconds >= 0{alternative}, got {value!r}."
        )


def _engine_of(database: object, what: str) -> Engine:
    """The engine behind a Database, a bound scoped_session or an Engine."""
    engine = database
    if isinstance(database, scoped_session):
        engine = getattr(database, "engine", None) or database.session_factory.kw.get(
            "bind"
        )
    if not isinstance(engine, Engine):
        raise TypeError(
            f"{what} need a wsgi_scoped.Database, a scoped_session bound to one"
            f" Engine, or an Engine, got {type(database).__name__!r} (bound to"
            f" {type(engine).__name__!r}). Create the registry with"
            " scoped_session(sessionmaker(engine))."
        )
    return engine


_NESTED = (
    "{inner} is wrapped inside {outer} for the same registry. The outer layer"
    " manages this request's session, so the inner layer's options would be"
    " silently ignored. Fix: wrap the registry once, give the outermost layer"
    " the options you need, or give the inner layer the same options (or"
    " none) as the outer one."
)
#: A layer's options in ``__init__``'s order (its ``_policy``), and their
#: defaults: an inner layer with the defaults only passes requests through.
_POLICY_NAMES = (
    "commit",
    "commit_veto",
    "retries",
    "stats",
    "server_timing",
    "warn_statements",
    "warn_db_time",
    "trace",
    "deadline",
)


_DEFAULTS = (False, None, 0, False, False, None, None, False, None)


def _check_nesting(inner: t.Any, owner: t.Any) -> None:
    """Refuse an inner layer whose options the owning outer layer would
    silently ignore: it must have the defaults, or the owner's options."""
    if inner._policy != _DEFAULTS and getattr(owner, "_policy", None) != inner._policy:
        raise ValueError(_NESTED.format(inner=inner, outer=owner))


def _describe(policy: tuple[t.Any, ...]) -> str:
    """``", commit=True, retries=2"``: the options that are not defaults."""
    return "".join(
        f", {name}={getattr(value, '__qualname__', value)!r}"
        for name, value, default in zip(_POLICY_NAMES, policy, _DEFAULTS, strict=True)
        if value != default
    )
