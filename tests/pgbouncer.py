"""A private PgBouncer in transaction pooling mode, in front of the test
PostgreSQL, for ``tests/test_servers.py``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import typing as t
from pathlib import Path

from sqlalchemy import URL
from sqlalchemy import create_engine
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

#: Where Debian and others install it, outside a non-root user's PATH.
_PLACES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer")
#: The user PgBouncer runs as when the tests run as root, which it refuses.
RUN_AS = "postgres"


@dataclasses.dataclass
class PgBouncer:
    url: URL
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def find_pgbouncer() -> str | None:
    """The path of the ``pgbouncer`` program, or ``None``."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in _PLACES if os.access(path, os.X_OK)), None)


def unusable_reason() -> str | None:
    """Why PgBouncer cannot run here, or ``None`` if it can."""
    if find_pgbouncer() is None:
        return "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"pgbouncer refuses to run as root, and there is no {RUN_AS!r} user"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_pgbouncer(server: URL, *, pool_size: int = 10) -> t.Iterator[PgBouncer]:
    """Start PgBouncer on a free port of 127.0.0.1, in transaction pooling
    mode with at most ``pool_size`` connections to ``server``; yield it once
    a query goes through it, and stop it on exit."""
    binary = find_pgbouncer()
    if binary is None:
        raise RuntimeError(unusable_reason())
    # Not pytest's tmp_path: PgBouncer may run as another user, who cannot
    # enter root's 0700 pytest directory.
    directory = Path(tempfile.mkdtemp(prefix="wsgi_scoped_pgbouncer_"))
    try:
        port = _free_port()
        database = server.database or "postgres"
        user = server.username or RUN_AS
        target = f"host={server.host or '127.0.0.1'} port={server.port or 5432}"
        target += f" dbname={database} user={user}"
        if server.password:
            target += f" password={server.password}"
        (directory / "userlist.txt").write_text(f'"{user}" ""\n')
        (directory / "pgbouncer.ini").write_text(
            f"""\
[databases]
{database} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
"""
        )
        command = [binary]
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            for path in (directory, *directory.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command += ["-u", RUN_AS]
        log = directory / "pgbouncer.out"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*command, str(directory / "pgbouncer.ini")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        bouncer = PgBouncer(server.set(host="127.0.0.1", port=port), log)
        try:
            _wait_until_ready(bouncer, proc)
            yield bouncer
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_ready(bouncer: PgBouncer, proc: subprocess.Popen[bytes]) -> None:
    engine = create_engine(
        bouncer.url,
        poolclass=NullPool,
        connect_args={"connect_timeout": 2},
    )
    deadline = time.monotonic() + 15
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {proc.returncode}:\n{bouncer.log_tail()}"
                )
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return
            except OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not answer within 15 s:\n{bouncer.log_tail()}"
                    ) from None
                time.sleep(0.1)
    finally:
        engine.dispose()
