"""Issue 15, finding 13 (TLS part): a renegotiation request is answered at once.

selectors used not to flush TLS output produced while reading, so a TLS 1.2
client asking to renegotiate waited until the idle timeout.  ``openssl
s_client -tls1_2`` asks for it with its ``R`` command (read from stdin); the
server must answer (a ``no_renegotiation`` alert, or a close) right away —
long before the 60 s idle timeout — on every transport, with implicit TLS
and after STLS.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading

import pytest
from tlsutil import TLSFiles

from .round2 import KINDS, serving

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


class SClient:
    """``openssl s_client`` in interactive mode (so ``R`` renegotiates), lines collected."""

    def __init__(self, port: int, *extra: str) -> None:
        assert OPENSSL is not None
        self.p = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-crlf", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in iter(self.p.stdout.readline, b""):
            self.lines.put(line)

    def expect(self, prefix: bytes, timeout: float = 10.0) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line; saw {self.seen[-5:]!r}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return

    def send(self, data: bytes) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        for f in (self.p.stdin, self.p.stdout):
            if f is not None:
                f.close()


@pytest.fixture(params=["implicit", "stls"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def client_for(ports: dict[str, int], mode: str) -> SClient:
    if mode == "implicit":
        return SClient(ports["pop3s"])
    return SClient(ports["pop3"], "-starttls", "pop3")


@pytest.mark.parametrize("kind", KINDS)
def test_a_renegotiation_request_is_answered_at_once(kind: str, tls: TLSFiles, mode: str) -> None:
    options = {"tls_cert": str(tls.cert_pem), "tls_key": str(tls.key_pem), "pop3s_port": 0,
               "idle_timeout": 60, "login_timeout": 60}
    with serving(kind, **options) as server:
        ports = {"pop3": server.cget("port"), "pop3s": server.cget("pop3s_port")}
        client = client_for(ports, mode)
        try:
            if mode == "implicit":
                client.expect(b"+OK")
            else:
                client.expect(b"---")  # s_client has run STLS and the handshake
            client.send(b"CAPA\n")
            client.expect(b".")  # the session works over TLS
            client.send(b"R\n")
            client.expect(b"RENEGOTIATING")
            # The server refuses: s_client reports the alert (or the close) and exits,
            # instead of waiting out the 60 s idle timeout.
            try:
                client.p.wait(10)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"no answer to the renegotiation request; saw {client.seen[-5:]!r}"
                ) from None
            while not client.lines.empty():
                client.seen.append(client.lines.get())
            tail = b"".join(client.seen[-5:])
            assert b"no renegotiation" in tail or b"closed" in tail or client.p.returncode, tail
        finally:
            client.close()
