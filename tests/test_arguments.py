"""Construction: what each argument of ScopedSessionMiddleware accepts, and
the whole message of what it refuses (README: "Bad input gets a clear
error"). A message is the user's only guide to the fix, so each is compared
in full, not by a fragment."""

from __future__ import annotations

import inspect
import re
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session
from sqlalchemy.orm import sessionmaker

from wsgi_scoped import Database
from wsgi_scoped import ScopedSessionMiddleware
from wsgi_scoped import default_commit_veto
from wsgi_scoped.health import HealthCheck
from wsgi_scoped.pytest_plugin import count_queries
from wsgi_scoped.pytest_plugin import wait_for_replica

if t.TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment


def noop_app(environ: WSGIEnvironment, start_response: StartResponse) -> t.Any:
    start_response("204 No Content", [])
    return []


def refused(
    error: type[Exception], message: str, *args: t.Any, **options: t.Any
) -> None:
    with pytest.raises(error) as caught:
        ScopedSessionMiddleware(*args, **options)
    assert type(caught.value) is error
    assert str(caught.value) == message


EXPECTED_REGISTRY = (
    "'registry' must be a sqlalchemy.orm.scoped_session or a"
    " wsgi_scoped.Database, got {!r}."
)


@pytest.mark.parametrize(
    ("app", "registry", "message"),
    [
        pytest.param(
            noop_app,
            sessionmaker(),
            EXPECTED_REGISTRY.format("sessionmaker")
            + " Wrap it: scoped_session(sessionmaker(...)).",
            id="sessionmaker",
        ),
        pytest.param(
            noop_app,
            Session(),
            EXPECTED_REGISTRY.format("Session")
            + " One Session would be shared by every request; pass"
            " scoped_session(sessionmaker(...)) instead.",
            id="session",
        ),
        pytest.param(
            noop_app,
            None,
            EXPECTED_REGISTRY.format("NoneType")
            + " Create one with scoped_session(sessionmaker(engine)).",
            id="none",
        ),
        pytest.param(
            "app",
            scoped_session(sessionmaker()),
            "'app' must be a WSGI application (a callable taking environ and"
            " start_response), got 'str'.",
            id="app not callable",
        ),
        pytest.param(
            scoped_session(sessionmaker()),
            noop_app,
            "'app' is a scoped_session: the arguments are swapped."
            " Use ScopedSessionMiddleware(app, registry).",
            id="swapped",
        ),
    ],
)
def test_wrong_arguments_fail_at_construction(
    app: t.Any, registry: t.Any, message: str
) -> None:
    refused(TypeError, message, app, registry)


def test_unknown_option_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="commit_policy"):
        ScopedSessionMiddleware(
            noop_app, scoped_session(sessionmaker()), commit_policy=1
        )  # type: ignore[call-arg]


NEEDS_COMMIT = (
    "'{0}' needs commit=True: without it the handlers commit their own"
    " work, which the middleware can neither veto nor run again. Pass"
    " commit=True, or drop '{0}'."
)
BOOL = "'{}' must be True or False, got {!r}."
COUNT = "'{}' must be an int >= 0{}, got {!r}."
SECONDS = "'{}' must be a number of seconds >= 0{}, got {!r}."
TRACE = (
    "'trace' must be True, False or the name of a request id header"
    " such as 'X-Request-Id', got {!r}."
)
#: (options, error, the whole message): commit=True where an option needs it.
WRONG_OPTIONS = [
    *[
        ({name: value}, TypeError, BOOL.format(name, value))
        for name, value in [
            ("commit", 1),
            ("commit", None),
            ("stats", 1),
            ("server_timing", "yes"),
        ]
    ],
    *[
        ({"commit": True, name: value}, ValueError, COUNT.format(name, "", value))
        for name, value in [
            ("retries", -1),
            ("retries", True),
            ("retries", 2.0),
            ("replay_memory", -1),
            ("replay_memory", "1MB"),
            ("replay_limit", 1.5),
            ("replay_limit", -1),
        ]
    ],
    *[
        (
            {"commit": True, "retry_backoff": value},
            ValueError,
            SECONDS.format("retry_backoff", "", value),
        )
        for value in [-1, "1s", False]
    ],
    (
        {"warn_statements": -1},
        ValueError,
        COUNT.format("warn_statements", " or None", -1),
    ),
    *[
        (
            {"warn_db_time": value},
            ValueError,
            SECONDS.format("warn_db_time", " or None", value),
        )
        for value in ["1s", -0.5]
    ],
    *[({"trace": value}, TypeError, TRACE.format(value)) for value in ["", 1]],
    (
        {"commit": True, "commit_veto": "x"},
        TypeError,
        "'commit_veto' must be a callable (environ, status, headers) -> bool,"
        " got 'str'.",
    ),
    ({"retries": 2}, ValueError, NEEDS_COMMIT.format("retries")),
    (
        {"commit_veto": default_commit_veto},
        ValueError,
        NEEDS_COMMIT.format("commit_veto"),
    ),
    (
        {"commit_veto": default_commit_veto, "retries": 1},
        ValueError,
        NEEDS_COMMIT.format("commit_veto"),
    ),
]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    WRONG_OPTIONS,
    ids=[repr(options) for options, _, _ in WRONG_OPTIONS],
)
def test_wrong_options_fail_at_construction(
    options: dict[str, t.Any], error: type[Exception], message: str
) -> None:
    refused(error, message, noop_app, scoped_session(sessionmaker()), **options)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            {"commit": True, "retries": 0, "replay_memory": 0, "replay_limit": 0},
            id="zero counts",
        ),
        pytest.param({"commit": True, "retry_backoff": 0}, id="no backoff"),
        pytest.param({"commit": True, "retry_backoff": 0.5}, id="float backoff"),
        pytest.param(
            {"commit": True, "retries": 1, "commit_veto": default_commit_veto},
            id="veto and retries",
        ),
        pytest.param({"commit": False, "retries": 0}, id="no retries without commit"),
        pytest.param(
            {"warn_statements": 0, "warn_db_time": 0, "trace": "X-Request-Id"},
            id="zero limits",
        ),
        pytest.param({"warn_db_time": 0.25, "trace": True}, id="float warn_db_time"),
        pytest.param({"stats": True, "server_timing": True}, id="observing"),
    ],
)
def test_the_edges_of_each_range_are_accepted(options: dict[str, t.Any]) -> None:
    """0 is a valid count and a valid number of seconds, and a float is a
    valid number of seconds: each is kept as given."""
    engine = create_engine("sqlite://")
    layer = ScopedSessionMiddleware(
        noop_app, scoped_session(sessionmaker(engine)), **options
    )
    for name in ("commit", "retries", "replay_memory", "replay_limit", "retry_backoff"):
        if name in options:
            assert getattr(layer, name) == options[name]
    engine.dispose()


@pytest.mark.parametrize(
    ("what", "make"),
    [
        pytest.param(
            "Statistics",
            lambda registry: ScopedSessionMiddleware(noop_app, registry, stats=True),
            id="stats",
        ),
        pytest.param(
            "Health checks", lambda registry: HealthCheck(registry), id="health"
        ),
    ],
)
def test_features_that_need_an_engine_name_the_fix(
    what: str, make: t.Callable[[t.Any], object]
) -> None:
    with pytest.raises(TypeError) as caught:
        make(scoped_session(sessionmaker()))
    assert str(caught.value) == (
        f"{what} need a wsgi_scoped.Database, a scoped_session bound to one"
        " Engine, or an Engine, got 'scoped_session' (bound to 'NoneType')."
        " Create the registry with scoped_session(sessionmaker(engine))."
    )


def test_a_registry_bound_to_a_connection_names_what_it_is_bound_to() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        with pytest.raises(TypeError) as caught:
            HealthCheck(scoped_session(sessionmaker(connection)))
    assert str(caught.value) == (
        "Health checks need a wsgi_scoped.Database, a scoped_session bound to one"
        " Engine, or an Engine, got 'scoped_session' (bound to 'Connection')."
        " Create the registry with scoped_session(sessionmaker(engine))."
    )
    engine.dispose()


def test_features_find_the_engine_of_a_database_a_bound_registry_or_an_engine() -> None:
    db = Database("sqlite://")
    bound = scoped_session(sessionmaker(db.engine))
    for database in (db, bound, db.engine):
        assert HealthCheck(database).engine is db.engine
    db.engine.dispose()


README = Path(__file__).resolve().parent.parent / "README.rst"


@pytest.mark.parametrize(
    "documented",
    [ScopedSessionMiddleware, Database, HealthCheck, wait_for_replica, count_queries],
    ids=lambda each: each.__name__,
)
def test_the_api_reference_gives_each_signature(
    documented: t.Callable[..., t.Any],
) -> None:
    """README's API reference shows each parameter with its default, as
    the code has it: a default changed in one place only is caught."""
    reference = " ".join(README.read_text().partition("API reference")[2].split())
    name = documented.__name__
    [shown] = re.findall(rf"``{name}\((.*?)\)``", reference)
    signature = inspect.signature(documented)
    expected, star = [], False
    for each in signature.parameters.values():
        if each.kind == each.VAR_KEYWORD:
            expected.append(f"**{each.name}")
            continue
        if each.kind == each.KEYWORD_ONLY and not star:
            expected.append("*")
            star = True
        default = "" if each.default is each.empty else f"={each.default!r}"
        expected.append(f"{each.name}{default}")
    assert shown.split(", ") == expected
