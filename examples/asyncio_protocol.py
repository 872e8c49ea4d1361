"""A POP3 server: ``pop3proto.Connection`` inside an ``asyncio.Protocol``.

Run ``python examples/asyncio_protocol.py --port 1100`` and log in as
alice / wonderland (``curl pop3://alice:wonderland@127.0.0.1:1100/1``).
The first line printed is the bound port (``--port 0`` lets the OS pick).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

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

# No SASL mechanisms, no STLS, no APOP: this app answers USER/PASS only.
CONFIG = Config(sasl_mechanisms=())
IDLE_SECONDS = 600.0  # RFC 1939 autologout: at least ten minutes


class POP3Protocol(asyncio.Protocol):
    """One connection: bytes in, events answered, ``data_to_send()`` out after every call."""

    def __init__(self, app: MailApp) -> None:
        self.app = app
        self.session: dict[str, bool] = {}
        self.conn = Connection(CONFIG)
        self.paused = False  # asyncio's write buffer is full: stop answering until drained

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.send(Greeting(text="pop3proto asyncio example ready."))
        self.flush()
        self.timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.idle)

    def data_received(self, data: bytes) -> None:
        self.timer.cancel()  # restart the autologout timer
        self.timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self.idle)
        self.conn.receive_data(data)
        self.pump()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")  # b"" means end of input
        self.pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.app.closed(self.session)  # a dropped connection applies no deletions

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.transport.resume_reading()
        self.pump()

    def idle(self) -> None:
        self.conn.send(Disconnect(text="Idle timeout."))  # no UPDATE on autologout
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        self.transport.write(self.conn.data_to_send())

    def pump(self) -> None:
        """Take events until the Connection needs bytes (or asyncio asks us to wait)."""
        while not self.paused and not self.transport.is_closing():
            try:
                event = self.conn.next_event()
            except RemoteProtocolError:  # the final -ERR is queued: send it and close
                self.flush()
                self.transport.close()
                return
            self.flush()  # next_event() itself answers STAT, LIST, CAPA, -ERR...
            if event is NEED_DATA:
                return
            if event is PAUSED:  # output high-water mark reached; flushed, so go on
                continue
            self.app.answer(self.conn, event, self.session)
            self.flush()
            if isinstance(event, ConnectionClosed):
                self.transport.close()
                return


async def main(port: int) -> None:
    app = MailApp()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: POP3Protocol(app), "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1100, help="0 lets the OS pick")
    asyncio.run(main(parser.parse_args().port))
