"""pop3proto: a sans-I/O POP3 server core, a pop3d-style facade, storage and transports.

Map of the package:

* ``Connection`` (``_connection.py``) is the protocol: bytes in, events out,
  responses in, bytes out.  No sockets, files, clocks or threads.
* ``_state.py`` holds the state rules as tables; ``_events.py`` the events
  and responses; ``_readers.py``/``_writers.py`` the parsers and the
  streaming dot-stuffer; ``_maildrop.py`` the login snapshot and marks;
  ``_texts.py`` the reply texts by message id (one ``Catalog`` per language,
  translations are data files in ``lang/``, RFC 6856 LANG).
* ``auth.py`` (pure credential helpers), ``storage.py`` (the callback
  contracts), ``server.py`` (the ``Server`` facade and the session logic),
  ``maildir.py``/``memstore.py`` (storage), ``passwd.py`` (Dovecot
  passwd-file) and ``transports/`` (anyio, selectors, blocking sockets).
"""

from __future__ import annotations

from . import _connection, _writers
from ._config import Config
from ._connection import NEED_DATA, PAUSED, Connection
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
from ._texts import Catalog
from ._writers import wire_size

__version__ = "0.1.0"

#: Names that left ``__all__`` (internals an embedder does not need) but
#: still import from here, for code written against older versions.
_MOVED = {
    "Sentinel": _connection,
    "Stats": _connection,
    "DotStuffer": _writers,
    "WireSizer": _writers,
}


def __getattr__(name: str) -> object:
    """Resolve a name of ``_MOVED`` from its module (PEP 562)."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ApopLogin",
    "AuthAborted",
    "AuthResponse",
    "AuthStart",
    "Catalog",
    "Config",
    "Connection",
    "ConnectionClosed",
    "Data",
    "Disconnect",
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
    "StartTLS",
    "TopOfMessage",
    "Update",
    "__version__",
    "wire_size",
]
