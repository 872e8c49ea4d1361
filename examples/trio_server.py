"""A POP3 server: ``pop3proto.Connection`` driven by trio, one task per connection.

Run ``python examples/trio_server.py --port 1100`` and log in as
alice / wonderland.  The first line printed is the bound port.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio
from mailapp import MailApp

from pop3proto import (
    NEED_DATA,
    PAUSED,
    Config,
    Connection,
    ConnectionClosed,
    Disconnect,
    Greeting,
    RemoteProtocolError,
)

CONFIG = Config(sasl_mechanisms=())  # USER/PASS only: no AUTH events to answer
IDLE_SECONDS = 600.0
APP = MailApp()


async def handle(stream: trio.SocketStream) -> None:
    """Serve one client; every await has a deadline, every call is followed by a flush."""
    conn = Connection(CONFIG)
    session: dict[str, bool] = {}

    async def flush() -> None:
        data = conn.data_to_send()
        if data:
            with trio.fail_after(IDLE_SECONDS):  # a client that never reads is dropped
                await stream.send_all(data)

    try:
        conn.send(Greeting(text="pop3proto trio example ready."))
        await flush()
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError:  # the final -ERR is queued
                await flush()
                return
            await flush()  # next_event() itself answers STAT, LIST, CAPA, -ERR...
            if event is NEED_DATA:
                data = None
                with trio.move_on_after(IDLE_SECONDS):
                    data = await stream.receive_some(65536)
                if data is None:  # autologout: close without UPDATE
                    conn.send(Disconnect(text="Idle timeout."))
                    await flush()
                    return
                conn.receive_data(data)  # b"" at end of input
            elif event is PAUSED:  # output high-water mark; flushed above
                continue
            else:
                APP.answer(conn, event, session)
                await flush()
                if isinstance(event, ConnectionClosed):
                    return
    except (trio.BrokenResourceError, trio.TooSlowError):
        conn.send_failed()
    finally:
        APP.closed(session)  # a dropped connection applies no deletions
        await stream.aclose()


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
        print(listeners[0].socket.getsockname()[1], flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1100, help="0 lets the OS pick")
    trio.run(main, parser.parse_args().port)
