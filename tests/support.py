"""Helpers shared by the example tests: importing ``examples/*.py``, a
checking WebTest client, and running an example under a real server."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import socket
import subprocess
import sys
import time
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
