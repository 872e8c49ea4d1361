"""pop3proto: a sans-I/O POP3 server core, a pop3d-style facade, storage and transports.

Map of the package:

* ``Connection`` (``_connection.py``) is the protocol: bytes in, events out,
  responses in, bytes out.  No sockets, files, clocks or threads.
* ``_state.py`` holds the state rules as tables; ``_events.py`` the events
  and responses; ``_readers.py``/``_writers.py`` the parsers and the
  streaming dot-stuffer; ``_maildrop.py`` the login snapshot and marks.
* ``auth.py`` (pure credential helpers), ``storage.py`` (the callback
  contracts), ``server.py`` (the ``Server`` facade and the session logic),
  ``maildir.py``/``memstore.py`` (storage), ``passwd.py`` (Dovecot
  passwd-file) and ``transports/`` (anyio, selectors, blocking sockets).
"""

from __future__ import annotations

from ._config import Config
from ._connection import NEED_DATA, PAUSED, Connection, Sentinel, Stats
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    ApopLogin,
    AuthAborted,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Data,
    Disconnect,
    EndOfMessage,
    Err,
    Event,
    Greeting,
    Login,
    LoginAccepted,
    Ok,
    Response,
    RetrieveMessage,
    SaslChallenge,
    StartTLS,
    TopOfMessage,
    Update,
)
from ._maildrop import Maildrop, MessageInfo
from ._state import Phase
from ._writers import DotStuffer, WireSizer, wire_size

__version__ = "0.1.0"

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ApopLogin",
    "AuthAborted",
    "AuthResponse",
    "AuthStart",
    "Config",
    "Connection",
    "ConnectionClosed",
    "Data",
    "Disconnect",
    "DotStuffer",
    "EndOfMessage",
    "Err",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "Login",
    "LoginAccepted",
    "Maildrop",
    "MessageInfo",
    "Ok",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "Response",
    "RetrieveMessage",
    "SaslChallenge",
    "Sentinel",
    "StartTLS",
    "Stats",
    "TopOfMessage",
    "Update",
    "WireSizer",
    "__version__",
    "wire_size",
]
