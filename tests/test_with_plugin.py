"""The demo API tested the way users are told to: one module-scoped database,
each test isolated by the pytest plugin's rolled-back transaction."""

from __future__ import annotations

import typing as t
from types import ModuleType

import pytest
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import Session
from support import import_example
from support import unload_example


@pytest.fixture(scope="module")
def todo(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[ModuleType]:
    url = f"sqlite:///{tmp_path_factory.mktemp('plugin') / 'todos.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url)
        module = import_example("todo")
    yield module
    unload_example(module)


@pytest.fixture
def wsgi_scoped_registry(todo: ModuleType) -> t.Any:
    return todo.db


@pytest.fixture
def wsgi_scoped_app(todo: ModuleType) -> t.Any:
    return todo.app


def count(session: Session, todo: ModuleType) -> int:
    return int(session.scalar(select(func.count(todo.Todo.id))) or 0)


@pytest.mark.parametrize("title", ["milk", "bread"])
def test_each_test_starts_empty_and_its_writes_vanish(
    wsgi_scoped_testapp: t.Any,
    wsgi_scoped_session: Session,
    wsgi_scoped_queries: t.Any,
    todo: ModuleType,
    title: str,
) -> None:
    """Run twice: the second run sees nothing of the first."""
    assert count(wsgi_scoped_session, todo) == 0
    with wsgi_scoped_queries(max=2):  # INSERT, then the commit's refresh
        created = wsgi_scoped_testapp.post_json("/todos", {"title": title}, status=201)
    assert wsgi_scoped_testapp.get("/todos").json == [created.json]
    assert count(wsgi_scoped_session, todo) == 1


def test_test_data_visible_to_the_app(
    wsgi_scoped_testapp: t.Any, wsgi_scoped_session: Session, todo: ModuleType
) -> None:
    wsgi_scoped_session.add(todo.Todo(title="seeded"))
    wsgi_scoped_session.commit()  # a savepoint: rolled back with the test
    [item] = wsgi_scoped_testapp.get("/todos").json
    assert item["title"] == "seeded"
    wsgi_scoped_testapp.delete(f"/todos/{item['id']}", status=204)
    assert count(wsgi_scoped_session, todo) == 0
