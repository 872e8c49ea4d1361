"""A POP3 server: ``pop3proto.Connection`` over blocking sockets, a thread per connection.

Run ``python examples/blocking_server.py --port 1100`` and log in as
alice / wonderland.  The first line printed is the bound port.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

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


def handle(sock: socket.socket) -> None:
    """Serve one client; ``settimeout`` bounds every read and write."""
    conn = Connection(CONFIG)
    session: dict[str, bool] = {}
    sock.settimeout(IDLE_SECONDS)

    def flush() -> None:
        sock.sendall(conn.data_to_send())

    try:
        conn.send(Greeting(text="pop3proto blocking example ready."))
        flush()
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError:  # the final -ERR is queued
                flush()
                return
            flush()  # next_event() itself answers STAT, LIST, CAPA, -ERR...
            if event is NEED_DATA:
                try:
                    data = sock.recv(65536)
                except TimeoutError:  # autologout: close without UPDATE
                    conn.send(Disconnect(text="Idle timeout."))
                    flush()
                    return
                conn.receive_data(data)  # b"" at end of input
            elif event is PAUSED:  # output high-water mark; flushed above
                continue
            else:
                APP.answer(conn, event, session)
                flush()
                if isinstance(event, ConnectionClosed):
                    return
    except OSError:  # reset, or a client that stopped reading
        conn.send_failed()
    finally:
        APP.closed(session)  # a dropped connection applies no deletions
        sock.close()


def main(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    print(listener.getsockname()[1], flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with listener:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=handle, args=(client,), daemon=True).start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1100, help="0 lets the OS pick")
    try:
        main(parser.parse_args().port)
    except KeyboardInterrupt:
        pass
