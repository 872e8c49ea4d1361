"""SASL PLAIN and SCRAM-SHA-256 with the public mechanism helpers in ``pop3proto.sasl``.

The core frames AUTH (``+ `` challenges, base64, ``*`` to cancel) and hands
the decoded bytes over as ``AuthStart``/``AuthResponse``; a mechanism object
says what they mean.  Served with asyncio streams; run
``python examples/sasl_plain_scram.py --port 1100`` and try
``curl --login-options AUTH=PLAIN pop3://alice:wonderland@127.0.0.1:1100/``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal

from mailapp import PASSWORD, USER, MailApp

from pop3proto import (
    NEED_DATA,
    PAUSED,
    AuthAborted,
    AuthResponse,
    AuthStart,
    Config,
    Connection,
    ConnectionClosed,
    Err,
    Greeting,
    RemoteProtocolError,
    Response,
    SaslChallenge,
    sasl,
)
from pop3proto.auth import ScramSecret

# cleartext_auth=True is for this loopback demo; without TLS a real server refuses PLAIN.
CONFIG = Config(sasl_mechanisms=("PLAIN", "SCRAM-SHA-256"), cleartext_auth=True)
SCRAM = {USER: ScramSecret.from_password(PASSWORD, salt=secrets.token_bytes(16))}
APP = MailApp()


class SaslLogin:
    """One connection's AUTH exchange."""

    def __init__(self, session: dict[str, bool]) -> None:
        self.session = session
        self.mech: sasl.Mechanism | None = None
        self.scram_user: str | None = None

    def start(self, event: AuthStart) -> Response:
        self.scram_user = None
        self.mech = sasl.mechanism_for(event.mechanism, nonce=secrets.token_urlsafe(18),
                                       challenge=b"")
        return self.step(event.initial_response)

    def step(self, data: bytes | None) -> Response:
        if self.scram_user is not None:  # the client acknowledged the server-final message
            user, self.scram_user = self.scram_user, None
            return APP.login(user, self.session)
        result = self.mech.step(data) if self.mech else sasl.Failure("No exchange.")
        if isinstance(result, sasl.Challenge):
            return SaslChallenge(data=result.data)
        if isinstance(result, sasl.NeedSecret) and isinstance(self.mech, sasl.ScramSha256):
            # An unknown user gets a decoy, so the exchange looks the same.
            secret = SCRAM.get(result.username) or ScramSecret.from_password(
                secrets.token_hex(8), salt=secrets.token_bytes(16))
            return SaslChallenge(data=self.mech.server_first(secret).data)
        if isinstance(result, sasl.ScramDone):
            self.scram_user = result.username
            return SaslChallenge(data=result.server_final)
        if (isinstance(result, sasl.PasswordCredentials)
                and result.authzid in ("", result.authcid)
                and APP.password_ok(result.authcid, result.password)):
            return APP.login(result.authcid, self.session)
        reason = result.reason if isinstance(result, sasl.Failure) else "Authentication failed."
        return Err(text=reason, code="AUTH")


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn, session = Connection(CONFIG), dict[str, bool]()
    login = SaslLogin(session)

    async def flush() -> None:  # every wait is bounded: 600 s, the RFC 1939 autologout
        writer.write(conn.data_to_send())
        await asyncio.wait_for(writer.drain(), 600)

    try:
        conn.send(Greeting(text="pop3proto SASL example ready."))
        await flush()
        while not isinstance(event := conn.next_event(), ConnectionClosed):
            await flush()  # next_event() itself produces output: flush before reading
            if event is NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), 600))
            elif isinstance(event, AuthStart):
                conn.send(login.start(event))
            elif isinstance(event, AuthResponse):
                conn.send(login.step(event.data))
            elif isinstance(event, AuthAborted):  # the client sent "*"
                conn.send(Err(text="Authentication aborted.", code="AUTH"))
            elif event is not PAUSED:  # PAUSED: the output high-water mark, flushed above
                APP.answer(conn, event, session)  # USER/PASS, RETR, TOP, QUIT
            await flush()
        await flush()
    except RemoteProtocolError:  # the final -ERR is queued
        await flush()
    except (OSError, TimeoutError):  # reset, or silent/stalled for 600 s: no UPDATE
        conn.send_failed()
    finally:
        APP.closed(session)
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1100, help="0 lets the OS pick")
    asyncio.run(main(parser.parse_args().port))
