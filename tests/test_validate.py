"""PEP 3333 conformance with wsgiref.validate outside and inside the middleware.

An outer validator sees the middleware's own result, so it covers the
materialized path; an inner one turns every body into a lazy IteratorWrapper.
"""

from __future__ import annotations

import gc
import typing as t
from wsgiref.validate import validator

import pytest
from conftest import BODY_KINDS
from conftest import CountingSession
from conftest import Observed
from conftest import StartResponseRecorder
from conftest import count_items
from conftest import make_app
from sqlalchemy import Engine
from sqlalchemy.orm import scoped_session

from wsgi_scoped import ScopedSessionMiddleware

if t.TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment


@pytest.mark.parametrize("body_kind", BODY_KINDS)
@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("commit", [False, True], ids=["commit=False", "commit=True"])
@pytest.mark.parametrize(
    "chunks_read",
    [pytest.param(None, id="exhausted"), pytest.param(1, id="closed early")],
)
def test_validator_passes_and_session_ended(
    registry: scoped_session[CountingSession],
    engine: Engine,
    environ: WSGIEnvironment,
    start_response: StartResponseRecorder,
    body_kind: str,
    placement: str,
    chunks_read: int | None,
    commit: bool,
) -> None:
    observed = Observed()
    app = make_app(registry, body_kind, observed)
    if placement == "outside":
        wrapped = validator(ScopedSessionMiddleware(app, registry, commit=commit))
    else:
        wrapped = ScopedSessionMiddleware(validator(app), registry, commit=commit)

    body = wrapped(environ, start_response)
    iterator = iter(body)
    chunks = list(iterator) if chunks_read is None else [next(iterator)]
    body.close()  # type: ignore[attr-defined]
    del body, iterator
    gc.collect()  # IteratorWrapper.__del__ asserts that it was closed

    assert chunks
    assert start_response.status == "200 OK"
    assert observed.sessions[0].closed == 1  # type: ignore[attr-defined]
    assert not registry.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert count_items(engine) == (1 if commit else 0)
