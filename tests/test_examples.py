"""The examples, driven through WebTest and, for the todo API, a real gunicorn."""

from __future__ import annotations

import http.client
import json
import os
import sys
import typing as t
import urllib.error
import urllib.request
import wsgiref.util
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
from support import EXAMPLES
from support import CheckedTestApp
from support import free_port
from support import running
from support import wait_until_ready
from support import webtest


@pytest.fixture
def todo(
    load_example: t.Callable[[str], ModuleType], database_path: Path
) -> ModuleType:
    return load_example("todo")


@pytest.fixture
def client(todo: ModuleType) -> CheckedTestApp:
    return CheckedTestApp(todo)


def create(client: CheckedTestApp, title: str, **fields: t.Any) -> dict[str, t.Any]:
    res = client.post_json("/todos", {"title": title, **fields}, status=201)
    return t.cast("dict[str, t.Any]", res.json)


def test_database_url_selects_the_database_file(
    todo: ModuleType, database_path: Path
) -> None:
    assert todo.db.engine.url.database == str(database_path)
    assert database_path.exists()
    assert not Path("todos.sqlite3").exists()


def test_default_database_is_todos_sqlite3_in_current_directory(
    load_example: t.Callable[[str], ModuleType],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    module = load_example("todo")
    assert module.db.engine.url.database == "todos.sqlite3"
    assert (tmp_path / "todos.sqlite3").exists()


def test_tables_are_created_without_registering_a_session(todo: ModuleType) -> None:
    assert not todo.db.registry.has()
    assert todo.db.engine.pool.checkedout() == 0


def test_list_is_empty_on_a_fresh_database(client: CheckedTestApp) -> None:
    res = client.get("/todos")
    assert res.status_int == 200
    assert res.content_type == "application/json"
    assert res.json == []


def test_create_returns_201_with_item_and_location(client: CheckedTestApp) -> None:
    res = client.post_json("/todos", {"title": "Write tests"})
    assert res.status_int == 201
    assert res.content_type == "application/json"
    assert res.json == {"id": 1, "title": "Write tests", "done": False}
    assert res.headers["Location"] == "/todos/1"
    assert client.get(res.headers["Location"]).json == res.json


def test_location_includes_script_name(client: CheckedTestApp) -> None:
    res = client.post_json(
        "/todos", {"title": "mounted"}, extra_environ={"SCRIPT_NAME": "/api"}
    )
    assert res.headers["Location"] == "/api/todos/1"


def test_create_accepts_done(client: CheckedTestApp) -> None:
    assert create(client, "Already done", done=True)["done"] is True


def test_list_returns_every_todo_ordered_by_id(client: CheckedTestApp) -> None:
    created = [create(client, title) for title in ("b", "a", "c")]
    client.delete(f"/todos/{created[1]['id']}", status=204)
    assert client.get("/todos").json == [created[0], created[2]]


def test_get_returns_the_todo(client: CheckedTestApp) -> None:
    create(client, "first")
    second = create(client, "second", done=True)
    res = client.get("/todos/2")
    assert res.content_type == "application/json"
    assert res.json == second


def test_patch_updates_only_given_fields(client: CheckedTestApp) -> None:
    create(client, "Buy milk")
    res = client.patch_json("/todos/1", {"done": True})
    assert res.json == {"id": 1, "title": "Buy milk", "done": True}
    res = client.patch_json("/todos/1", {"title": "Buy oat milk"})
    assert res.json == {"id": 1, "title": "Buy oat milk", "done": True}
    assert client.get("/todos/1").json == res.json


def test_patch_with_empty_object_changes_nothing(client: CheckedTestApp) -> None:
    todo = create(client, "Unchanged")
    assert client.patch_json("/todos/1", {}).json == todo


def test_delete_returns_204_with_empty_body_and_removes_todo(
    client: CheckedTestApp,
) -> None:
    create(client, "Delete me")
    res = client.delete("/todos/1")
    assert res.status_int == 204
    assert res.body == b""
    assert "Content-Type" not in res.headers
    client.get("/todos/1", status=404)
    assert client.get("/todos").json == []


def test_stream_returns_one_json_line_per_todo(client: CheckedTestApp) -> None:
    todos = [create(client, f"todo {n}", done=n % 2 == 0) for n in range(3)]
    res = client.get("/todos.ndjson")
    assert res.status_int == 200
    assert res.content_type == "application/x-ndjson"
    assert res.body.endswith(b"\n")
    assert [json.loads(line) for line in res.body.splitlines()] == todos


def test_stream_of_empty_database_is_empty(client: CheckedTestApp) -> None:
    assert client.get("/todos.ndjson").body == b""


def test_stream_queries_while_iterated_and_ends_session_on_close(
    client: CheckedTestApp, todo: ModuleType
) -> None:
    """The generator body runs its query through ``db()`` only when the
    server iterates it, and the middleware ends that session in ``close()``.
    """
    create(client, "one")
    create(client, "two")
    environ: dict[str, t.Any] = {"PATH_INFO": "/todos.ndjson"}
    wsgiref.util.setup_testing_defaults(environ)
    statuses: list[str] = []
    body = todo.app(environ, lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"]
    assert not todo.db.registry.has()
    chunks = iter(body)
    assert json.loads(next(chunks))["title"] == "one"
    assert todo.db.registry.has()
    assert todo.db.engine.pool.checkedout() == 1
    body.close()
    assert not todo.db.registry.has()
    assert todo.db.engine.pool.checkedout() == 0


def test_unwrapped_api_leaves_session_registered(todo: ModuleType) -> None:
    """Without the middleware the session outlives the request: what the
    checks after every request in these tests would catch.
    """
    webtest.TestApp(todo.api, lint=True).get("/todos")
    assert todo.db.registry.has()
    assert todo.db.engine.pool.checkedout() == 1
    todo.db.remove()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{", "not valid JSON", id="malformed JSON"),
        pytest.param(b"\xff", "not valid JSON", id="not UTF-8"),
        pytest.param(b"", "not valid JSON", id="empty body"),
        pytest.param(b'["title"]', "must be a JSON object", id="array"),
        pytest.param(b"{}", "'title' must be", id="missing title"),
        pytest.param(b'{"title": ""}', "'title' must be", id="empty title"),
        pytest.param(b'{"title": "  "}', "'title' must be", id="blank title"),
        pytest.param(b'{"title": 3}', "'title' must be", id="title not a string"),
        pytest.param(b'{"title": null}', "'title' must be", id="title null"),
        pytest.param(
            json.dumps({"title": "x" * 201}).encode(),
            "'title' must be",
            id="title too long",
        ),
        pytest.param(b'{"title": "a", "done": 1}', "'done' must be", id="done integer"),
        pytest.param(
            b'{"title": "a", "done": "no"}', "'done' must be", id="done string"
        ),
        pytest.param(
            b'{"title": "a", "tags": []}', "Unknown fields", id="unknown field"
        ),
    ],
)
def test_create_rejects_invalid_body_with_400(
    client: CheckedTestApp, body: bytes, message: str
) -> None:
    res = client.post("/todos", body, content_type="application/json", status=400)
    assert res.content_type == "application/json"
    assert message in res.json["error"]
    assert client.get("/todos").json == []


def test_create_accepts_title_of_200_characters(client: CheckedTestApp) -> None:
    assert create(client, "x" * 200)["title"] == "x" * 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"[", "not valid JSON", id="malformed JSON"),
        pytest.param(b'{"title": ""}', "'title' must be", id="empty title"),
        pytest.param(b'{"title": false}', "'title' must be", id="title not a string"),
        pytest.param(b'{"done": null}', "'done' must be", id="done null"),
        pytest.param(b'{"id": 7}', "Unknown fields", id="id"),
    ],
)
def test_patch_rejects_invalid_body_with_400_and_keeps_todo(
    client: CheckedTestApp, body: bytes, message: str
) -> None:
    todo = create(client, "Keep me")
    res = client.patch("/todos/1", body, content_type="application/json", status=400)
    assert message in res.json["error"]
    assert client.get("/todos/1").json == todo


@pytest.mark.parametrize(
    "content_length",
    [
        pytest.param("abc", id="not a number"),
        pytest.param("-1", id="negative"),
        pytest.param("\u00b2", id="non-ASCII digit"),
    ],
)
def test_invalid_content_length_is_400(todo: ModuleType, content_length: str) -> None:
    """WebTest's lint rejects such an environ before the app sees it, so this
    test runs without it; wsgiref passes the header through unchecked.
    """
    client = CheckedTestApp(todo, lint=False)
    req = webtest.TestRequest.blank("/todos", method="POST")
    req.environ["CONTENT_LENGTH"] = content_length
    res = client.do_request(req, status=400)
    assert res.json == {"error": f"Invalid Content-Length {content_length!r}."}


def test_missing_content_length_reads_an_empty_body(client: CheckedTestApp) -> None:
    req = webtest.TestRequest.blank("/todos", method="POST")
    req.environ.pop("CONTENT_LENGTH", None)
    res = client.do_request(req, status=400)
    assert res.json == {"error": "The body is not valid JSON."}


def test_body_over_the_limit_is_413(client: CheckedTestApp, todo: ModuleType) -> None:
    body = b" " * (todo.MAX_BODY_SIZE + 1)
    res = client.post("/todos", body, content_type="application/json", status=413)
    assert res.json == {"error": f"Body over {todo.MAX_BODY_SIZE} bytes."}


def test_body_at_the_limit_is_read(client: CheckedTestApp, todo: ModuleType) -> None:
    body = json.dumps({"title": "limit"}).encode()
    body = body.ljust(todo.MAX_BODY_SIZE)
    res = client.post("/todos", body, content_type="application/json", status=201)
    assert res.json["title"] == "limit"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/todos/1", id="get"),
        pytest.param("PATCH", "/todos/1", id="patch"),
        pytest.param("DELETE", "/todos/1", id="delete"),
        pytest.param("GET", "/todos/999999999999999999", id="largest id"),
    ],
)
def test_unknown_id_is_404(client: CheckedTestApp, method: str, path: str) -> None:
    req = webtest.TestRequest.blank(path, method=method)
    if method == "PATCH":
        req.body = b'{"done": true}'
        req.content_type = "application/json"
    res = client.do_request(req, status=404)
    assert res.content_type == "application/json"
    assert res.json["error"].startswith("No todo with id")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/", id="root"),
        pytest.param("/todo", id="singular"),
        pytest.param("/todos/", id="trailing slash"),
        pytest.param("/todos/abc", id="not a number"),
        pytest.param("/todos/1/done", id="nested"),
        pytest.param("/todos/-1", id="negative"),
        pytest.param("/todos/" + "9" * 19, id="id too long for SQLite"),
    ],
)
def test_unknown_path_is_404(client: CheckedTestApp, path: str) -> None:
    res = client.get(path, status=404)
    assert res.content_type == "application/json"
    assert res.json == {"error": f"No route for {path!r}."}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        pytest.param("PUT", "/todos", "GET, HEAD, POST", id="PUT list"),
        pytest.param("DELETE", "/todos", "GET, HEAD, POST", id="DELETE list"),
        pytest.param("PUT", "/todos/1", "GET, HEAD, PATCH, DELETE", id="PUT item"),
        pytest.param("POST", "/todos/1", "GET, HEAD, PATCH, DELETE", id="POST item"),
        pytest.param("POST", "/todos.ndjson", "GET, HEAD", id="POST stream"),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: CheckedTestApp, method: str, path: str, allow: str
) -> None:
    create(client, "exists")
    req = webtest.TestRequest.blank(path, method=method)
    if method in ("PUT", "POST"):
        req.body = b'{"title": "x"}'
        req.content_type = "application/json"
    res = client.do_request(req, status=405)
    assert res.headers["Allow"] == allow
    assert res.content_type == "application/json"
    assert res.json == {"error": f"Use {allow}."}
    assert client.get("/todos").json == [{"id": 1, "title": "exists", "done": False}]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/todos", id="list"),
        pytest.param("/todos/1", id="item"),
        pytest.param("/todos/2", id="unknown id"),
        pytest.param("/todos.ndjson", id="stream"),
        pytest.param("/nowhere", id="unknown path"),
    ],
)
def test_head_answers_like_get_without_a_body(
    client: CheckedTestApp, path: str
) -> None:
    create(client, "exists")
    get = client.get(path, expect_errors=True)
    head = client.head(path, expect_errors=True)
    assert head.status == get.status
    assert head.body == b""
    # WebTest adds the length of a body sent without one (the stream).
    if "Content-Length" not in head.headers:
        del get.headers["Content-Length"]
    assert sorted(head.headers.items()) == sorted(get.headers.items())


def test_head_of_the_stream_runs_no_query(client: CheckedTestApp) -> None:
    create(client, "exists")
    client.head("/todos.ndjson", status=200)
    assert client.statements == []


def chunked_post(
    client: CheckedTestApp, body: bytes, *, decoded: bool, status: int
) -> webtest.TestResponse:
    """POST ``body`` as a server passes a chunked body on: no
    ``CONTENT_LENGTH``, and ``wsgi.input_terminated`` if it decoded it."""
    req = webtest.TestRequest.blank("/todos", method="POST", body=body)
    req.content_type = "application/json"
    req.environ.pop("CONTENT_LENGTH")
    req.environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    if decoded:
        req.environ["wsgi.input_terminated"] = True
    return client.do_request(req, status=status)


def test_chunked_body_decoded_by_the_server_is_read(client: CheckedTestApp) -> None:
    res = chunked_post(client, b'{"title": "chunked"}', decoded=True, status=201)
    assert res.json == {"id": 1, "title": "chunked", "done": False}


@pytest.mark.parametrize(
    ("extra", "status"),
    [pytest.param(0, 201, id="at the limit"), pytest.param(1, 413, id="over it")],
)
def test_chunked_body_over_the_limit_is_413(
    client: CheckedTestApp, todo: ModuleType, extra: int, status: int
) -> None:
    body = json.dumps({"title": "limit"}).encode().ljust(todo.MAX_BODY_SIZE + extra)
    res = chunked_post(client, body, decoded=True, status=status)
    if status == 413:
        assert res.json == {"error": f"Body over {todo.MAX_BODY_SIZE} bytes."}
        assert client.get("/todos").json == []


def test_chunked_body_the_server_did_not_decode_is_411(client: CheckedTestApp) -> None:
    res = chunked_post(client, b'{"title": "chunked"}', decoded=False, status=411)
    assert "send a Content-Length" in res.json["error"]
    assert client.get("/todos").json == []


def _http(
    port: int, method: str, path: str, chunks: list[bytes] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request over a real socket; ``chunks`` are sent chunked, with the
    head in one write (a server that answers before reading the body, as
    wsgiref does with a 411, must not make the client's write fail)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers, body = {}, None
        if chunks is not None:
            headers = {"Content-Type": "application/json"}
            headers["Transfer-Encoding"] = "chunked"
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
            body += b"0\r\n\r\n"
        connection.request(method, path, body=body, headers=headers)
        res = connection.getresponse()
        return res.status, dict(res.headers), res.read()
    finally:
        connection.close()


DEMO_SERVERS = [
    pytest.param([str(EXAMPLES / "todo.py")], "waitress", id="README demo command"),
    pytest.param(
        ["-m", "gunicorn", "--pythonpath", str(EXAMPLES)], "gunicorn", id="gunicorn"
    ),
]


@pytest.mark.server
@pytest.mark.parametrize(("args", "server"), DEMO_SERVERS)
def test_demo_reads_chunked_bodies_and_answers_head_over_http(
    tmp_path: Path, args: list[str], server: str
) -> None:
    """As a new user meets it: ``python examples/todo.py`` (served by waitress,
    which the ``examples`` extra installs), or gunicorn, on its default SQLite
    database, gets a JSON body sent chunked and a HEAD request."""
    pytest.importorskip(server, reason=f"{server} is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PORT"] = str(port)
    command = [sys.executable, *args]
    if server == "gunicorn":
        command += ["-b", f"127.0.0.1:{port}"]
        if _has_control_socket():
            command.append("--no-control-socket")
        command.append("todo:app")
    log = tmp_path / "server.log"
    with running(command, cwd=tmp_path, env=env, log=log) as proc:
        probe = partial(_http, port, "GET", "/todos")
        assert wait_until_ready(probe, proc, log, server)[0] == 200
        status, _, body = _http(port, "POST", "/todos", [b'{"title":', b' "milk"}'])
        assert (status, json.loads(body)["title"]) == (201, "milk"), body
        status, headers, body = _http(port, "HEAD", "/todos")
        assert (status, body) == (200, b"")
        assert headers["Content-Type"] == "application/json"
        if server == "waitress":  # reads the whole body before calling the app
            chunks = [b" " * 65536] * 48  # 3 MiB
            status, _, body = _http(port, "POST", "/todos", chunks)
            assert status == 413, body
            assert json.loads(body) == {"error": "Body over 1048576 bytes."}
        status, _, body = _http(port, "GET", "/todos")
        assert [todo["title"] for todo in json.loads(body)] == ["milk"]
    assert (tmp_path / "todos.sqlite3").exists()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.server
def test_demo_under_wsgiref_answers_chunked_bodies_411(tmp_path: Path) -> None:
    """Without waitress the demo falls back to wsgiref, which passes a chunked
    body on undecoded: the demo says so instead of reading it as empty."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PORT"] = str(port)
    code = "import runpy, sys; sys.modules['waitress'] = None; "
    code += f"runpy.run_path({str(EXAMPLES / 'todo.py')!r}, run_name='__main__')"
    log = tmp_path / "server.log"
    with running([sys.executable, "-c", code], cwd=tmp_path, env=env, log=log) as p:
        wait_until_ready(partial(_http, port, "GET", "/todos"), p, log, "wsgiref")
        status, _, body = _http(port, "POST", "/todos", [b'{"title": "milk"}'])
    assert status == 411, body
    assert "serve the app with waitress or gunicorn" in json.loads(body)["error"]


def _has_control_socket() -> bool:
    from gunicorn.config import Config

    # gunicorn >= 25 would otherwise open a socket in ~/.gunicorn.
    return "control_socket_disable" in Config().settings


def _request(
    url: str, method: str = "GET", payload: object = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as res:
        return res.status, dict(res.headers), res.read()


@pytest.mark.server
def test_todo_serves_under_gunicorn_with_two_workers(tmp_path: Path) -> None:
    """Two sync workers share one SQLite file (created by whichever imports
    the app first): todos created through either are listed and streamed by
    either, and SIGTERM shuts everything down cleanly.
    """
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    from gunicorn.config import Config

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    database = tmp_path / "todos.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{database}"}
    args = ["-w", "2", "-k", "sync", "-b", f"127.0.0.1:{port}"]
    args += ["--graceful-timeout", "5", "--chdir", str(EXAMPLES)]
    if "control_socket_disable" in Config().settings:
        # gunicorn >= 25 would otherwise open a socket in ~/.gunicorn.
        args.append("--no-control-socket")
    log = tmp_path / "gunicorn.log"
    command = [sys.executable, "-m", "gunicorn", *args, "todo:app"]
    with running(command, cwd=tmp_path, env=env, log=log) as proc:
        wait_until_ready(partial(_request, f"{base}/todos"), proc, log, "gunicorn")
        created: list[dict[str, t.Any]] = []
        for n in range(4):
            status, headers, body = _request(
                f"{base}/todos", "POST", {"title": f"todo {n}"}
            )
            assert status == 201
            assert headers["Location"] == f"/todos/{n + 1}"
            created.append(json.loads(body))
        assert [todo["title"] for todo in created] == [f"todo {n}" for n in range(4)]
        for _ in range(4):
            status, headers, body = _request(f"{base}/todos")
            assert status == 200
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body) == created
        status, headers, body = _request(f"{base}/todos.ndjson")
        assert status == 200
        assert headers["Content-Type"] == "application/x-ndjson"
        assert [json.loads(line) for line in body.splitlines()] == created
        status, _, body = _request(f"{base}/todos/2")
        assert json.loads(body) == created[1]
        with pytest.raises(urllib.error.HTTPError) as exc_info:
            _request(f"{base}/todos/99")
        assert exc_info.value.code == 404
        exc_info.value.close()
        assert database.exists()
    output = log.read_text()
    assert proc.returncode == 0, output
    assert output.count("Booting worker") == 2, output
    assert "Traceback" not in output, output
