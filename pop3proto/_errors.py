"""Exceptions, named by who is to blame (the h11 split).

An ordinary client mistake is *not* an exception: the core answers it with
``-ERR`` and the session goes on.  Exceptions are for the two cases where the
session cannot go on:

* ``LocalProtocolError``: the application misused the API (answered an event
  that was not pending, sent ``Data`` outside a multi-line block, ...).  The
  connection moves to ``Phase.ERROR``; it is a bug in the caller.
* ``RemoteProtocolError``: the client broke framing beyond repair (a line over
  the limit, NUL in a command, too many bad commands, too much unread input).
  The core has already queued the final ``-ERR`` (``response_hint``), so the
  transport flushes ``data_to_send()`` and closes.  ``next_event`` keeps
  raising it.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of the core's exceptions; ``response_hint`` is the -ERR text sent, if any."""

    def __init__(self, msg: str, response_hint: str | None = None) -> None:
        super().__init__(msg)
        self.response_hint = response_hint


class LocalProtocolError(ProtocolError):
    """The application broke the API contract (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The client broke the protocol beyond repair; the final -ERR is already queued."""
