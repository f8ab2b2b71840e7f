"""Helpers shared by the example tests: importing ``examples/*.py``, a
checking WebTest client, and running an example (or ``replica_app.py``)
under a real server."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import typing as t
import urllib.error
import uuid
import warnings
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import event

with warnings.catch_warnings():
    # WebOb 1.8 imports the cgi module, deprecated since Python 3.11.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webtest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

T = t.TypeVar("T")


def import_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` afresh, under a unique module name."""
    unique = f"_example_{name}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(unique, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # declarative mapping looks modules up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        unload_example(module)
        raise
    return module


def unload_example(module: ModuleType) -> None:
    """Forget a module :func:`import_example` made, and dispose of its engine."""
    sys.modules.pop(module.__name__, None)
    if hasattr(module, "db"):
        module.db.remove()
        module.db.engine.dispose()


class CheckedTestApp(webtest.TestApp):
    """A :class:`webtest.TestApp`, linting unless told not to, that checks,
    after every request, that the request's session was ended and its
    connection returned, and records the SQL statements each request executed.
    """

    def __init__(self, module: ModuleType, *, lint: bool = True) -> None:
        super().__init__(module.app, lint=lint)
        self.db = module.db
        self.statements: list[str] = []
        event.listen(self.db.engine, "before_cursor_execute", self._record)

    def _record(self, conn: t.Any, cursor: t.Any, statement: str, *args: t.Any) -> None:
        self.statements.append(statement)

    def do_request(
        self,
        req: webtest.TestRequest,
        status: int | str | None = None,
        expect_errors: bool | None = None,
    ) -> webtest.TestResponse:
        self.statements.clear()
        res = super().do_request(req, status=status, expect_errors=expect_errors)
        assert self.db.engine.pool.checkedout() == 0
        assert not self.db.registry.has()
        return res

    def inserted(self, table: str) -> bool:
        """Whether the last request executed an INSERT into ``table``."""
        return any(s.startswith(f"INSERT INTO {table} ") for s in self.statements)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(
    command: list[str], *, cwd: Path, env: dict[str, str], log: Path
) -> t.Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with its output in ``log`` until the block ends, then
    stop it with SIGTERM (SIGKILL after 10 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_ready(
    probe: t.Callable[[], T], proc: subprocess.Popen[bytes], log: Path, name: str
) -> T:
    """``probe()``'s result once the server ``name`` answers it, for up to 15
    seconds; fail if the server exits or answers with an HTTP error."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return probe()
        except urllib.error.HTTPError as exc:
            exc.close()
            pytest.fail(f"{name} answered {exc.code}:\n{log.read_text()}")
        except OSError:  # not listening yet, or no worker booted yet
            time.sleep(0.1)
    pytest.fail(f"{name} did not answer within 15 s:\n{log.read_text()}")


class SilentHost:
    """A TCP server on 127.0.0.1 that accepts connections and never answers
    them: a database host that hangs. After :meth:`answer`, the connections
    it accepts are forwarded to a real server, while those it already holds
    stay silent; :meth:`freeze` silences the forwarded ones too. Leaving the
    block closes every socket, which ends whatever still waits on one."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._target: tuple[str, int] | None = None
        self._sockets: list[socket.socket] = []
        self._frozen: list[threading.Event] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._stopped = threading.Event()

    def __enter__(self) -> SilentHost:
        self._threads[0].start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._threads[0].join(timeout=5)  # no socket is added from now on
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads[1:]:
            thread.join(timeout=5)

    def answer(self, host: str, port: int) -> None:
        """Forward the connections accepted from now on to ``host:port``."""
        self._target = (host, port)

    def freeze(self) -> None:
        """Stop forwarding on the connections forwarded so far."""
        for frozen in self._frozen:
            frozen.set()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            self.accepted += 1
            self._sockets.append(client)
            if self._target is not None:
                server = socket.create_connection(self._target, timeout=5)
                server.settimeout(None)
                self._sockets.append(server)
                frozen = threading.Event()
                self._frozen.append(frozen)
                for pair in ((client, server), (server, client)):
                    thread = threading.Thread(
                        target=self._forward, args=(*pair, frozen), daemon=True
                    )
                    self._threads.append(thread)
                    thread.start()

    @staticmethod
    def _forward(
        source: socket.socket, sink: socket.socket, frozen: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not frozen.is_set():
                    sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)


def in_child(work: t.Callable[[], object]) -> t.Any:
    """Run ``work`` in a forked child and return its JSON result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(work()).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed; see stderr"
    return json.loads(output)


def http_call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[dict[str, t.Any], dict[str, str]]:
    """One request on a new connection: the JSON body and the headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


@contextlib.contextmanager
def replica_app_server(
    pair: t.Any, tmp_path: Path, worker: str, **environ: str
) -> t.Iterator[int]:
    """``tests/replica_app.py`` under gunicorn (2 workers of ``worker``),
    ready to answer; its port. ``environ`` is added to its environment."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    if worker == "gevent":
        pytest.importorskip("gevent", reason="gevent is not installed")
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "2"]
    command += ["--threads", "8"] if worker == "gthread" else []
    command += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", "replica_app:app"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()]),
        "REPLICA_APP_PRIMARY": pair.primary.render_as_string(),
        "REPLICA_APP_STANDBY": pair.standby.render_as_string(),
        **environ,
    }
    log = tmp_path / "gunicorn.log"
    with running(command, cwd=tmp_path, env=env, log=log) as proc:
        deadline = time.monotonic() + 30
        while True:
            try:
                http_call(port, "GET", "/")
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield port
