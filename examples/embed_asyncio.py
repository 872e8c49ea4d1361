"""pop3proto's whole server policy inside your own asyncio Protocol (no pop3proto transport).

Maildir storage, a Dovecot passwd-file, SASL, STLS, limits and failed-login
delays all come from ``Server`` (never brought ``up()``); this file only
performs each connection's ``SessionDriver`` actions in asyncio's idiom.

    python examples/embed_asyncio.py --port 0 --maildir-root DIR --passwd-file FILE \
        [--tls-cert CERT --tls-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile
from pop3proto.server import Server


class POP3(asyncio.Protocol):
    """One connection: asyncio calls in, the driver says what to do next."""

    def __init__(self, server: Server) -> None:
        self.server, self.loop = server, asyncio.get_running_loop()
        self.busy = False  # a Call or the TLS handshake is running
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")[:2]
        self.driver = SessionDriver(self.server, peer, now=self.loop.time())
        self.server.set_killer(self.driver, lambda: self.loop.call_soon_threadsafe(self.kill))
        self.pump()

    def data_received(self, data: bytes) -> None:
        self.driver.receive_data(data)
        self.pump()

    def eof_received(self) -> None:
        self.driver.receive_data(b"")
        self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.connection_lost(exc)
        self.pump()  # the lock is released through Calls, then CLOSE

    def kill(self) -> None:
        self.driver.shutdown()
        self.pump()

    def pump(self) -> None:
        """Perform actions until the driver waits for input, a call or the handshake."""
        driver = self.driver
        while not self.busy and not driver.closed:
            action = driver.next_action(self.loop.time())
            if action is RECEIVE:  # data_received() or the deadline resumes us
                if self.timer is not None:
                    self.timer.cancel()
                if driver.deadline is not None:
                    self.timer = self.loop.call_at(driver.deadline, self.pump)
                return
            if isinstance(action, Write):
                self.transport.write(action.data)  # asyncio buffers; fine for an example
            elif isinstance(action, Call):
                self.busy = True
                self.loop.create_task(self.call(action))
            elif action is START_TLS:
                self.busy = True
                self.loop.create_task(self.start_tls())
            else:
                assert action is CLOSE
                self.transport.close()

    async def call(self, action: Call) -> None:
        try:
            if action.inline:
                result = action.fn(*action.args)
            else:
                result = await self.loop.run_in_executor(None, action.fn, *action.args)
            if asyncio.iscoroutine(result):
                result = await result
            self.driver.call_done(result)
        except Exception as exc:
            self.driver.call_failed(exc)
        self.busy = False
        self.pump()

    async def start_tls(self) -> None:
        try:
            self.transport = await self.loop.start_tls(
                self.transport, self, self.driver.ssl_context, server_side=True)
            self.driver.tls_started()
        except Exception as exc:
            self.driver.connection_lost(exc)
        self.busy = False
        self.pump()


async def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--maildir-root", "--passwd-file", "--tls-cert", "--tls-key"):
        p.add_argument(flag)
    p.add_argument("--port", type=int, default=1100)
    args = p.parse_args()
    server = Server(auth=PasswdFile(args.passwd_file), storage=MaildirStorage(args.maildir_root),
                    tls_cert=args.tls_cert, tls_key=args.tls_key)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: POP3(server), "127.0.0.1", args.port)
    print(listener.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    listener.close()
    server.kill_sessions()  # goodbye to the live sessions, no updates
    for _ in range(50):
        if not server.connections():
            break
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
