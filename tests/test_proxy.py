"""The PROXY header parser (pure): addresses with scope ids are refused.

The parser's round trips and garbage cases live beside the HAProxy tests in
``test_scaleout.py``; here are the address rules a log line and the
loopback checks rely on.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3proto.proxy import V2_SIGNATURE, parse_proxy_header


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP6 fe80::1%eth0 ::1 4000 110\r\n",
        b"PROXY TCP6 2001:db8::1 ::1%1 4000 110\r\n",
        b"PROXY TCP6 ::1%\x1b[31m ::1 4000 110\r\n",  # ESC: would colour the log
        b"PROXY TCP6 ::1%\r ::1 4000 110\r\n",  # a lone CR inside the line
        b"PROXY TCP6 ::1%\n ::1 4000 110\r\n",  # a lone LF inside the line
        b"PROXY TCP6 ::1% ::1 4000 110\r\n",
    ],
)
def test_v1_refuses_scope_ids(header: bytes) -> None:
    # "::1%..." would also make is_loopback true for a forged source.
    with pytest.raises(ValueError):  # noqa: PT011 - the parser has one error type
        parse_proxy_header(header)


def test_v1_plain_ipv6_still_parses() -> None:
    parsed = parse_proxy_header(b"PROXY TCP6 fe80::1 ::1 4000 110\r\n")
    assert parsed is not None
    assert parsed[0].source == ("fe80::1", 4000)
    assert parsed[0].destination == ("::1", 110)


def _v2_ipv6(src: bytes, dst: bytes) -> bytes:
    body = src + dst + struct.pack("!HH", 4000, 110)
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))
def test_v2_addresses_never_carry_a_scope(src: bytes, dst: bytes) -> None:
    # v2 sends 16 octets per address, so there is no scope id to refuse:
    # what comes out is always a bare address in canonical form.
    parsed = parse_proxy_header(_v2_ipv6(src, dst))
    assert parsed is not None
    header, consumed = parsed
    assert consumed == 16 + 36
    assert header.source is not None
    assert header.destination is not None
    for (text, _), raw in ((header.source, src), (header.destination, dst)):
        assert "%" not in text
        assert ipaddress.IPv6Address(text).packed == raw


@given(st.binary(max_size=120))
def test_v1_source_is_always_a_bare_address(tail: bytes) -> None:
    # Whatever follows "PROXY TCP6 ", a parsed source is a bare IPv6 address.
    try:
        parsed = parse_proxy_header(b"PROXY TCP6 " + tail)
    except ValueError:
        return
    if parsed is None or parsed[0].source is None:
        return
    text = parsed[0].source[0]
    assert str(ipaddress.IPv6Address(text)) == text
    assert text.isascii()
    assert text.isprintable()
