"""Adapters for Tcllib pop3d-style callables: ``auth(cmd, name)`` and ``storage(cmd, mbox, ...)``.

``Server(auth=fn, storage=fn)`` wraps such callables in these, so code
written for pop3d's ``-auth`` and ``-storage`` options keeps its shape.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from ._maildrop import MessageInfo, valid_uid
from ._writers import WireSizer
from .auth import PlainVerifier, Verifier

__all__ = ["Pop3dAuth", "Pop3dStorage"]



class Pop3dAuth:
    """Adapts a pop3d-style ``auth(cmd, name)`` callable (lookup -> (password, mailbox))."""

    #: pop3d's lookup hands back the password itself: APOP and CRAM-MD5 can work.
    has_cleartext = True

    def __init__(self, cmd: Callable[..., Any]) -> None:
        self._cmd = cmd

    def exists(self, name: str) -> bool:
        return bool(self._cmd("exists", name))

    def lookup(self, name: str) -> tuple[Verifier, str] | None:
        found = self._cmd("lookup", name)
        if not found:
            return None
        password, mailbox = found
        return PlainVerifier(str(password)), str(mailbox)


class Pop3dStorage:
    """Adapts a pop3d-style ``storage(cmd, mbox, *args)`` callable to the Storage contract.

    pop3d numbers messages 1..n from ``stat``; ``get`` may return bytes, str
    or a binary stream.  UIDLs come from a ``uidl`` command when the callable
    supports it, else from an MD5 of the message (read once per login).
    """

    def __init__(self, cmd: Callable[..., Any]) -> None:
        self._cmd = cmd

    def lock(self, mailbox: str) -> bool:
        return bool(self._cmd("lock", mailbox))

    def unlock(self, mailbox: str) -> None:
        self._cmd("unlock", mailbox)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        # pop3d's "size" is whatever the callable says (often the LF file size);
        # the listed size must be what RETR sends, so each message is read once
        # here and measured with the core's rule (and hashed when the callable
        # has no "uidl" answer).
        count = int(self._cmd("stat", mailbox))
        out = []
        for n in range(1, count + 1):
            sizer, digest = WireSizer(), hashlib.md5()
            with self.get(mailbox, str(n)) as f:
                for chunk in iter(lambda: f.read(65536), b""):
                    sizer.feed(chunk)
                    digest.update(chunk)
            try:
                uid = self._cmd("uidl", mailbox, n)
            except Exception:
                uid = None
            uid = str(uid) if uid is not None and valid_uid(str(uid)) else digest.hexdigest()
            out.append(MessageInfo(key=str(n), size=sizer.total(), uid=uid))
        return out

    def get(self, mailbox: str, key: str) -> BinaryIO:
        data = self._cmd("get", mailbox, int(key))
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        if isinstance(data, (bytes, bytearray)):
            return io.BytesIO(bytes(data))
        return data  # type: ignore[no-any-return]

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        self._cmd("dele", mailbox, [int(k) for k in keys])
