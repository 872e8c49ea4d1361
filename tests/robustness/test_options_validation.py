"""Issue 15, finding 14: options the core would refuse are refused at configure() time.

``max_line_length=9000`` used to be accepted and then make every new
connection fail (selectors' loop died and took the logged-in sessions with
it).  Now ``Server(...)`` and ``configure(...)`` raise TypeError, the
running server keeps its old options, and nothing else changes.
"""

from __future__ import annotations

import pytest
from clients import Raw

from pop3proto.server import Server

from .conftest import Mail, logged_in
from .round2 import KINDS, serving


def test_server_refuses_a_line_length_the_core_refuses() -> None:
    with pytest.raises(TypeError):
        Server(max_line_length=9000)


@pytest.mark.parametrize("kind", KINDS)
def test_configure_refuses_it_and_the_server_keeps_serving(kind: str, mail: Mail) -> None:
    with serving(kind, **mail.options(auth_failure_delay=0)) as server:
        port = server.cget("port")
        with logged_in(port, "alice", mail.users["alice"]) as alice:
            with pytest.raises(TypeError):
                server.configure(max_line_length=9000)
            assert server.cget("max_line_length") == 255
            # The logged-in session goes on, and new connections are served.
            assert alice.cmd("NOOP").startswith(b"+OK")
            for _ in range(3):
                with Raw(port) as c:
                    assert c.greeting.startswith(b"+OK")
                    assert c.login("bob", mail.users["bob"]).startswith(b"+OK")
                    assert c.cmd("STAT").startswith(b"+OK 5 ")
                    assert c.cmd("QUIT").startswith(b"+OK")
            assert alice.cmd("STAT").startswith(b"+OK 5 ")
            assert alice.cmd("QUIT").startswith(b"+OK")
