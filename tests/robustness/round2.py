"""Helpers shared by the security round-two tests (issue 15): servers, PROXY headers, logs.

* ``KINDS``: the four ways to serve (blocking, selectors, anyio on asyncio
  and on trio); ``serving(kind, **options)`` brings a ``Server`` up on
  127.0.0.1 port 0 with that transport and always destroys it.
* ``proxy_v1``/``proxy_v2``: PROXY headers that make a connection from
  127.0.0.1 look like one from any address (IPv6 sources for the grouping
  tests).
* ``Events``: a logging handler that keeps every session event's fields.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

from clients import HOST, running

from pop3proto.proxy import V2_SIGNATURE
from pop3proto.server import Server

#: transport (module) and anyio backend for each way to serve.
KINDS = ("blocking", "selectors", "anyio-asyncio", "anyio-trio")
_ENV_LOCK = threading.Lock()


def split_kind(kind: str) -> tuple[str, str | None]:
    """``"anyio-trio"`` -> ``("anyio", "trio")``; ``"selectors"`` -> ``("selectors", None)``."""
    transport, _, backend = kind.partition("-")
    return transport, backend or None


@contextlib.contextmanager
def serving(kind: str, **options: Any) -> Iterator[Server]:
    """A Server up on 127.0.0.1:0 with transport *kind* (see ``KINDS``); always destroyed."""
    transport, backend = split_kind(kind)
    if backend is None:
        with running(transport, **options) as server:
            yield server
        return
    stack = contextlib.ExitStack()
    with _ENV_LOCK:  # the anyio transport reads its backend from the environment at up()
        saved = os.environ.get("POP3PROTO_ANYIO_BACKEND")
        os.environ["POP3PROTO_ANYIO_BACKEND"] = backend
        try:
            server = stack.enter_context(running(transport, **options))
        finally:
            if saved is None:
                os.environ.pop("POP3PROTO_ANYIO_BACKEND", None)
            else:
                os.environ["POP3PROTO_ANYIO_BACKEND"] = saved
    with stack:
        yield server


def kind_env(kind: str) -> dict[str, str]:
    """Environment for a server subprocess of *kind* (the anyio backend)."""
    _, backend = split_kind(kind)
    return {"POP3PROTO_ANYIO_BACKEND": backend} if backend else {}


def proxy_v1(source: str, sport: int = 40000, dest: str = "::1", dport: int = 110) -> bytes:
    """A PROXY v1 header (TCP6 when *source* has a colon); *source* is sent as given."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode("latin-1")


def proxy_v2(source: str, sport: int = 40000, dest: str = "::1", dport: int = 110) -> bytes:
    """A PROXY v2 PROXY-command header for a TCP connection from *source*."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    if src.version == 6:
        body = src.packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
        fam = 0x21
    else:
        body = src.packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
        fam = 0x11
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def connect_as(port: int, source: str, timeout: float = 10.0) -> socket.socket:
    """A socket to *port* whose PROXY v2 header says it comes from *source* (no greeting read)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.sendall(proxy_v2(source))
    return sock


def read_line(sock: socket.socket, timeout: float) -> bytes | None:
    """The next line (CRLF stripped); b"" if the server closed first, None on time-out."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while not buf.endswith(b"\r\n"):
            chunk = sock.recv(1)
            if not chunk:
                return b""
            buf += chunk
            if len(buf) > 4096:
                raise AssertionError(f"line too long: {buf[:100]!r}")
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""
    return buf[:-2]


class Events(logging.Handler):
    """Keeps the fields of every session event logged to the ``pop3proto`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []
        self.messages: list[str] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.messages.append(record.getMessage())
            fields = getattr(record, "pop3", None)
            if isinstance(fields, dict):
                self.events.append(dict(fields))

    def of(self, event: str) -> list[dict[str, Any]]:
        """The fields of the events named *event*, in order."""
        with self.lock_:
            return [e for e in self.events if e.get("event") == event]


@contextlib.contextmanager
def captured(name: str = "pop3proto") -> Iterator[Events]:
    """Collect the session events of logger *name* (at INFO) for the block."""
    logger = logging.getLogger(name)
    handler = Events()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
