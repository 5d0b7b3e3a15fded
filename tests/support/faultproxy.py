"""A loopback HTTP proxy that injects faults between an SDK and an emulator.

Why: throttling and connections dropped mid-upload are what object stores do in real life,
and the only honest test of the backends' error mapping and the retry wrapper is the real
SDK seeing a real 503 or a real reset socket. Each rule matches requests (method, body
size) and either answers with a throttling response or reads part of the body and resets
the connection. Everything else is forwarded unchanged. Every exchange uses its own
connection (Connection: close), which keeps the proxy simple and is harmless for tests.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    length: int  # body length (-1: chunked)


@dataclass
class Rule:
    """Apply ``action`` ("throttle" or "drop") to matching requests, ``times`` times
    (None: forever), or only to every ``every``-th match."""

    action: str
    match: Callable[[Request], bool] = lambda r: True
    times: int | None = 1
    every: int = 1
    seen: int = 0
    fired: int = 0


@dataclass
class Throttle:
    status: int = 503
    body: bytes = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    content_type: str = "application/xml"


@dataclass
class FaultProxy:
    upstream_port: int = 0
    throttle: Throttle = field(default_factory=Throttle)
    rules: list[Rule] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="faultproxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _choose(self, request: Request) -> str | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if (rule.times is not None and rule.fired >= rule.times) or not rule.match(request):
                    continue
                rule.seen += 1
                if rule.seen % rule.every:
                    continue
                rule.fired += 1
                return rule.action
        return None

    def _serve(self, client: socket.socket) -> None:
        try:
            reader = client.makefile("rb")
            head = _read_head(reader)
            if head is None:
                return
            request_line, headers = head
            method, path, _ = request_line.split(" ", 2)
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            length = -1 if chunked else int(headers.get("content-length", "0"))
            action = self._choose(Request(method, path, headers, length))
            if headers.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if action == "drop":
                reader.read(max(length // 2, 1) if length > 0 else 1)
                # RST instead of FIN: the client sees a reset connection mid-upload.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            body = _read_chunked(reader) if chunked else reader.read(length)
            if action == "throttle":
                t = self.throttle
                client.sendall(
                    f"HTTP/1.1 {t.status} Throttled\r\nContent-Type: {t.content_type}\r\n"
                    f"Content-Length: {len(t.body)}\r\nConnection: close\r\n\r\n".encode() + t.body
                )
                return
            self._forward(client, request_line, headers, body, chunked)
        except OSError:
            pass
        finally:
            client.close()

    def _forward(self, client: socket.socket, request_line: str, headers: dict[str, str], body: bytes, chunked: bool) -> None:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120) as upstream:
            out = [request_line]
            for name, value in headers.items():
                if name in ("connection", "expect", "keep-alive", "transfer-encoding", "content-length"):
                    continue
                out.append(f"{name}: {value}")
            out += [f"content-length: {len(body)}", "connection: close", "", ""]
            upstream.sendall("\r\n".join(out).encode("latin-1") + body)
            while data := upstream.recv(1 << 20):
                client.sendall(data)


def _read_head(reader) -> tuple[str, dict[str, str]] | None:  # type: ignore[no-untyped-def]
    line = reader.readline()
    if not line:
        return None
    request_line = line.decode("latin-1").rstrip("\r\n")
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return request_line, headers


def _read_chunked(reader) -> bytes:  # type: ignore[no-untyped-def]
    """De-chunk a request body (forwarded with a content-length instead)."""
    parts = []
    while True:
        size = int(reader.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while reader.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(reader.read(size))
        reader.readline()
