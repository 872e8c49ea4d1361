"""The command shared by every ``python -m pop3proto.transports.NAME``.

Flags and config keys (``--config FILE``, TOML) become ``Server`` options,
generated from ``OPTIONS`` (see ``pop3proto.ops.config``); ``--demo`` makes a
throwaway Maildir with one user and serves it.  The listening sockets are
opened first (or taken from systemd), then privileges are dropped
(``--user``/``--group``), then the server starts and tells systemd it is
ready.  Every start-up problem (a missing file, a port in use, a
bad flag) is one line on stderr and exit status 2.  SIGINT/SIGTERM stop the
server cleanly (sessions closed without their deletions, locks released,
exit 0); SIGHUP reloads the TLS certificate and key.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from ..ops import config, logfmt, metrics, privileges, systemd
from ..options import worker_count

if TYPE_CHECKING:
    from ..server import Server

__all__ = ["build_parser", "run"]

DEMO_MESSAGES = [
    b"From: Alice <alice@example.org>\nTo: demo@localhost\nSubject: Welcome to pop3proto\n"
    b"Message-ID: <welcome@pop3proto.example>\n\nHello!\n\nThis maildrop is a demo.\n"
    b".A line that starts with a dot survives dot-stuffing.\n",
    b"From: Bob <bob@example.org>\nTo: demo@localhost\nSubject: Second message\n"
    b"Message-ID: <second@pop3proto.example>\n\nTry TOP 2 0, UIDL and DELE 2.\n",
    b"From: Carol <carol@example.org>\nTo: demo@localhost\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n"
    b"Message-ID: <third@pop3proto.example>\nContent-Type: text/plain; charset=utf-8\n\n"
    b"Gr\xc3\xbc\xc3\x9fe aus dem Demo-Postfach.\n",
]


def build_parser(transport: str) -> argparse.ArgumentParser:
    """The flags every transport accepts (generated from ``OPTIONS``; see ``ops.config``)."""
    from .. import __version__

    return config.build_parser(f"python -m pop3proto.transports.{transport}", __version__)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _readable(path: str, what: str) -> str | None:
    if not os.path.exists(path):
        return f"{what} {path!r} does not exist"
    if not os.access(path, os.R_OK):
        return f"{what} {path!r} is not readable"
    return None


def _make_demo() -> tuple[str, str, str, str]:
    from pop3proto.maildir import MaildirStorage
    from pop3proto.passwd import hash_password

    base = tempfile.mkdtemp(prefix="pop3proto-demo-")
    root = os.path.join(base, "mail")
    os.makedirs(root)
    password = secrets.token_urlsafe(9)
    passwd = os.path.join(base, "users")
    with open(passwd, "w", encoding="utf-8") as f:
        f.write(f"demo:{hash_password(password, 'PLAIN')}::::::\n")
    store = MaildirStorage(root, create=True)
    for message in DEMO_MESSAGES:
        store.deliver("demo", message)
    return base, root, passwd, password


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket like the server's own (SO_REUSEADDR, dual-stack for '::')."""
    return socket.create_server(
        (host, port),
        family=socket.AF_INET6 if ":" in host else socket.AF_INET,
        backlog=4096,
        dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
    )


class _Problem(Exception):
    """A start-up problem: one line on stderr, exit status 2."""


def _check(s: dict[str, Any], demo: bool) -> None:
    """The checks that need no socket: files, TLS pairing, authenticator, proxies, users."""
    if not s["maildir_root"]:
        raise _Problem("--maildir-root is required (or use --demo)")
    if not os.path.isdir(s["maildir_root"]):
        raise _Problem(f"maildir root {s['maildir_root']!r} is not a directory")
    for key, what in (("passwd_file", "passwd file"), ("tls_cert", "TLS certificate"),
                      ("tls_key", "TLS key")):
        problem = s[key] and _readable(s[key], what)
        if problem:
            raise _Problem(problem)
    if s["tls_key"] and not s["tls_cert"]:
        raise _Problem("--tls-key needs --tls-cert")
    if s["pop3s_port"] is not None and not s["tls_cert"]:
        raise _Problem("--pop3s-port needs --tls-cert and --tls-key")
    if not s["passwd_file"] and not s["no_auth"] and not demo:
        raise _Problem("no authenticator: give --passwd-file (or --no-auth to refuse every "
                       "login, or --demo)")
    if s["proxy_protocol"] and not s["trusted_proxies"]:
        raise _Problem("--proxy-protocol needs --trusted-proxies")
    if s["user"] is not None or s["group"] is not None:
        try:
            privileges.resolve(s["user"], s["group"])
        except ValueError as exc:
            raise _Problem(str(exc)) from None
    if s["metrics_port"] is not None and not metrics.available():
        raise _Problem(metrics.MISSING_EXTRA)


def _make_server(transport: str, s: dict[str, Any]) -> Server:
    from pop3proto.maildir import MaildirStorage
    from pop3proto.passwd import PasswdFile
    from pop3proto.server import Server

    try:
        auth = PasswdFile(s["passwd_file"]) if s["passwd_file"] else None
        server = Server(**config.server_options(s), transport=transport,
                        storage=MaildirStorage(s["maildir_root"]), auth=auth)
        if s["tls_cert"]:
            server.configure(tls_cert=s["tls_cert"], tls_key=s["tls_key"])
    except (OSError, ValueError, TypeError) as exc:
        raise _Problem(f"cannot start: {exc}") from None
    return server


def _bind(server: Server, s: dict[str, Any], log: logging.Logger) -> list[socket.socket]:
    """Open the listening sockets (systemd's, or bound here) and hand them to *server*."""
    try:
        activated = systemd.listen_sockets()
    except ValueError as exc:
        raise _Problem(f"socket activation: {exc}") from None
    if activated is not None:
        if activated.plain is None:
            raise _Problem("socket activation: no plain POP3 socket was passed")
        if activated.tls is not None and not s["tls_cert"]:
            raise _Problem("socket activation: a pop3s socket needs --tls-cert and --tls-key")
        socks = activated.sockets()
        log.info("socket activation: %d socket(s) from systemd; --host/--port ignored",
                 len(socks))
    else:
        try:
            socks = [_listen(s["host"], s["port"])]
            if s["pop3s_port"] is not None:
                socks.append(_listen(s["host"], s["pop3s_port"]))
        except OSError as exc:
            for sock in locals().get("socks", []):
                sock.close()
            raise _Problem(f"cannot start: {exc}") from None
    pending = iter(socks)

    def factory(host: str, port: int) -> socket.socket:
        return next(pending)

    server.configure(socket_factory=factory, port=socks[0].getsockname()[1],
                     pop3s_port=socks[1].getsockname()[1] if len(socks) > 1 else None)
    return socks


def _setup_logging(s: dict[str, Any]) -> logging.Logger:
    handler, warning = logfmt.make_handler(s["log_format"], s["log_target"])
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level(s))
    log = logging.getLogger("pop3proto")
    if warning:
        log.warning("%s", warning)
    return log


def _start_metrics(s: dict[str, Any], server: Server, uid: int | None,
                   gid: int | None) -> tuple[Any, str | None]:
    """Start the endpoint and the counting handler; (http server, multiprocess dir)."""
    mp_dir = None
    if worker_count(s["workers"]) > 1:
        mp_dir = tempfile.mkdtemp(prefix="pop3proto-metrics-")
        if uid is not None:
            os.chown(mp_dir, uid, -1 if gid is None else gid)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    counters = metrics.Metrics(
        connections=None if mp_dir else (lambda: len(server.connections()))
    )
    logging.getLogger("pop3proto").addHandler(metrics.MetricsHandler(counters))
    try:
        httpd, port = metrics.serve_metrics(s["metrics_host"], s["metrics_port"],
                                            counters.registry)
    except OSError as exc:
        raise _Problem(f"cannot start the metrics endpoint: {exc}") from None
    print(f"metrics on http://{s['metrics_host']}:{port}/metrics", flush=True)
    return httpd, mp_dir


def run(transport: str, argv: list[str] | None = None) -> int:
    """Parse *argv*, serve until SIGINT/SIGTERM; the exit status."""
    parser = build_parser(transport)
    flags = vars(parser.parse_args(argv))
    prog = parser.prog
    try:
        s = config.resolve_settings(flags)
    except config.ConfigError as exc:
        return _fail(prog, str(exc))
    demo = bool(flags.get("demo"))
    demo_dir = None
    password = ""
    cleanup: list[Any] = []
    try:
        log = _setup_logging(s)
        if demo:
            demo_dir, s["maildir_root"], s["passwd_file"], password = _make_demo()
        _check(s, demo)
        server = _make_server(transport, s)
        if flags.get("check_config"):
            print(f"{prog}: configuration OK", flush=True)
            return 0
        soft, hard = privileges.raise_nofile()
        log.debug("open-file limit: %d (hard limit %d)", soft, hard)
        socks = _bind(server, s, log)
        cleanup += [sock.close for sock in socks]
        uid, gid, _name = privileges.resolve(s["user"], s["group"])
        if s["metrics_port"] is not None:
            httpd, mp_dir = _start_metrics(s, server, uid, gid)
            cleanup.append(httpd.shutdown)
            if mp_dir:
                cleanup.append(lambda: shutil.rmtree(mp_dir, ignore_errors=True))
        if uid is not None or gid is not None:
            try:
                privileges.drop_privileges(s["user"], s["group"])
            except (OSError, ValueError) as exc:
                raise _Problem(f"cannot drop privileges: {exc}") from None
            log.info("running as uid %d gid %d", os.getuid(), os.getgid())
        elif os.geteuid() == 0:
            log.warning("running as root: give --user and --group to drop privileges once "
                        "the ports are bound")
        try:
            server.up()
        except (OSError, ValueError, TypeError) as exc:
            raise _Problem(f"cannot start: {exc}") from None
    except _Problem as exc:
        for close in reversed(cleanup):
            close()
        if demo_dir:
            shutil.rmtree(demo_dir, ignore_errors=True)
        return _fail(prog, str(exc))
    return _serve(transport, server, s, demo, password, demo_dir, cleanup)


def _serve(transport: str, server: Server, s: dict[str, Any], demo: bool, password: str,
           demo_dir: str | None, cleanup: list[Any]) -> int:
    stop = threading.Event()
    log = logging.getLogger("pop3proto")

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        try:
            server.reload_tls()
            log.info("TLS certificate reloaded")
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed: %s", exc)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    port = server.cget("port")
    host = s["host"] if ":" not in s["host"] else f"[{s['host']}]"
    pop3s = server.cget("pop3s_port")
    print(f"pop3proto ({transport}) listening on {host}:{port}"
          + (f", pop3s on {pop3s}" if pop3s is not None else ""), flush=True)
    if demo:
        print(f"demo maildir: {s['maildir_root']}", flush=True)
        print(f"user: demo  password: {password}", flush=True)
        print(f"try:  curl pop3://demo:{password}@{host}:{port}/1", flush=True)
        if s["tls_cert"]:
            print(f"TLS:  curl --ssl-reqd -k pop3://demo:{password}@{host}:{port}/1", flush=True)
    systemd.notify(f"READY=1\nSTATUS=serving POP3 on port {port}\nMAINPID={os.getpid()}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        systemd.notify("STOPPING=1")
        server.destroy("kill", timeout=10)
        for close in reversed(cleanup):
            close()
        if demo_dir:
            shutil.rmtree(demo_dir, ignore_errors=True)
    return 0
