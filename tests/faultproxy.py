"""A TCP proxy the tests can cut: the network between the app and its database, on demand.

``FaultProxy(upstream_port)`` listens on a free loopback port and pipes every connection to
the upstream. ``cut("reset")`` closes every open connection with a TCP reset and refuses new
ones, as a crashed database host or a failover does; ``cut("blackhole")`` keeps connections
open but forwards nothing and accepts new ones without answering, as a partitioned network
does. ``restore()`` forwards again: connections reset before stay dead, blackholed ones resume.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from typing import Literal

Mode = Literal["open", "reset", "blackhole"]
Request = Literal["open", "reset", "blackhole", "drop"]


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.mode: Mode = "open"
        self.accepted = 0
        self._lock = threading.Lock()
        self._pending: list[tuple[Request, threading.Event]] = []
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []  # accepted while blackholed, never answered
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- control (every socket operation itself happens on the proxy's thread) ------------

    def cut(self, mode: Literal["reset", "blackhole"] = "reset") -> None:
        self._request(mode)

    def restore(self) -> None:
        self._request("open")

    def drop_connections(self) -> None:
        """Reset every open connection but keep accepting new ones (a database restart)."""
        self._request("drop")

    def close(self) -> None:
        self._request("reset")
        self._closed = True
        self._thread.join(timeout=5)
        self._listener.close()

    def _request(self, mode: Request) -> None:
        done = threading.Event()
        with self._lock:
            self._pending.append((mode, done))
        if not done.wait(timeout=5):
            raise RuntimeError("the fault proxy did not answer")

    # -- the pump ------------------------------------------------------------------------

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ, None)
        while not self._closed:
            with self._lock:
                pending, self._pending = self._pending, []
            for mode, done in pending:
                self._switch(selector, mode)
                done.set()
            for key, _ in selector.select(timeout=0.02):
                if key.data is None:
                    self._accept(selector)
                elif self.mode == "open":
                    self._pump(selector, key.fileobj, key.data)  # type: ignore[arg-type]
        for sock in list(self._pairs_sockets()) + self._held:
            _reset(sock)
        selector.close()

    def _pairs_sockets(self) -> list[socket.socket]:
        return [sock for pair in self._pairs for sock in pair]

    def _switch(self, selector: selectors.BaseSelector, request: Request) -> None:
        self.mode = "open" if request == "drop" else request
        if request == "blackhole":
            return
        # Reset and drop: every open connection dies. Open: those held unanswered die too.
        doomed = self._held + (self._pairs_sockets() if request != "open" else [])
        for sock in doomed:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            _reset(sock)
        self._held = []
        if request != "open":
            self._pairs = []

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        self.accepted += 1
        if self.mode == "reset":
            _reset(client)
            return
        if self.mode == "blackhole":
            self._held.append(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            _reset(client)
            return
        client.setblocking(False)
        upstream.setblocking(False)
        self._pairs.append((client, upstream))
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)

    def _pump(
        self, selector: selectors.BaseSelector, source: socket.socket, sink: socket.socket
    ) -> None:
        try:
            data = source.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            if data:
                sink.setblocking(True)
                sink.sendall(data)
                sink.setblocking(False)
                return
        except OSError:
            pass
        # One side ended: end the other, and forget the pair.
        for sock in (source, sink):
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
            sock.close()
        self._pairs = [pair for pair in self._pairs if source not in pair]


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead host's kernel or a firewall answers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
