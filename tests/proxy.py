"""A TCP proxy on 127.0.0.1 between an application and its database: it
counts round trips, can add a network delay, close every connection (a
restart, a proxy's idle timeout) or cut one when the client sends a given
statement. Used by the tests and by ``benchmarks/roundtrips.py``."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class _Link:
    """One client connection and its server connection."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.lock = threading.Lock()
        self.last_from_client = False

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Proxy:
    """Forward connections to ``target``. ``round_trips`` counts the times a
    client spoke after the server did (or first): one request/response
    exchange each, whatever the number of TCP segments."""

    def __init__(self, target: tuple[str, int], *, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.round_trips = 0
        self.accepted = 0
        self.cut_on: bytes | None = None
        #: The start of every chunk a client sent, for a look at the wire.
        self.sent: list[bytes] = []
        self.cuts = 0
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()

    def __enter__(self) -> Proxy:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self.close_all()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        from sqlalchemy import make_url

        parsed = make_url(url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def close_all(self) -> None:
        """Close every connection, as a restarted server or a proxy's idle
        timeout does: the client's socket reads end-of-file."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            server = socket.create_connection(self.target, timeout=5)
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self.accepted += 1
                self._links.append(link)
            for from_client in (True, False):
                thread = threading.Thread(
                    target=self._forward, args=(link, from_client), daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _forward(self, link: _Link, from_client: bool) -> None:
        source, sink = (
            (link.client, link.server) if from_client else (link.server, link.client)
        )
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                link.close()
                return
            if from_client:
                self.sent.append(data[:80])
                with link.lock:
                    if not link.last_from_client:
                        with self._lock:
                            self.round_trips += 1
                    link.last_from_client = True
                if self.cut_on is not None and self.cut_on in data:
                    with self._lock:
                        self.cuts += 1
                    link.close()  # the server never sees it
                    return
            else:
                with link.lock:
                    link.last_from_client = False
            if self.delay:
                time.sleep(self.delay)
            try:
                sink.sendall(data)
            except OSError:
                link.close()
                return
