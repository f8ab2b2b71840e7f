"""A private PostgreSQL primary and a streaming hot standby, on free ports of
127.0.0.1, for ``tests/test_replicas.py`` and ``benchmarks/replicas.py``:
``initdb``, ``pg_basebackup -R``, both stopped at the end. The pytest
plugin's ``paused_replica()`` holds the standby back deterministically, and
its ``wait_for_replica()`` waits for it to catch up."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest
from sqlalchemy import URL
from sqlalchemy import Engine
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from wsgi_scoped.pytest_plugin import wait_for_replica

#: The programs the pair needs, found on PATH or in Debian's versioned directory.
_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
#: The user the servers run as when the tests run as root, which initdb refuses.
RUN_AS = "postgres"
#: Seconds any step of starting or stopping the pair may take.
_TIMEOUT = 60
#: Directories of pairs already running (``python tests/replica_pair.py``
#: prints one), separated by ":". A test session borrows one that no other
#: session holds instead of starting its own, and leaves it running:
#: mutation testing runs thousands of short sessions (README: Mutation
#: testing).
RUNNING = "WSGI_SCOPED_PAIRS"


@dataclasses.dataclass
class Pair:
    primary: URL
    standby: URL
    directory: Path


def _find(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"))
    return versions[-1] if versions else None


def unusable_reason() -> str | None:
    """Why the pair cannot run here, or ``None`` if it can."""
    missing = [program for program in _PROGRAMS if _find(program) is None]
    if missing:
        return (
            f"the PostgreSQL server programs {', '.join(missing)} are not installed"
            " (Debian: apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"initdb refuses to run as root, and there is no {RUN_AS!r} user"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: list[str], directory: Path) -> None:
    program = _find(command[0])
    if program is None:  # pragma: no cover - unusable_reason() said so first
        raise RuntimeError(f"{command[0]} is not installed")
    full = [program, *command[1:]]
    if os.geteuid() == 0:
        full = ["runuser", "-u", RUN_AS, "--", *full]
    result = subprocess.run(
        full,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=_TIMEOUT,
    )
    if result.returncode:
        logs = "\n".join(
            path.read_text(errors="replace")[-3000:] for path in directory.glob("*.log")
        )
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}"
            f"{result.stderr.decode(errors='replace')}\n{logs}"
        )


def _start(directory: Path, name: str, port: int) -> None:
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {directory}"
    log = f"{name}.log"
    _run(
        ["pg_ctl", "-D", name, "-l", log, "-w", "-t", "30", "-o", options, "start"],
        directory,
    )


def _pair(directory: Path, primary_port: int, standby_port: int) -> Pair:
    url = URL.create(
        "postgresql+psycopg", username="postgres", host="127.0.0.1", database="postgres"
    )
    return Pair(url.set(port=primary_port), url.set(port=standby_port), directory)


@contextlib.contextmanager
def run_pair() -> t.Iterator[Pair]:
    """Start a primary and a hot standby streaming from it, each on a free
    port of 127.0.0.1, with a table ``item (id serial, name text)``; yield
    their URLs once the standby has replayed that table, and stop both on
    exit."""
    # Not pytest's tmp_path: the servers may run as another user, who cannot
    # enter root's 0700 pytest directory.
    directory = Path(tempfile.mkdtemp(prefix="wsgi_scoped_pair_"))
    started: list[str] = []
    try:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        primary_port, standby_port = _free_port(), _free_port()
        _run(
            ["initdb", "-D", "primary", "-U", "postgres", "--auth=trust", "--no-sync"],
            directory,
        )
        with (directory / "primary" / "postgresql.conf").open("a") as conf:
            # Speed for throwaway servers; synchronous_commit stays on.
            conf.write("fsync = off\nfull_page_writes = off\n")
        _start(directory, "primary", primary_port)
        started.append("primary")
        _run(
            [
                "pg_basebackup",
                "-h",
                "127.0.0.1",
                "-p",
                str(primary_port),
                "-U",
                "postgres",
                "-D",
                "standby",
                "-R",
                "--no-sync",
                "--checkpoint=fast",
            ],
            directory,
        )
        _start(directory, "standby", standby_port)
        started.append("standby")
        pair = _pair(directory, primary_port, standby_port)
        ports = {"primary": primary_port, "standby": standby_port}
        (directory / "pair.json").write_text(json.dumps(ports))
        with _engine(pair.primary) as primary:
            with primary.begin() as connection:
                connection.execute(
                    text("CREATE TABLE item (id serial PRIMARY KEY, name text)")
                )
            wait_for_replica(primary, pair.standby, timeout=_TIMEOUT)
        yield pair
    finally:
        for name in reversed(started):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run(["pg_ctl", "-D", name, "-m", "immediate", "-w", "stop"], directory)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def pair_or_skip() -> t.Iterator[Pair]:
    """:func:`run_pair` for a fixture: skip the test if the pair cannot run
    here, or fail it under ``WSGI_SCOPED_REQUIRE_SERVERS``."""
    reason = unusable_reason()
    if reason is not None:
        reason = f"read replicas need a primary + standby pair: {reason}"
        if os.environ.get("WSGI_SCOPED_REQUIRE_SERVERS"):
            pytest.fail(reason)
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        yield _borrow(stack) or stack.enter_context(run_pair())


def _borrow(stack: contextlib.ExitStack) -> Pair | None:
    """A running pair of :data:`RUNNING` that no other session holds (a
    lock on its directory, released by ``stack``), as a fresh one would be:
    both servers up, replay resumed and caught up. ``None`` if none is free.
    """
    for name in filter(None, os.environ.get(RUNNING, "").split(":")):
        directory = Path(name)
        lock = (directory / "lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        stack.callback(lock.close)
        ports = json.loads((directory / "pair.json").read_text())
        pair = _pair(directory, ports["primary"], ports["standby"])
        # A session killed halfway may have left a server stopped or replay
        # paused.
        for server in ("primary", "standby"):
            try:
                _run(["pg_ctl", "-D", server, "status"], directory)
            except RuntimeError:  # exit status 3: not running
                start(pair, server)  # type: ignore[arg-type]
        with _engine(pair.standby) as standby, standby.connect() as connection:
            connection.execute(text("SELECT pg_wal_replay_resume()"))
        wait_for_replica(pair.primary, pair.standby, timeout=_TIMEOUT)
        return pair
    return None


@contextlib.contextmanager
def _engine(url: URL) -> t.Iterator[Engine]:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        yield engine
    finally:
        engine.dispose()


def stop(pair: Pair, server: t.Literal["primary", "standby"]) -> None:
    """Stop one server of the pair at once (``pg_ctl stop -m immediate``):
    its connections drop, and new ones are refused."""
    _run(["pg_ctl", "-D", server, "-m", "immediate", "-w", "stop"], pair.directory)


def start(pair: Pair, server: t.Literal["primary", "standby"]) -> None:
    """Start a server that :func:`stop` stopped, on its port again."""
    url = pair.primary if server == "primary" else pair.standby
    _start(pair.directory, server, t.cast(int, url.port))


if __name__ == "__main__":
    # Start a pair for RUNNING, print its directory, stop it on SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with run_pair() as running:
        print(running.directory, flush=True)
        signal.pause()
