"""A pytest plugin for testing code that fetches mail: a real POP3 server per test.

What GreenMail is to Java and aiosmtpd's ``Controller`` is to SMTP: the
fixtures start a :class:`pop3proto.server.Server` on a free port of
``127.0.0.1`` with users and maildrops held in memory, and stop it when the
test ends.  The test delivers messages, points the code under test (stdlib
``poplib``, curl, any client) at ``host``/``port``, and then asserts on what
the server saw: which messages were retrieved, which were deleted, what is
left.  It can also switch on TLS (STLS or implicit TLS with a throwaway CA
made by ``trustme``) and arm faults: a refused login, a maildrop in use, a
connection dropped in the middle of a RETR.

Fixtures (registered through the ``pytest11`` entry point ``pop3proto``, or
with ``pytest -p pop3proto.testing`` where the package is not installed):

* ``pop3_server``: a plain-text :class:`Pop3TestServer`, started, with no users;
* ``pop3_server_factory``: a callable that starts more servers, with TLS,
  another transport or other ``Server`` options; all are stopped at teardown.

:class:`Pop3TestServer` also works without pytest, as a context manager.

How it is built: the server's storage is a ``MemoryStorage`` behind a thin
recorder that notes each message served in full by RETR (the stream was read
to its end) and each key deleted at UPDATE, and that injects the storage
faults (``MailboxLocked`` from ``lock``; a stream whose ``read`` raises after
N bytes).  RETR is told from TOP (both open the message with ``get``) by the
server's ``trace`` hook, which sees each command with its session id.  Login
faults come from the authenticator, which hands out a verifier that refuses.
"""

from __future__ import annotations

import email.message
import email.policy
import io
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest

from ._maildrop import MessageInfo
from .auth import PlainVerifier, ScramSecret, Verifier
from .memstore import MemoryStorage
from .server import Server
from .storage import MailboxLocked

__all__ = [
    "Mailbox",
    "Pop3ServerFactory",
    "Pop3TestServer",
    "TLSMode",
    "pop3_server",
    "pop3_server_factory",
]

#: ``None`` (plain text only), ``"stls"`` (STLS on the POP3 port) or
#: ``"implicit"`` (a second, POP3S port; the POP3 port offers STLS too).
TLSMode = Literal["stls", "implicit"] | None

#: Options the plugin sets itself; passing them is a TypeError.
_OWN_OPTIONS = frozenset(
    {"auth", "storage", "ssl_context", "tls_cert", "tls_key", "workers", "host", "transport"}
)

#: Defaults for a test server: plain logins allowed, no failed-login delay.
_TEST_DEFAULTS: dict[str, Any] = {
    "cleartext_auth": True,
    "auth_failure_delay": 0.0,
    "hostname": "localhost",
}

#: How long ``close`` waits for sessions and the transport to end.
_STOP_TIMEOUT = 10.0


class _Fault:
    """A fault armed for the next *times* occasions (None: until cleared)."""

    def __init__(self) -> None:
        self.armed = False
        self.left: int | None = None

    def arm(self, times: int | None) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be a positive number or None")
        self.armed, self.left = True, times

    def clear(self) -> None:
        self.armed, self.left = False, None

    def take(self) -> bool:
        """Whether the fault fires now (and count it)."""
        if not self.armed:
            return False
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                self.clear()
        return True


class _RefusingVerifier:
    """A verifier that refuses every password and offers no secret (``fail_login``)."""

    def verify(self, password: str) -> bool:
        return False

    def cleartext(self) -> str | None:
        return None

    def scram(self) -> ScramSecret | None:
        return None


class _ServedStream(io.BytesIO):
    """A message stream that reports when it has been read to its end.

    With *limit* set, ``read`` raises ``ConnectionResetError`` once *limit*
    bytes have been read: the server has sent ``+OK`` and part of the message,
    so it can only drop the connection (``drop_during_retr``).
    """

    def __init__(
        self, data: bytes, on_complete: Callable[[], None] | None, limit: int | None
    ) -> None:
        super().__init__(data)
        self._size = len(data)
        self._on_complete = on_complete
        self._limit = limit

    def read(self, size: int | None = -1, /) -> bytes:
        pos = self.tell()
        if self._limit is not None:
            if pos >= self._limit:
                raise ConnectionResetError("pop3proto.testing: connection dropped during RETR")
            room = self._limit - pos
            size = room if size is None or size < 0 else min(size, room)
        data = super().read(size)
        if self._on_complete is not None and self.tell() >= self._size:
            done, self._on_complete = self._on_complete, None
            done()
        return data


class Mailbox:
    """One user of a :class:`Pop3TestServer`: the maildrop, what happened to it, its faults.

    Made by :meth:`Pop3TestServer.add_user`; the maildrop is named after the
    user.  Every method may be called while clients are connected.
    """

    def __init__(self, server: Pop3TestServer, name: str, password: str) -> None:
        self._server = server
        #: The user name clients log in with.
        self.name = name
        #: The password clients log in with.
        self.password = password
        self._delivered: dict[str, bytes] = {}
        self._retrieved: list[str] = []
        self._deleted: list[str] = []
        self._refuse = _Fault()
        self._drop = _Fault()
        self._drop_after = 0
        self._held = False

    def __repr__(self) -> str:
        return f"<Mailbox {self.name!r} on {self._server!r}>"

    # -- content

    def deliver(self, message: bytes | email.message.Message, *, uid: str | None = None) -> str:
        """Put *message* into the maildrop, as a delivery agent would; return its key.

        *message* is the raw message (LF or CRLF line ends) or an
        ``email.message.Message``/``EmailMessage`` (serialised with CRLF).
        *uid* is the UIDL the server lists (by default the key).  A message
        delivered during a session shows up at the next login (RFC 1939).

        Raises:
            ValueError: *uid* is not 1-70 printable ASCII characters.
        """
        if isinstance(message, email.message.Message):
            data = message.as_bytes(policy=email.policy.SMTP)
        else:
            data = bytes(message)
        key = self._server._store.add(self.name, data, uid)
        with self._server._mutex:
            self._delivered[key] = data
        return key

    def message(self, key: str) -> bytes:
        """The bytes delivered under *key* (deleted or not).

        Raises:
            KeyError: no message of this mailbox has that key.
        """
        with self._server._mutex:
            return self._delivered[key]

    def messages(self) -> list[bytes]:
        """The messages still in the maildrop, in delivery order."""
        return self._server._store.messages(self.name)

    def retrieved(self) -> list[str]:
        """Keys of the messages served in full by RETR, in order (a repeated RETR repeats).

        TOP is not counted, nor a RETR cut short by ``drop_during_retr``.
        """
        with self._server._mutex:
            return list(self._retrieved)

    def deleted(self) -> list[str]:
        """Keys of the messages deleted at UPDATE (DELE followed by QUIT), in order."""
        with self._server._mutex:
            return list(self._deleted)

    # -- faults

    def fail_login(self, times: int | None = None) -> None:
        """Refuse the next *times* logins of this user (None: every one until cleared).

        The client sees ``-ERR [AUTH]`` as for a wrong password, by USER/PASS,
        AUTH or APOP alike.  The server's failed-login delay is 0 by default.
        """
        with self._server._mutex:
            self._refuse.arm(times)

    def hold_lock(self) -> None:
        """Hold the maildrop lock as another session would, until :meth:`release_lock`.

        A login that gets past the password sees ``-ERR [IN-USE]``.
        """
        with self._server._mutex:
            self._held = True

    def release_lock(self) -> None:
        """Let logins take the maildrop again (undoes :meth:`hold_lock`)."""
        with self._server._mutex:
            self._held = False

    def drop_during_retr(self, *, after_bytes: int = 0, times: int | None = None) -> None:
        """Drop the connection during the next *times* RETRs (None: every one until cleared).

        The server sends ``+OK`` and the first *after_bytes* bytes of the
        stored message, then closes the connection without a terminating
        ``.`` and without applying deletions; the maildrop is unlocked.
        ``poplib`` raises ``poplib.error_proto`` (``-ERR EOF``).

        Raises:
            ValueError: *after_bytes* is negative, or *times* is below 1.
        """
        if after_bytes < 0:
            raise ValueError("after_bytes must not be negative")
        with self._server._mutex:
            self._drop.arm(times)
            self._drop_after = after_bytes

    def clear_faults(self) -> None:
        """Disarm every fault on this user: logins, the held lock, dropped RETRs."""
        with self._server._mutex:
            self._refuse.clear()
            self._drop.clear()
            self._held = False


class _Users:
    """The authenticator: the server's users, with ``fail_login`` applied."""

    def __init__(self, server: Pop3TestServer) -> None:
        self._server = server

    def exists(self, name: str) -> bool:
        with self._server._mutex:
            return name in self._server._boxes

    def lookup(self, name: str) -> tuple[Verifier, str] | None:
        with self._server._mutex:
            box = self._server._boxes.get(name)
            if box is None:
                return None
            if box._refuse.take():
                return _RefusingVerifier(), name
            return PlainVerifier(box.password), name


class _RecordingStorage:
    """The storage: a ``MemoryStorage`` that records RETR and DELE and injects faults."""

    def __init__(self, server: Pop3TestServer, store: MemoryStorage) -> None:
        self._server = server
        self._store = store

    def lock(self, mailbox: str) -> bool:
        box = self._server._box(mailbox)
        if box is not None and box._held:
            raise MailboxLocked(f"pop3proto.testing: {mailbox!r} is held by hold_lock()")
        return self._store.lock(mailbox)

    def unlock(self, mailbox: str) -> None:
        self._store.unlock(mailbox)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        return self._store.scan(mailbox)

    def get(self, mailbox: str, key: str) -> io.BytesIO:
        data = self._store.get(mailbox, key).getvalue()
        box = self._server._box(mailbox)
        with self._server._mutex:
            is_retr = self._server._commands.pop(mailbox, "RETR") == "RETR"
            if box is None or not is_retr:
                return _ServedStream(data, None, None)
            limit = box._drop_after if box._drop.take() else None

        def done() -> None:
            with self._server._mutex:
                box._retrieved.append(key)

        return _ServedStream(data, done, limit)

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        present = {m.key for m in self._store.scan(mailbox)}
        self._store.dele(mailbox, keys)
        box = self._server._box(mailbox)
        if box is not None:
            with self._server._mutex:
                box._deleted.extend(k for k in keys if k in present)


def _trustme() -> Any:
    """The ``trustme`` module, or an ImportError that says what to install."""
    try:
        import trustme
    except ImportError as exc:
        raise ImportError(
            "pop3proto.testing needs the 'trustme' package for TLS test servers; "
            "install the test extra: pip install 'pop3proto[test]'"
        ) from exc
    return trustme


class Pop3TestServer:
    """A real POP3 server on a free port with in-memory users, for one test.

    Args:
        tls: ``None`` for plain text, ``"stls"`` to offer STLS, ``"implicit"``
            to also listen on a POP3S port (``pop3s_port``).  TLS needs
            ``trustme``: a throwaway CA signs a certificate for ``127.0.0.1``
            and ``localhost``; clients trust it through
            :meth:`client_ssl_context` or :attr:`ca_file`.
        transport: the server transport, ``"blocking"``, ``"selectors"`` or
            ``"anyio"`` (the last needs the ``anyio`` extra).
        host: the address to listen on.
        directory: where to write ``ca.pem`` (by default a temporary
            directory, removed by :meth:`close`).
        server_options: further ``pop3proto.server.Server`` options, such as
            ``cleartext_auth=False`` (require TLS before a password),
            ``apop=True`` or ``port=...``.  The defaults differ from the
            server's in two ways: plain-text logins are allowed and failed
            logins are not delayed.

    Raises:
        TypeError: an option the plugin sets itself (``auth``, ``storage``,
            ``ssl_context``, ``tls_cert``, ``tls_key``, ``workers``), or an
            unknown option.
        ValueError: an unknown *tls* mode.

    Use :meth:`start` and :meth:`close`, or ``with Pop3TestServer() as srv:``.
    """

    def __init__(
        self,
        *,
        tls: TLSMode = None,
        transport: str = "blocking",
        host: str = "127.0.0.1",
        directory: str | os.PathLike[str] | None = None,
        **server_options: Any,
    ) -> None:
        if tls not in (None, "stls", "implicit"):
            raise ValueError(f"tls must be None, 'stls' or 'implicit', got {tls!r}")
        own = _OWN_OPTIONS & server_options.keys()
        if own:
            raise TypeError(f"pop3proto.testing sets {sorted(own)} itself")
        self.tls: TLSMode = tls
        self._mutex = threading.RLock()
        self._boxes: dict[str, Mailbox] = {}
        self._commands: dict[str, str] = {}  # mailbox -> last of RETR/TOP
        self._store = MemoryStorage()
        self._directory = Path(directory) if directory is not None else None
        self._own_directory: Path | None = None
        self._ca: Any = None
        self._ca_file: Path | None = None
        self._user_trace: Callable[[str, str, str], None] | None = server_options.pop("trace", None)
        options = {**_TEST_DEFAULTS, **server_options}
        options.setdefault("port", 0)
        if tls is not None:
            options["ssl_context"] = self._make_tls()
            if tls == "implicit":
                options.setdefault("pop3s_port", 0)
        self.server = Server(
            transport=transport,
            host=host,
            auth=_Users(self),
            storage=_RecordingStorage(self, self._store),
            trace=self._trace,
            **options,
        )
        """The underlying :class:`pop3proto.server.Server` (``connections()`` and so on)."""

    def __repr__(self) -> str:
        where = f"{self.host}:{self.server.cget('port')}" if self.running else "stopped"
        return f"<Pop3TestServer {where} tls={self.tls!r}>"

    # -- life cycle

    def start(self) -> Pop3TestServer:
        """Bind the ports and start serving in the background; return self."""
        self.server.up()
        return self

    def close(self) -> None:
        """Stop the server: abort live sessions (no deletions), close the ports.

        Idempotent.  Removes the temporary CA directory it made.

        Raises:
            RuntimeError: sessions were still live after the stop timeout.
        """
        try:
            if self.server.state != "down" or self.server.connections():
                self.server.destroy("kill", timeout=_STOP_TIMEOUT)
            left = self.server.connections()
            if left:
                raise RuntimeError(f"pop3proto.testing: sessions {left} did not stop")
        finally:
            if self._own_directory is not None:
                shutil.rmtree(self._own_directory, ignore_errors=True)
                self._own_directory = None

    def __enter__(self) -> Pop3TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self.server.state == "up"

    # -- where to connect

    @property
    def host(self) -> str:
        """The address the server listens on (``127.0.0.1`` by default)."""
        host: str = self.server.cget("host")
        return host

    @property
    def port(self) -> int:
        """The POP3 port (plain text, STLS when ``tls`` is set).

        Raises:
            RuntimeError: the server is not running.
        """
        self._require_running()
        port: int = self.server.cget("port")
        return port

    @property
    def pop3s_port(self) -> int:
        """The POP3S (implicit TLS) port.

        Raises:
            RuntimeError: the server is not running, or was made without ``tls="implicit"``.
        """
        self._require_running()
        if self.tls != "implicit":
            raise RuntimeError("no POP3S port: make the server with tls='implicit'")
        port: int = self.server.cget("pop3s_port")
        return port

    # -- TLS trust for clients

    @property
    def ca_file(self) -> str:
        """Path of the throwaway CA certificate (PEM), for curl ``--cacert`` and the like.

        Raises:
            RuntimeError: the server was made without ``tls``.
        """
        if self._ca_file is None:
            raise RuntimeError("no CA: make the server with tls='stls' or tls='implicit'")
        return str(self._ca_file)

    def client_ssl_context(self) -> ssl.SSLContext:
        """A new client context that trusts only the throwaway CA (host names checked).

        For ``poplib.POP3_SSL(host, pop3s_port, context=...)`` and
        ``POP3.stls(context=...)``.

        Raises:
            RuntimeError: the server was made without ``tls``.
        """
        if self._ca is None:
            raise RuntimeError("no CA: make the server with tls='stls' or tls='implicit'")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._ca.configure_trust(ctx)
        return ctx

    # -- users

    def add_user(self, name: str, password: str) -> Mailbox:
        """Add a user with an empty maildrop; return its :class:`Mailbox`.

        Raises:
            ValueError: the user exists already.
        """
        with self._mutex:
            if name in self._boxes:
                raise ValueError(f"user {name!r} exists already")
            box = self._boxes[name] = Mailbox(self, name, password)
        return box

    def mailbox(self, name: str) -> Mailbox:
        """The :class:`Mailbox` of user *name*.

        Raises:
            KeyError: no such user.
        """
        with self._mutex:
            return self._boxes[name]

    # -- internals

    def _box(self, name: str) -> Mailbox | None:
        with self._mutex:
            return self._boxes.get(name)

    def _require_running(self) -> None:
        if not self.running:
            raise RuntimeError("the server is not running (start() it, or it was closed)")

    def _make_tls(self) -> ssl.SSLContext:
        trustme = _trustme()
        ca = trustme.CA(organization_name="pop3proto.testing throwaway CA")
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        directory = self._directory
        if directory is None:
            directory = self._own_directory = Path(tempfile.mkdtemp(prefix="pop3proto-ca-"))
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self._ca_file))
        self._ca = ca
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(ctx)
        return ctx

    def _trace(self, session_id: str, direction: str, line: str) -> None:
        """The server's trace hook: note whether the next ``get`` is a RETR or a TOP."""
        if direction == "C":
            keyword = line.split(" ", 1)[0].upper()
            if keyword in ("RETR", "TOP"):
                try:
                    user = self.server.connection_state(session_id).get("user")
                except KeyError:
                    user = None
                if user:
                    with self._mutex:
                        self._commands[str(user)] = keyword
        if self._user_trace is not None:
            self._user_trace(session_id, direction, line)


class Pop3ServerFactory(Protocol):
    """The type of the ``pop3_server_factory`` fixture: starts a :class:`Pop3TestServer`."""

    def __call__(
        self, *, tls: TLSMode = None, transport: str = "blocking", **server_options: Any
    ) -> Pop3TestServer:
        """Start a server with these settings (see :class:`Pop3TestServer`); stopped at teardown."""


@pytest.fixture
def pop3_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3ServerFactory]:
    """Start POP3 test servers with TLS, another transport or other options.

    ``pop3_server_factory(tls="stls")``, ``pop3_server_factory(tls="implicit",
    transport="selectors")``, ``pop3_server_factory(cleartext_auth=False)``;
    every server it started is stopped when the test ends.
    """
    servers: list[Pop3TestServer] = []

    def make(
        *, tls: TLSMode = None, transport: str = "blocking", **server_options: Any
    ) -> Pop3TestServer:
        directory = tmp_path_factory.mktemp("pop3-ca") if tls is not None else None
        srv = Pop3TestServer(tls=tls, transport=transport, directory=directory, **server_options)
        servers.append(srv)
        return srv.start()

    yield make
    errors: list[BaseException] = []
    for srv in servers:
        try:
            srv.close()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def pop3_server(pop3_server_factory: Pop3ServerFactory) -> Pop3TestServer:
    """A plain-text POP3 server on ``127.0.0.1`` and a free port, no users yet; stopped after."""
    return pop3_server_factory()
