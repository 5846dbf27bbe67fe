"""A loopback HTTP proxy in front of a real S3 server that injects network faults on chosen requests.

Real faults on a real socket, for what a healthy SeaweedFS never does on its own: answer 503
SlowDown or 500 InternalError, hold a request (a stalled upload), or drop the connection half-way.

    with FaultProxy(server.endpoint_url) as proxy:
        proxy.add(Rule(method="PUT", path=r"/artifacts/", action="503", times=3))
        store = CacheStore(url, **server.storage_options(client_kwargs={"endpoint_url": proxy.url}))

Requests are forwarded byte for byte (the Host header too, so SigV4 signatures stay valid); each
request's method, path, status and injected action is recorded in `proxy.log`. Importable by
bench/stress.py.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Rule", "Seen"]

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


@dataclass
class Rule:
    """Inject `action` into the next `times` requests whose method and path match (None: every one).

    action: "503" (SlowDown), "500" (InternalError), "reset" (close the socket without an answer),
    "hold" (keep the request until `release()` or `hold_s` seconds, then forward it).
    probability: inject into only this share of the matching requests (seeded: the same run, the same faults).
    """

    action: str
    method: str | None = None
    path: str = ""
    times: int | None = 1
    hold_s: float = 60.0
    probability: float = 1.0
    seed: int = 0
    matched: int = 0
    arrived: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.action not in ("503", "500", "reset", "hold"):
            raise ValueError(f"unknown action {self.action!r}")
        self._rng = random.Random(self.seed)

    def wants(self, method: str, path: str) -> bool:
        if self.times is not None and self.matched >= self.times:
            return False
        if self.method is not None and method != self.method:
            return False
        if re.search(self.path, path) is None:
            return False
        return self.probability >= 1.0 or self._rng.random() < self.probability

    def release(self) -> None:
        self._released.set()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int | None
    action: str | None
    at: float


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    """Forwards HTTP/1.1 from 127.0.0.1:<port> to `upstream_url`, applying `Rule`s in order."""

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for rule in self.rules:
            rule.release()
        self._server.shutdown()
        self._server.server_close()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            for rule in self.rules:
                rule.release()
            self.rules.clear()

    def seen(self, method: str | None = None, path: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.log if (method is None or s.method == method) and re.search(path, s.path)]

    # one client connection: many requests (keep-alive)

    def _pick(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.wants(method, path):
                    rule.matched += 1
                    return rule
        return None

    def _record(self, method: str, path: str, status: int | None, action: str | None) -> None:
        with self._lock:
            self.log.append(Seen(method, path, status, action, time.monotonic()))

    def _answer_error(self, client: socket.socket, method: str, path: str, action: str) -> None:
        if action == "reset":
            self._record(method, path, None, action)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        payload = _SLOWDOWN if action == "503" else _INTERNAL
        reason = "Slow Down" if action == "503" else "Internal Server Error"
        client.sendall(
            f"HTTP/1.1 {action} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + (b"" if method == "HEAD" else payload)
        )
        self._record(method, path, int(action), action)

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        upstream: socket.socket | None = None
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                method, target = request_line.split(" ")[:2]
                path = urlsplit(target).path
                headers = _headers(head)
                rule = self._pick(method, path)
                action = rule.action if rule else None
                if rule is not None:
                    rule.arrived.set()
                expects_continue = headers.get("expect", "").lower() == "100-continue"
                if expects_continue:
                    # botocore waits for "100 Continue" before sending a PUT body. An injected error
                    # answers at once and closes (the body is never read); otherwise we ask for it.
                    if action in ("503", "500", "reset"):
                        self._answer_error(client, method, path, action)
                        return
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _without_header(head, b"expect")
                body = _read_body(reader, headers)
                if action == "reset":
                    self._answer_error(client, method, path, action)
                    return
                if action in ("503", "500"):
                    self._answer_error(client, method, path, action)
                    continue
                if action == "hold" and rule is not None:
                    rule._released.wait(rule.hold_s)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=120)
                upstream.sendall(head + body)
                response = http.client.HTTPResponse(upstream, method=method)
                response.begin()
                data = response.read()
                out = [f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1")]
                for name, value in response.getheaders():
                    if name.lower() in ("transfer-encoding", "content-length", "connection"):
                        continue
                    out.append(f"{name}: {value}\r\n".encode("latin-1"))
                if method != "HEAD" or "content-length" not in {k.lower() for k, _ in response.getheaders()}:
                    out.append(f"Content-Length: {len(data)}\r\n".encode())
                else:
                    out.append(f"Content-Length: {response.getheader('Content-Length')}\r\n".encode())
                out.append(b"\r\n")
                client.sendall(b"".join(out) + (b"" if method == "HEAD" else data))
                self._record(method, path, response.status, action)
                if response.will_close:
                    upstream.close()
                    upstream = None
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            if upstream is not None:
                upstream.close()
            reader.close()


def _read_head(reader: object) -> bytes | None:
    lines = []
    while True:
        line = reader.readline(65537)  # type: ignore[attr-defined]
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            if len(lines) == 1:
                lines.clear()  # stray CRLF between requests
                continue
            return b"".join(lines)


def _without_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _read_body(reader: object, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = []  # forwarded as sent (chunk framing and trailers included)
        while True:
            size_line = reader.readline(65537)  # type: ignore[attr-defined]
            raw.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:
                    trailer = reader.readline(65537)  # type: ignore[attr-defined]
                    raw.append(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(raw)
            raw.append(reader.read(size + 2))  # type: ignore[attr-defined]
    length = int(headers.get("content-length", "0") or 0)
    return reader.read(length) if length else b""  # type: ignore[attr-defined]
