"""Log output for admins: Dovecot-shaped event lines, JSON lines, syslog and the journal.

Sessions log each event an admin acts on through the ``pop3proto`` logger
with ``extra={"pop3": fields}``; ``event_message(fields)`` is the text of
that line (``Login: user=<alice>, method=PLAIN, rip=..., session=<...>``),
so the words live in one place.  The formatters and handlers here turn such
records into stderr text, JSON lines, syslog datagrams or native journal
entries; ``metrics.MetricsHandler`` counts the same records.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

__all__ = [
    "EVENTS",
    "FORMATS",
    "JOURNAL_SOCKET",
    "TARGETS",
    "JournalHandler",
    "JsonFormatter",
    "encode_journal",
    "escape_user",
    "event_message",
    "journal_fields",
    "make_handler",
]

#: The ``event`` values sessions log, and what each one means.
EVENTS = {
    "login": "a successful login",
    "login_failed": "a failed login (unknown user, password mismatch, ...)",
    "disconnect": "a connection that ended before a login",
    "logout": "a session that ended after a login",
    "refused": "a connection refused (over a connection limit or shutting down)",
    "tls_failed": "a TLS handshake that failed",
    "storage_error": "a storage operation that failed",
}

FORMATS = ("text", "json")
TARGETS = ("stderr", "syslog", "journal")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

#: Longest value written to one journal field (longer ones are cut).
MAX_JOURNAL_FIELD = 16 * 1024

_LABELS = {
    "login": "Login",
    "login_failed": "Login failed",
    "disconnect": "Disconnected",
    "refused": "Connection refused",
    "tls_failed": "TLS handshake failed",
    "storage_error": "Storage error",
}


def escape_user(name: object) -> str:
    """*name* between ``<`` ``>``; control characters, ``<``, ``>`` and ``\\`` as ``\\xNN``."""
    if name is None:
        return "<>"
    out = []
    for c in str(name):
        if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "<>\\":
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return "<" + "".join(out) + ">"


def _pair(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]}/{value[1]}"
    return str(value)


def event_message(fields: Mapping[str, Any]) -> str:
    """The text line for one session event (see ``EVENTS``), Dovecot's shape.

    ``Login: user=<alice>, method=PLAIN, rip=127.0.0.1, rport=40000, secured, session=<4242-17>``;
    a ``reason`` goes in parentheses after the label; ``logout`` reads
    ``Logged out`` with no reason and ``Disconnected (reason)`` with one, then
    the counters ``top``, ``retr``, ``del``, ``size``, ``in``, ``out``.
    """
    event = str(fields.get("event", ""))
    reason = fields.get("reason")
    if event == "logout":
        label = f"Disconnected ({reason})" if reason and reason != "Logged out" else "Logged out"
    else:
        label = _LABELS.get(event, event or "Event")
        if reason:
            label += f" ({reason})"
    parts = []
    if event not in ("refused", "tls_failed") or fields.get("user") is not None:
        parts.append(f"user={escape_user(fields.get('user'))}")
    if fields.get("method") and event in ("login", "login_failed"):
        parts.append(f"method={fields['method']}")
    if event == "logout":
        parts += [f"{key}={_pair(fields[key])}" for key in ("top", "retr", "del", "size", "in",
                                                            "out") if key in fields]
    if fields.get("rip") is not None:
        parts.append(f"rip={fields['rip']}")
    if fields.get("rport") is not None:
        parts.append(f"rport={fields['rport']}")
    if fields.get("tls"):
        parts.append("secured")
    if fields.get("session") is not None:
        parts.append(f"session=<{fields['session']}>")
    return f"{label}: {', '.join(parts)}"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "pop3", None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC), level, logger, message, pid, pop3 fields.

    The ``pop3`` fields go at the top level (they never replace the first five).
    *prefix* is written before the object, with ``%(process)d`` filled in (for syslog).
    """

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        obj: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in _fields(record).items():
            if key not in ("time", "level", "logger", "message"):
                obj[str(key)] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        line = json.dumps(obj, default=str, separators=(", ", ": "))
        return (self.prefix % {"process": record.process}) + line


# ------------------------------------------------------------------ the journal

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


def _journal_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value)
    return str(value)


def journal_fields(record: logging.LogRecord, message: str) -> list[tuple[str, str]]:
    """The journal fields of *record*: MESSAGE, PRIORITY, SYSLOG_*, then POP3_* per pop3 field."""
    priority = 7
    for level, value in sorted(_PRIORITY.items()):
        if record.levelno >= level:
            priority = value
    out = [
        ("MESSAGE", message),
        ("PRIORITY", str(priority)),
        ("SYSLOG_IDENTIFIER", "pop3proto"),
        ("SYSLOG_FACILITY", "2"),  # mail
        ("SYSLOG_PID", str(record.process)),
        ("LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
    ]
    for key, value in _fields(record).items():
        if value is None:
            continue
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(key).upper())
        out.append((f"POP3_{name}", _journal_value(value)))
    return out


def encode_journal(fields: Iterable[tuple[str, str]]) -> bytes:
    """The native journal protocol datagram for *fields*.

    ``NAME=value\\n`` for a one-line value; ``NAME\\n``, a 64-bit little-endian
    length, the value and ``\\n`` for one with a newline.  Values longer than
    ``MAX_JOURNAL_FIELD`` octets are cut.
    """
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")[:MAX_JOURNAL_FIELD]
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to the systemd journal's native socket (no dependency)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(5.0)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode_journal(journal_fields(record, self.format(record)))
            self.sock.sendto(datagram, self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


# ------------------------------------------------------------------ choosing a handler


def make_handler(
    fmt: str = "text",
    target: str = "stderr",
    *,
    stream: TextIO | None = None,
    syslog_address: str = SYSLOG_SOCKET,
    journal_socket: str = JOURNAL_SOCKET,
) -> tuple[logging.Handler, str | None]:
    """A handler for *target* in format *fmt*, and a warning if it fell back to stderr.

    syslog goes to *syslog_address* with facility mail; the journal gets
    native entries.  When the socket is missing, the handler writes to stderr
    and the warning says why.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if target not in TARGETS:
        raise ValueError(f"log target must be one of {', '.join(TARGETS)}, got {target!r}")
    warning = None
    handler: logging.Handler
    formatter: logging.Formatter
    if target == "syslog" and os.path.exists(syslog_address):
        handler = logging.handlers.SysLogHandler(
            syslog_address, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        formatter = (JsonFormatter("pop3proto[%(process)d]: ") if fmt == "json"
                     else logging.Formatter("pop3proto[%(process)d]: %(message)s"))
    elif target == "journal" and os.path.exists(journal_socket):
        handler = JournalHandler(journal_socket)
        formatter = JsonFormatter() if fmt == "json" else logging.Formatter("%(message)s")
    else:
        if target != "stderr":
            where = syslog_address if target == "syslog" else journal_socket
            warning = f"log target {target}: {where} does not exist; logging to stderr"
        handler = logging.StreamHandler(stream or sys.stderr)
        formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    return handler, warning
