"""pop3proto's whole server policy in a trio nursery (no pop3proto transport).

    python examples/embed_trio.py --port 0 --maildir-root DIR --passwd-file FILE \
        [--tls-cert CERT --tls-key KEY]
"""

from __future__ import annotations

import argparse
import math
import signal
from functools import partial

import trio

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile
from pop3proto.server import Server


async def session(server: Server, stream: trio.SocketStream) -> None:
    """Perform one connection's driver actions; every wait ends at driver.deadline."""
    peer = stream.socket.getpeername()[:2]
    driver = SessionDriver(server, peer, now=trio.current_time())
    token = trio.lowlevel.current_trio_token()
    killed = trio.Event()
    server.set_killer(driver, partial(token.run_sync_soon, killed.set))
    conn: trio.abc.Stream = stream
    while not driver.closed:
        if killed.is_set():
            driver.shutdown()
        action = driver.next_action(trio.current_time())
        with trio.move_on_at(driver.deadline or math.inf):
            try:
                if action is RECEIVE:
                    async with trio.open_nursery() as waits:  # the data, or a kill
                        async def read(source: trio.abc.Stream = conn) -> None:
                            driver.receive_data(bytes(await source.receive_some(65536)))
                            waits.cancel_scope.cancel()

                        async def kill() -> None:
                            await killed.wait()
                            waits.cancel_scope.cancel()

                        waits.start_soon(read)
                        waits.start_soon(kill)
                elif isinstance(action, Write):
                    await conn.send_all(action.data)
                elif isinstance(action, Call):
                    with trio.CancelScope(shield=True):  # a lock taken is never lost
                        try:
                            if action.inline:
                                result = action.fn(*action.args)
                            else:
                                result = await trio.to_thread.run_sync(action.fn, *action.args)
                            driver.call_done(result)
                        except Exception as exc:
                            driver.call_failed(exc)
                elif action is START_TLS:
                    conn = trio.SSLStream(stream, driver.ssl_context, server_side=True)
                    await conn.do_handshake()
                    driver.tls_started()
                else:
                    assert action is CLOSE
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                driver.connection_lost(exc)
    await trio.aclose_forcefully(conn)


async def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--maildir-root", "--passwd-file", "--tls-cert", "--tls-key"):
        p.add_argument(flag)
    p.add_argument("--port", type=int, default=1100)
    args = p.parse_args()
    server = Server(auth=PasswdFile(args.passwd_file), storage=MaildirStorage(args.maildir_root),
                    tls_cert=args.tls_cert, tls_key=args.tls_key)
    listeners = await trio.open_tcp_listeners(args.port, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, partial(session, server), listeners)
            async for _ in signals:
                server.kill_sessions()  # goodbye to the live sessions, no updates
                with trio.move_on_after(5):
                    while server.connections():
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
