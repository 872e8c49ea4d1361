"""HAProxy's PROXY protocol (v1 text and v2 binary), parsed without I/O.

A load balancer that speaks it sends one header before the client's first
byte, naming the real client address.  The server accepts it only from
``trusted_proxies`` (Dovecot's ``haproxy_trusted_networks``); from anyone
else, or malformed, the connection is closed with nothing else read.

``parse_proxy_header(data)`` returns None while more bytes are needed,
``(header, consumed)`` once the header is complete, and raises
``ValueError`` for anything malformed.  A header is never longer than
``MAX_HEADER`` octets, so a transport reads at most that much.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["MAX_HEADER", "V2_SIGNATURE", "ProxyHeader", "parse_proxy_header"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107
#: The longest header accepted (v2 with TLVs is capped here, far above HAProxy's use).
MAX_HEADER = 16 + 1024


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy said: the client's address and port, or None (LOCAL/UNKNOWN)."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None
    version: int = 1


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ValueError("bad port in PROXY header")
    port = int(text)
    if port > 65535:
        raise ValueError("bad port in PROXY header")
    return port


def _v1_address(text: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """One v1 address: a bare IPv4 or IPv6 address, never with a scope id.

    ``ipaddress`` takes ``fe80::1%<anything>`` (CR, LF and ESC included) and
    such an address would reach the logs raw and compare equal to nothing a
    network rule names; a proxy has no reason to send one.
    """
    try:
        addr = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError("bad address in PROXY v1 header") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ValueError("scope id in PROXY v1 address")
    return addr


def _v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX or b"\n" in data:
            raise ValueError("PROXY v1 header too long or not CRLF-terminated")
        return None
    parts = data[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(source=None), end + 2
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ValueError("malformed PROXY v1 header")
    version = 4 if parts[1] == b"TCP4" else 6
    src = _v1_address(parts[2])
    dst = _v1_address(parts[3])
    if src.version != version or dst.version != version:
        raise ValueError("address family mismatch in PROXY v1 header")
    return (
        ProxyHeader(
            source=(str(src), _port(parts[4])), destination=(str(dst), _port(parts[5]))
        ),
        end + 2,
    )


def _v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2 or (ver_cmd & 0xF) > 1:
        raise ValueError("unsupported PROXY v2 version or command")
    total = 16 + length
    if total > MAX_HEADER:
        raise ValueError("PROXY v2 header too long")
    if len(data) < total:
        return None
    body = data[16:total]
    if ver_cmd & 0xF == 0:  # LOCAL: the proxy's own health check
        return ProxyHeader(source=None, version=2), total
    if fam == 0x11:  # TCP over IPv4
        if length < 12:
            raise ValueError("short PROXY v2 IPv4 address block")
        src4, dst4 = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return ProxyHeader((str(src4), sport), (str(dst4), dport), 2), total
    if fam == 0x21:  # TCP over IPv6 (16 octets each: v2 cannot carry a scope id)
        if length < 36:
            raise ValueError("short PROXY v2 IPv6 address block")
        src6, dst6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        return ProxyHeader((str(src6), sport), (str(dst6), dport), 2), total
    if fam == 0x00:  # UNSPEC
        return ProxyHeader(source=None, version=2), total
    raise ValueError("unsupported PROXY v2 address family")


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of *data* (see the module docstring)."""
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and len(data) < 12:
        return None
    if data.startswith(V2_SIGNATURE):
        return _v2(data)
    if b"PROXY "[: len(data)] == data[:6] and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        return _v1(data)
    raise ValueError("no PROXY header")
