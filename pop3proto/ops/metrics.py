"""Prometheus metrics counted from the session log records (one source for logs and metrics).

``MetricsHandler`` is a ``logging.Handler``: it reads the ``pop3`` fields of
each record (see ``logfmt.EVENTS``) and counts logins, sessions, messages
and octets, TLS failures, failed-login delays and storage errors.
``serve_metrics`` exposes them over HTTP.  Needs ``prometheus_client`` (the
``metrics`` extra).

With several worker processes, the counters use prometheus_client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names a directory where each
process keeps its counters, and the endpoint (in the parent) sums them.
The live-connections gauge then is not served (it reads one process's
``Server.connections()``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MISSING_EXTRA", "Metrics", "MetricsHandler", "available", "serve_metrics"]

MISSING_EXTRA = ("--metrics-port needs prometheus_client: pip install 'pop3proto[metrics]'")


def available() -> bool:
    """Whether prometheus_client is installed (not imported: multiprocess mode is chosen then)."""
    return importlib.util.find_spec("prometheus_client") is not None


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
    return 0.0, 0.0


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return 0.0
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


class Metrics:
    """The counters, in *registry*; *connections* (if given) reads the live-connection count."""

    def __init__(self, registry: Any = None,
                 connections: Callable[[], int] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if connections is not None:
            gauge = Gauge("pop3proto_connections", "Live POP3 connections.", registry=r)
            gauge.set_function(lambda: float(connections()))
        self.sessions = Counter("pop3proto_sessions", "Sessions ended, by how: logout (after a "
                                "login) or disconnect (before one).", ["end"], registry=r)
        self.refused = Counter("pop3proto_refused_connections", "Connections refused (a "
                               "connection limit, or shutting down).", registry=r)
        self.logins = Counter("pop3proto_logins", "Login attempts by result and method.",
                              ["result", "method"], registry=r)
        self.messages = Counter("pop3proto_messages", "Messages sent (retr, top) or deleted.",
                                ["op"], registry=r)
        self.octets = Counter("pop3proto_message_octets", "Octets of messages sent (retr, top), "
                              "as sent on the wire.", ["op"], registry=r)
        self.traffic = Counter("pop3proto_traffic_octets", "Octets read from and written to "
                               "clients in ended sessions.", ["direction"], registry=r)
        self.tls_sessions = Counter("pop3proto_tls_sessions", "Sessions that ended secured by "
                                    "TLS.", registry=r)
        self.tls_failures = Counter("pop3proto_tls_handshake_failures", "TLS handshakes that "
                                    "failed.", registry=r)
        self.delays = Counter("pop3proto_login_delays", "Failed-login delays served.",
                              registry=r)
        self.delay_seconds = Counter("pop3proto_login_delay_seconds", "Seconds of failed-login "
                                     "delay served.", registry=r)
        self.storage_errors = Counter("pop3proto_storage_errors", "Storage operations that "
                                      "failed.", registry=r)

    def count(self, fields: Mapping[str, Any]) -> None:
        """Count one event record's fields."""
        event = fields.get("event")
        method = str(fields.get("method") or "unknown")
        if event == "login":
            self.logins.labels("ok", method).inc()
        elif event == "login_failed":
            self.logins.labels("failed", method).inc()
            delay = _number(fields.get("delay"))
            if delay:
                self.delays.inc()
                self.delay_seconds.inc(delay)
        elif event in ("logout", "disconnect"):
            self.sessions.labels(event).inc()
            if fields.get("tls"):
                self.tls_sessions.inc()
            for op in ("retr", "top"):
                count, octets = _pair(fields.get(op))
                self.messages.labels(op).inc(count)
                self.octets.labels(op).inc(octets)
            deleted, _total = _pair(fields.get("del"))
            self.messages.labels("dele").inc(deleted)
            self.traffic.labels("in").inc(_number(fields.get("in")))
            self.traffic.labels("out").inc(_number(fields.get("out")))
        elif event == "refused":
            self.refused.inc()
        elif event == "tls_failed":
            self.tls_failures.inc()
        elif event == "storage_error":
            self.storage_errors.inc()


class MetricsHandler(logging.Handler):
    """A logging handler that counts the ``pop3`` fields of each record into *metrics*."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.DEBUG)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "pop3", None)
        if not isinstance(fields, Mapping):
            return
        try:
            self.metrics.count(fields)
        except Exception:
            self.handleError(record)


def serve_metrics(host: str, port: int, registry: Any) -> tuple[Any, int]:
    """Serve *registry* (or, in multiprocess mode, every process's counters) over HTTP.

    Returns the HTTP server (``shutdown()`` stops it) and the bound port.

    Raises:
        OSError: the port cannot be bound.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    httpd, _thread = start_http_server(port, host, registry=registry)
    return httpd, int(httpd.server_address[1])
