"""The Prometheus endpoint: counters fed by log records, scraped over HTTP with urllib."""

from __future__ import annotations

import logging
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import HOST, Proc, Raw, make_env, module_argv
from test_ops_logfmt import FAILED, GONE, LOGIN, LOGOUT

pytest.importorskip("prometheus_client", reason="the 'metrics' extra is not installed")

from pop3proto.ops import logfmt, metrics


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(pop3proto_\S+) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture
def endpoint() -> Iterator[tuple[logging.Logger, int, list[int]]]:
    live = [0]
    counters = metrics.Metrics(connections=lambda: live[0])
    httpd, port = metrics.serve_metrics(HOST, 0, counters.registry)
    log = logging.getLogger("pop3proto.test-metrics")
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:] = [metrics.MetricsHandler(counters)]
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        yield log, port, live
    finally:
        log.handlers[:], log.propagate, log.level = saved
        httpd.shutdown()
        httpd.server_close()


def test_counters_follow_the_event_records(
    endpoint: tuple[logging.Logger, int, list[int]],
) -> None:
    log, port, live = endpoint
    live[0] = 3
    events: list[dict[str, Any]]
    events = [LOGIN, FAILED, {**FAILED, "method": "PLAIN", "delay": 0}, GONE, LOGOUT,
              {**LOGOUT, "tls": True, "retr": [2, 1000], "top": [1, 50], "del": [2, 5]},
              {"event": "refused", "rip": "203.0.113.9", "rport": 1, "session": "1-9"},
              {"event": "tls_failed", "rip": "203.0.113.9", "rport": 2, "session": "1-10"},
              {"event": "storage_error", "user": "alice", "reason": "EIO", "session": "1-11"}]
    for fields in events:
        log.info("%s", logfmt.event_message(fields), extra={"pop3": fields})
    log.info("a line with no fields")
    got = scrape(port)
    assert got["pop3proto_connections"] == 3
    assert got['pop3proto_logins_total{method="PLAIN",result="ok"}'] == 1
    assert got['pop3proto_logins_total{method="USER",result="failed"}'] == 1
    assert got['pop3proto_logins_total{method="PLAIN",result="failed"}'] == 1
    assert got["pop3proto_login_delays_total"] == 1
    assert got["pop3proto_login_delay_seconds_total"] == 2.0
    assert got['pop3proto_sessions_total{end="disconnect"}'] == 1
    assert got['pop3proto_sessions_total{end="logout"}'] == 2
    assert got['pop3proto_messages_total{op="retr"}'] == 3
    assert got['pop3proto_message_octets_total{op="retr"}'] == 1218
    assert got['pop3proto_messages_total{op="top"}'] == 1
    assert got['pop3proto_message_octets_total{op="top"}'] == 50
    assert got['pop3proto_messages_total{op="dele"}'] == 2
    assert got['pop3proto_traffic_octets_total{direction="in"}'] == 104
    assert got["pop3proto_tls_sessions_total"] == 1
    assert got["pop3proto_refused_connections_total"] == 1
    assert got["pop3proto_tls_handshake_failures_total"] == 1
    assert got["pop3proto_storage_errors_total"] == 1


def test_the_command_serves_live_connections(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    proc = Proc(module_argv("blocking", "--port", "0", "--metrics-port", "0",
                            "--maildir-root", str(env.root), "--passwd-file", str(env.passwd)))
    try:
        mport = int(proc.expect(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        port = int(proc.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        with Raw(port) as c:
            assert c.login("alice", "alice-Secret-1").startswith(b"+OK")
            assert scrape(mport)["pop3proto_connections"] == 1
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()


def test_workers_share_one_endpoint(tmp_path: Path) -> None:
    """With --workers the counters are summed across processes (multiprocess mode)."""
    env = make_env(tmp_path)
    proc = Proc(module_argv("blocking", "--port", "0", "--metrics-port", "0", "--workers", "2",
                            "--maildir-root", str(env.root), "--passwd-file", str(env.passwd)))
    try:
        mport = int(proc.expect(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1))
        proc.expect(r"listening on 127\.0\.0\.1:(\d+)")
        got = scrape(mport)
        assert got["pop3proto_refused_connections_total"] == 0
        assert "pop3proto_connections" not in got
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
