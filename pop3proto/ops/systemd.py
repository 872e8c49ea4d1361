"""systemd without a dependency: socket activation (sd_listen_fds) and sd_notify.

``listen_sockets()`` takes the listening sockets systemd passed as
descriptors 3.. (``LISTEN_FDS``, ``LISTEN_PID``, ``LISTEN_FDNAMES``);
``notify("READY=1")`` sends a state line to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

__all__ = ["SD_LISTEN_FDS_START", "ActivatedSockets", "listen_sockets", "notify"]

SD_LISTEN_FDS_START = 3


class ActivatedSockets:
    """The sockets systemd passed: the plain POP3 one and the implicit-TLS one (or None)."""

    def __init__(self, plain: socket.socket | None, tls: socket.socket | None) -> None:
        self.plain = plain
        self.tls = tls

    def sockets(self) -> list[socket.socket]:
        """The plain socket then the TLS one, those that exist."""
        return [s for s in (self.plain, self.tls) if s is not None]


def listen_sockets(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> ActivatedSockets | None:
    """The sockets passed by systemd, or None when this process was not socket-activated.

    A socket named ``pop3s`` in ``LISTEN_FDNAMES`` is the implicit-TLS one;
    without names, the first is plain and the second TLS.  With *unset* the
    ``LISTEN_*`` variables are removed so children do not take them again.

    Raises:
        ValueError: the variables are malformed, name more than one socket of a
            kind, or pass more than two sockets.
    """
    env = os.environ if environ is None else environ
    if "LISTEN_FDS" not in env:
        return None
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env["LISTEN_FDS"])
    except ValueError:
        raise ValueError("LISTEN_PID and LISTEN_FDS must be integers") from None
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return None
    if count > 2:
        raise ValueError(f"systemd passed {count} sockets; pop3proto takes one plain and one TLS")
    labels = names.split(":") if names else []
    socks = [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]
    plain: socket.socket | None = None
    tls: socket.socket | None = None
    for i, sock in enumerate(socks):
        os.set_inheritable(sock.fileno(), False)
        is_tls = labels[i] == "pop3s" if i < len(labels) and "pop3s" in labels else i == 1
        if is_tls:
            tls = sock
        elif plain is None:
            plain = sock
        else:
            raise ValueError("systemd passed two plain sockets (name the TLS one 'pop3s')")
    return ActivatedSockets(plain, tls)


def notify(state: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send *state* (``READY=1``, ``STOPPING=1``, ...) to ``$NOTIFY_SOCKET``; False without one.

    An address starting with ``@`` is in the abstract namespace.  Errors are
    swallowed: readiness is advisory.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5.0)
            sock.sendto(state.encode("utf-8"), target)
    except OSError:
        return False
    return True
