"""The server facade, in the shape of Tcllib's pop3d: options, life cycle, live connections.

``Server`` holds the options (``configure``/``cget``, the table in
``pop3proto.options``), the live sessions (``connections``/
``connection_state``), the per-address limits and failed-login penalties,
and the life cycle (``up``/``down``/``destroy``).  It implements the narrow
``Services`` interface through which each connection's
``pop3proto.driver.SessionDriver`` reaches it; a transport (or your own
event loop) runs the drivers.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Protocol

from ._config import Config
from ._texts import DEFAULT_LANGUAGES, Catalog
from .auth import ScramSecret, decoy_scram
from .driver import SessionDriver, Settings
from .limits import AddressCounter, Penalties, PenaltyTable, address_group
from .ops.logfmt import event_message
from .options import OPTIONS, check_option
from .pop3d import Pop3dAuth, Pop3dStorage
from .storage import SafeLog, capability, nonblocking

__all__ = ["Server", "TransportHandle", "is_loopback"]

log = logging.getLogger("pop3proto")

#: Last-login times kept in memory for LOGIN-DELAY (stores that keep none).
MAX_LOGINS = 100_000

#: Options that only take effect when the server is next brought up.
_LISTEN_OPTIONS = frozenset(name for name, o in OPTIONS.items() if o.listen)


class TransportHandle(Protocol):
    """What a transport's ``start(server)`` returns: a server running in a thread."""

    ports: dict[str, int]

    def stop_listening(self) -> None:
        """Close the listening sockets; live sessions go on."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the transport has stopped; True if it did."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """*host* as an address (a v4-mapped IPv6 one as IPv4), or None if it is not one."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str) -> bool:
    """Whether *host* is a loopback address (127/8, ::1, v4-mapped loopback)."""
    addr = _ip(host)
    return addr is not None and addr.is_loopback


def load_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server context for *cert*/*key* (None without a cert); raises if they don't load."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key or None)
    return ctx


def _catalogs(languages: Iterable[Any]) -> list[Catalog]:
    """The catalogs for the ``languages`` option: shipped ones by tag, or Catalogs as given."""
    from . import lang

    out = []
    for item in languages:
        if isinstance(item, str):
            try:
                item = lang.load(item)
            except (LookupError, ValueError) as exc:
                raise TypeError(f"option 'languages': {exc}") from None
        out.append(item)
    return out


class Server:
    """A POP3 server: options, life cycle and live sessions (Tcllib pop3d's API).

    ``Server(**options)``; see ``pop3proto.options.OPTIONS`` for names,
    defaults and meanings.  With no ``auth`` every login fails; with no
    ``storage`` every maildrop is empty.  A Server that is never brought
    ``up()`` still serves sessions that a host drives itself
    (``SessionDriver(server, peer, now=...)``).
    """

    def __init__(self, name: str | None = None, **options: Any) -> None:
        self._options: dict[str, Any] = {k: o.default for k, o in OPTIONS.items()}
        self._options["hostname"] = socket.gethostname() or "localhost"
        if name is not None:
            options["name"] = name
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._sessions: dict[str, SessionDriver] = {}
        self._started: dict[str, float] = {}
        self._killers: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._secret = secrets.token_bytes(32)  # decoys for authenticators without their own
        self._addresses = AddressCounter()
        self._penalties: PenaltyTable = Penalties(2.0, 15.0)
        self._state = "down"
        self._handle: TransportHandle | None = None
        self._bound: dict[str, int] = {}
        self._config_cache: dict[tuple[bool, bool, bool, bool], Config] = {}
        self._settings: Settings | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        # LOGIN-DELAY for stores that keep no login times: mailbox -> last login, oldest first.
        self._logins: OrderedDict[str, float] = OrderedDict()
        self.configure(**options)

    # ------------------------------------------------------------------ options

    def configure(self, **options: Any) -> dict[str, Any] | None:
        """Set options; with no arguments, return every option and its value.

        Raises:
            TypeError: an unknown option, or a value it does not accept.
            RuntimeError: a listening option changed while the server is up.
        """
        if not options:
            return {k: self.cget(k) for k in OPTIONS}
        for key, value in options.items():
            check_option(key, value)
            if key == "hostname" and value is None:
                options[key] = socket.gethostname() or "localhost"
            if key in _LISTEN_OPTIONS and self._state != "down":
                if value != self.cget(key):
                    raise RuntimeError(f"option {key!r} cannot change while the server is up")
                options[key] = self._options[key]  # the bound port reads back as itself
        if callable(options.get("auth")) and not hasattr(options["auth"], "lookup"):
            options["auth"] = Pop3dAuth(options["auth"])
        if callable(options.get("storage")) and not hasattr(options["storage"], "scan"):
            options["storage"] = Pop3dStorage(options["storage"])
        tls_context = self._tls_context
        if {"tls_cert", "tls_key"} & options.keys():
            # Load first: a certificate that fails to load changes nothing.
            tls_context = load_tls(
                options.get("tls_cert", self._options["tls_cert"]),
                options.get("tls_key", self._options["tls_key"]),
            )
        merged = {**self._options, **options}
        self._make_config(merged, plain_ok=True, tls=False)  # the core's rules, checked now
        with self._lock:
            self._options = merged
            self._tls_context = tls_context
            self._config_cache = {}
            self._settings = None
            self._trusted = [
                ipaddress.ip_network(v, strict=False) for v in merged["trusted_proxies"]
            ]
            self._penalties.base = float(merged["auth_failure_delay"])
            self._penalties.cap = float(merged["auth_failure_delay_max"])
        return None

    def cget(self, name: str) -> Any:
        """One option's value; ``port`` is the bound port while the server is up."""
        if name not in OPTIONS:
            raise TypeError(f"unknown option {name!r}")
        if name == "port" and "pop3" in self._bound:
            return self._bound["pop3"]
        if name == "pop3s_port" and "pop3s" in self._bound:
            return self._bound["pop3s"]
        return self._options[name]

    def reload_tls(self) -> None:
        """(Re)load ``tls_cert``/``tls_key`` into a fresh context; live sessions keep theirs.

        With ``workers`` > 1 each worker then reloads its own (a SIGHUP to it)
        and logs the outcome; a certificate that fails to load here raises
        and changes nothing anywhere.
        """
        context = load_tls(self._options["tls_cert"], self._options["tls_key"])
        with self._lock:
            self._tls_context = context
            self._config_cache = {}
            handle = self._handle
        forward = getattr(handle, "reload_tls", None)
        if forward is not None:
            forward()  # a WorkerPool: each worker process reloads its own

    def use_penalties(self, table: PenaltyTable) -> None:
        """Count failed logins in *table* from now on (one shared by a pool's workers, say).

        Its ``base`` and ``cap`` follow this server's options.
        """
        with self._lock:
            table.base = float(self._options["auth_failure_delay"])
            table.cap = float(self._options["auth_failure_delay_max"])
            self._penalties = table

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context new TLS handshakes use (explicit ``ssl_context`` or cert/key)."""
        ctx: ssl.SSLContext | None = self._options["ssl_context"] or self._tls_context
        return ctx

    @property
    def state(self) -> str:
        """``down``, ``up`` or ``exiting`` (read-only)."""
        return self._state

    @property
    def logger(self) -> logging.Logger:
        """The configured logger (add handlers here)."""
        logger: logging.Logger = self._options["logger"]
        return logger

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """What transports write to: the logger, but a failing handler is ignored."""
        return SafeLog(self.logger, {})

    # ------------------------------------------------------------------ life cycle

    def up(self) -> None:
        """Start listening in a background thread; returns once the ports are bound."""
        with self._lock:
            if self._state == "up":
                return
            if self._state == "exiting":
                raise RuntimeError("server is being destroyed")
        from .transports import _common

        handle = _common.start(self)
        self.listening(handle)

    def listening(self, handle: TransportHandle) -> None:
        """A transport has bound its sockets and serves (``up()`` and ``serve()`` call it)."""
        with self._lock:
            self._handle = handle
            self._bound = dict(handle.ports)
            self._state = "up"

    def stopped(self, handle: TransportHandle) -> None:
        """A transport started by ``serve()`` has ended."""
        with self._lock:
            if self._handle is handle:
                self._handle = None
                self._bound = {}
                self._state = "down"

    def down(self) -> None:
        """Stop listening; live sessions go on (pop3d ``down``).

        With ``workers`` > 1 the workers own the sessions: ``down`` stops them
        all, like ``destroy("kill")``.
        """
        with self._lock:
            handle = self._handle
            self._state = "down" if self._state == "up" else self._state
        if handle is not None:
            handle.stop_listening()

    def destroy(self, mode: str = "kill", timeout: float | None = 30.0) -> None:
        """Stop the server.  ``kill`` ends sessions (no updates); ``defer`` lets them finish.

        Killed sessions get ``-ERR [SYS/TEMP] Server shutting down.`` where a
        line can still be sent.  Blocks until every session has ended (or
        *timeout* passes).
        """
        if mode not in ("kill", "defer"):
            raise ValueError("mode must be 'kill' or 'defer'")
        with self._lock:
            handle, self._handle = self._handle, None
            self._state = "exiting"
        if handle is not None:
            handle.stop_listening()
        if mode == "kill":
            self.kill_sessions()
        self.wait_sessions(timeout)
        if handle is not None:
            handle.join(timeout)
        with self._lock:
            self._state = "down"
            self._bound = {}

    def kill_sessions(self) -> None:
        """Ask every live session to end now, without updates (through its host's killer).

        Each gets ``-ERR [SYS/TEMP] Server shutting down.`` where a line can
        still be sent; returns at once (``wait_sessions`` waits).
        """
        with self._lock:
            killers = list(self._killers.values())
        for kill in killers:
            try:
                kill()
            except Exception:
                pass

    def serve_forever(self) -> None:
        """Bring the server up if it is not, then wait until it is destroyed or brought down."""
        if self._state != "up":
            self.up()
        handle = self._handle
        if handle is not None:
            handle.join(None)

    def wait_sessions(self, timeout: float | None = None) -> bool:
        """Wait until no session is live; True if none is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._sessions:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def __enter__(self) -> Server:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy("kill")

    def proxy_expected(self) -> bool:
        """Whether connections must start with a PROXY header (``proxy_protocol``)."""
        return bool(self._options["proxy_protocol"])

    def proxy_trusted(self, host: str) -> bool:
        """Whether *host* may send a PROXY header (it is in ``trusted_proxies``)."""
        addr = _ip(host)
        return addr is not None and any(addr in net for net in self._trusted)

    # ------------------------------------------------------------------ connections

    def connections(self) -> list[str]:
        """The ids of the live sessions."""
        with self._lock:
            return list(self._sessions)

    def connection_state(self, session_id: str) -> dict[str, Any]:
        """A session's state, user, peer, counts and deletion marks (KeyError if gone)."""
        with self._lock:
            driver = self._sessions[session_id]
            started = self._started.get(session_id, 0.0)
        return {**driver.state(), "started": started}

    def set_killer(self, driver: SessionDriver, kill: Any) -> None:
        """Register how the host ends *driver*'s session from any thread (``destroy("kill")``).

        *kill* must make the host call ``driver.shutdown()`` on its own thread
        or task and interrupt whatever it waits for.
        """
        with self._lock:
            if driver.id in self._sessions:
                self._killers[driver.id] = kill

    # ------------------------------------------------------------------ Services

    def session_settings(self) -> Settings:
        """The options a session starting now works with (made once per configure)."""
        settings = self._settings
        if settings is None:
            opts = self._options
            auth, storage = opts["auth"], opts["storage"]
            settings = self._settings = Settings(
                auth=auth,
                storage=storage,
                greeting=opts["greeting"],
                hostname=opts["hostname"],
                oauth=opts["oauth"],
                chunk_size=opts["chunk_size"],
                idle_timeout=float(opts["idle_timeout"]),
                login_timeout=float(opts["login_timeout"]),
                handshake_timeout=float(opts["handshake_timeout"]),
                dummy_verifier=capability(auth, "dummy_verifier"),
                inline_reads=bool(capability(storage, "nonblocking_reads")),
            )
        return settings

    def session_config(self, host: str, tls: bool, session_id: str) -> Config:
        """The core's Config for a client at *host* (may ask the authenticator: a Call)."""
        opts = self._options
        cleartext = opts["cleartext_auth"]
        plain_ok = bool(cleartext is True or (cleartext == "loopback" and is_loopback(host)))
        auth = opts["auth"]
        key = (
            plain_ok,
            tls,
            bool(capability(auth, "has_cleartext")),
            bool(capability(auth, "has_scram")),
        )
        config = self._config_cache.get(key)
        if config is None:
            config = self._config_cache[key] = self._make_config(opts, plain_ok=plain_ok, tls=tls)
        trace = opts["trace"]
        if trace is not None:
            config = replace(config, trace=lambda d, line: trace(session_id, d, line))
        return config

    def _make_config(self, opts: dict[str, Any], *, plain_ok: bool, tls: bool) -> Config:
        """The core's Config for these options; raises TypeError where the core would refuse."""
        auth = opts["auth"]
        mechs = opts["sasl_mechanisms"]
        if mechs is None:
            mechs = ["PLAIN", "LOGIN"]
            if auth is not None and capability(auth, "has_cleartext"):
                mechs.append("CRAM-MD5")
            if auth is not None and capability(auth, "has_scram"):
                mechs.append("SCRAM-SHA-256")
            if opts["oauth"] is not None:
                mechs += ["OAUTHBEARER", "XOAUTH2"]
        context = opts["ssl_context"] or self._tls_context
        try:
            return Config(
                implementation=opts["name"],
                max_line_length=opts["max_line_length"],
                max_bad_commands=opts["max_bad_commands"],
                max_auth_failures=opts["max_auth_failures"],
                apop=bool(opts["apop"]) and bool(capability(auth, "has_cleartext")),
                sasl_mechanisms=tuple(m.upper() for m in mechs),
                cleartext_auth=plain_ok,
                stls=context is not None and not tls,
                utf8=opts["utf8"],
                lang=opts["lang"],
                languages=(*DEFAULT_LANGUAGES, *_catalogs(opts["languages"])),
                login_delay=opts["login_delay"],
                expire=opts["expire"],
            )
        except ValueError as exc:
            raise TypeError(f"options refused by the protocol core: {exc}") from None

    def register(self, driver: SessionDriver) -> str | None:
        """Count a new session; the refusal text when over a limit or shutting down."""
        opts = self._options
        host = driver.peer[0]
        group = address_group(host, opts["address_ipv6_prefix"])
        counted = opts["limit_loopback"] or not is_loopback(host)
        with self._lock:
            refused = None
            if self._state == "exiting":
                refused = "Server shutting down."
            elif opts["max_connections"] and len(self._sessions) >= opts["max_connections"]:
                refused = "Too many connections."
            elif (
                counted
                and opts["max_connections_per_address"]
                and self._addresses.count(group) >= opts["max_connections_per_address"]
            ):
                refused = "Too many connections from your address."
            self._sessions[driver.id] = driver
            self._started[driver.id] = time.time()
            self._addresses.add(group)
        return refused

    def unregister(self, driver: SessionDriver) -> None:
        """Forget an ended session: its slot is free again."""
        group = address_group(driver.peer[0], self._options["address_ipv6_prefix"])
        with self._idle:
            if self._sessions.pop(driver.id, None) is None:
                return
            self._started.pop(driver.id, None)
            self._killers.pop(driver.id, None)
            self._addresses.remove(group)
            self._idle.notify_all()

    def login_wait(self, host: str, now: float) -> float:
        """Seconds a login attempt from *host* waits before it is checked (queued penalty)."""
        key = address_group(host, self._options["penalty_ipv6_prefix"])
        with self._lock:
            return self._penalties.wait(key, now)

    def login_failed(self, host: str, now: float) -> float:
        """Count a failed login from *host*; the delay to serve before answering it."""
        key = address_group(host, self._options["penalty_ipv6_prefix"])
        with self._lock:
            return self._penalties.failed(key, now)

    def log_event(self, level: int, fields: dict[str, Any]) -> None:
        """Write one session event: its Dovecot-shaped line, with the fields as ``record.pop3``."""
        fields["pid"] = self._pid
        try:
            self.logger.log(level, "%s", event_message(fields), extra={"pop3": fields})
        except Exception:  # a failing log handler never kills a session
            pass

    @nonblocking  # a dict lookup
    def last_login(self, mailbox: str) -> float | None:
        """The last login to *mailbox* this process saw (LOGIN-DELAY for stores without one)."""
        with self._lock:
            return self._logins.get(mailbox)

    @nonblocking
    def logged_in(self, mailbox: str, when: float) -> None:
        """Remember a login to *mailbox* at *when*; the table keeps the latest MAX_LOGINS."""
        with self._lock:
            logins = self._logins
            logins[mailbox] = when
            logins.move_to_end(mailbox)
            while len(logins) > MAX_LOGINS:  # the oldest logins are the ones no delay covers
                logins.popitem(last=False)

    def decoy_scram(self, name: str) -> ScramSecret:
        """A SCRAM secret for an unknown *name* when the authenticator has no decoys of its own."""
        return decoy_scram(self._secret, name, 4096)

    def nonce(self) -> str:
        """A fresh random token (APOP timestamps, SASL nonces)."""
        return secrets.token_hex(12)

    def wall_clock(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    def next_session_id(self) -> str:
        """``"<pid>-<n>"``: unique across worker processes."""
        pid = os.getpid()
        if pid != self._pid:  # a forked worker
            self._pid = pid
        return f"{pid}-{next(self._ids)}"


def iter_networks(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parse network strings (for ``trusted_proxies``)."""
    return [ipaddress.ip_network(v, strict=False) for v in values]
