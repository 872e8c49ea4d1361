"""The command shared by every ``python -m pop3proto.transports.NAME``.

Flags become ``Server`` options; ``--demo`` makes a throwaway Maildir with one
user and serves it.  Every start-up problem (a missing file, a port in use, a
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
import sys
import tempfile
import threading
from typing import Any, NoReturn

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(transport: str) -> argparse.ArgumentParser:
    """The flags every transport accepts."""
    p = _Parser(
        prog=f"python -m pop3proto.transports.{transport}",
        description="Serve Maildirs over POP3 (RFC 1939).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1100, help="plain POP3 port (default 1100)")
    p.add_argument("--pop3s-port", type=int, default=None, help="implicit-TLS port (RFC 8314)")
    p.add_argument("--passwd-file", help="Dovecot passwd-file with the users")
    p.add_argument("--maildir-root", help="directory holding ROOT/<user>/{cur,new,tmp}")
    p.add_argument("--tls-cert", help="PEM certificate chain (enables STLS)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--login-timeout", type=float, default=60.0,
                   help="idle seconds allowed before login (default 60)")
    p.add_argument("--max-connections", type=int, default=10000)
    p.add_argument("--max-connections-per-address", type=int, default=100)
    p.add_argument("--auth-failure-delay", type=float, default=2.0,
                   help="first failed-login delay in seconds, doubling to 15 (default 2)")
    p.add_argument("--cleartext-auth", choices=["loopback", "always", "never"],
                   default="loopback", help="allow USER/PASS/PLAIN before TLS (default loopback)")
    p.add_argument("--apop", action="store_true", help="offer APOP (needs {PLAIN} secrets)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the port (default 1)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="expect HAProxy PROXY v1/v2 headers from --trusted-proxies")
    p.add_argument("--trusted-proxies", default="",
                   help="comma-separated networks allowed to send PROXY headers")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--demo", action="store_true",
                   help="serve a throwaway Maildir with a demo user and print how to try it")
    return p


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


def run(transport: str, argv: list[str] | None = None) -> int:
    """Parse *argv*, serve until SIGINT/SIGTERM; the exit status."""
    parser = build_parser(transport)
    args = parser.parse_args(argv)
    prog = parser.prog
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    demo_dir = None
    password = ""
    if args.demo:
        demo_dir, args.maildir_root, args.passwd_file, password = _make_demo()
    if not args.maildir_root:
        return _fail(prog, "--maildir-root is required (or use --demo)")
    if not os.path.isdir(args.maildir_root):
        return _fail(prog, f"maildir root {args.maildir_root!r} is not a directory")
    for path, what in ((args.passwd_file, "passwd file"), (args.tls_cert, "TLS certificate"),
                       (args.tls_key, "TLS key")):
        problem = path and _readable(path, what)
        if problem:
            return _fail(prog, problem)
    if bool(args.tls_key) and not args.tls_cert:
        return _fail(prog, "--tls-key needs --tls-cert")
    if args.pop3s_port is not None and not args.tls_cert:
        return _fail(prog, "--pop3s-port needs --tls-cert and --tls-key")

    from pop3proto.maildir import MaildirStorage
    from pop3proto.passwd import PasswdFile
    from pop3proto.server import Server

    options: dict[str, Any] = {
        "transport": transport,
        "host": args.host,
        "port": args.port,
        "pop3s_port": args.pop3s_port,
        "storage": MaildirStorage(args.maildir_root),
        "auth": PasswdFile(args.passwd_file) if args.passwd_file else None,
        "idle_timeout": args.idle_timeout,
        "login_timeout": args.login_timeout,
        "max_connections": args.max_connections,
        "max_connections_per_address": args.max_connections_per_address,
        "auth_failure_delay": args.auth_failure_delay,
        "cleartext_auth": {"loopback": "loopback", "always": True, "never": False}[
            args.cleartext_auth
        ],
        "apop": args.apop,
        "workers": max(1, args.workers),
        "proxy_protocol": args.proxy_protocol,
        "trusted_proxies": tuple(n.strip() for n in args.trusted_proxies.split(",") if n.strip()),
    }
    if args.proxy_protocol and not options["trusted_proxies"]:
        return _fail(prog, "--proxy-protocol needs --trusted-proxies")
    try:
        server = Server(**options)
        if args.tls_cert:
            server.configure(tls_cert=args.tls_cert, tls_key=args.tls_key)
        server.up()
    except (OSError, ValueError, TypeError) as exc:
        return _fail(prog, f"cannot start: {exc}")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        try:
            server.reload_tls()
            logging.getLogger("pop3proto").info("TLS certificate reloaded")
        except (OSError, ValueError) as exc:
            logging.getLogger("pop3proto").error("TLS reload failed: %s", exc)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    port = server.cget("port")
    host = args.host if ":" not in args.host else f"[{args.host}]"
    print(f"pop3proto ({transport}) listening on {host}:{port}"
          + (f", pop3s on {server.cget('pop3s_port')}" if args.pop3s_port is not None else ""),
          flush=True)
    if args.demo:
        print(f"demo maildir: {args.maildir_root}", flush=True)
        print(f"user: demo  password: {password}", flush=True)
        print(f"try:  curl pop3://demo:{password}@{host}:{port}/1", flush=True)
        if args.tls_cert:
            print(f"TLS:  curl --ssl-reqd -k pop3://demo:{password}@{host}:{port}/1", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.destroy("kill", timeout=10)
        if demo_dir:
            shutil.rmtree(demo_dir, ignore_errors=True)
    return 0
