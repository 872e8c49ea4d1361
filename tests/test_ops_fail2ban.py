"""contrib/fail2ban: the real ``fail2ban-regex`` finds every failed login, and only those.

``fail2ban_hosts(log)`` runs the filter over any log file, so an end-to-end
test can hand it the log of a real brute-force run.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_ops_logfmt import FAILED, GONE, LOGIN, LOGOUT

from pop3proto.ops import logfmt

FILTER = Path(__file__).resolve().parent.parent / "contrib/fail2ban/filter.d/pop3proto.conf"
FORGED = {**FAILED, "rip": "2001:db8::7", "user": 'x>, rip=6.6.6.6, "rip": "6.6.6.6"',
          "reason": "unknown user", "method": "PLAIN", "tls": True}


def fail2ban_hosts(log: Path) -> tuple[int, set[str]]:
    """(lines matched, addresses found) by the pop3proto filter over *log*."""
    program = shutil.which("fail2ban-regex")
    if program is None:
        pytest.skip("fail2ban-regex is not installed (apt-get install fail2ban)")
    summary = subprocess.run([program, str(log), str(FILTER)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    m = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", summary)
    assert m, summary
    ips = subprocess.run([program, "-o", "ip", str(log), str(FILTER)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return int(m.group(1)), set(ips.split())


def _log(fmt: str, events: list[dict[str, object]]) -> str:
    out = io.StringIO()
    handler, _ = logfmt.make_handler(fmt, "stderr", stream=out)
    log = logging.getLogger("pop3proto")
    saved, propagate, level = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)
    try:
        for fields in events:
            log.info("%s", logfmt.event_message(fields), extra={"pop3": fields})
    finally:
        log.handlers[:], log.propagate = saved, propagate
        log.setLevel(level)
    return out.getvalue()


def _syslog(events: list[dict[str, object]]) -> str:
    stamp = time.strftime("%b %d %H:%M:%S")
    return "".join(f"{stamp} mail pop3proto[4242]: {logfmt.event_message(f)}\n" for f in events)


EVENTS: list[dict[str, object]] = [LOGIN, FAILED, FORGED, GONE, LOGOUT]


@pytest.mark.parametrize("form", ["text", "json", "syslog"])
def test_filter_finds_the_failed_logins_and_their_real_addresses(
    form: str, tmp_path: Path
) -> None:
    log = tmp_path / "pop3proto.log"
    log.write_text(_syslog(EVENTS) if form == "syslog" else _log(form, EVENTS))
    matched, hosts = fail2ban_hosts(log)
    assert matched == 2
    assert hosts == {"203.0.113.5", "2001:db8::7"}
