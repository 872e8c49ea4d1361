"""Running pop3proto in production: configuration, logs, metrics, privileges and systemd.

These modules serve the command line (``python -m pop3proto.transports.NAME``)
and embedding code alike; none of them is needed by the protocol core.

* ``config``: the flags and the TOML config file, both generated from ``OPTIONS``.
* ``logfmt``: the Dovecot-shaped event lines, the JSON-lines formatter, syslog
  and the systemd journal.
* ``metrics``: a Prometheus endpoint fed by the same log records.
* ``privileges``: dropping to a mail user after binding; the file-descriptor limit.
* ``systemd``: socket activation and readiness notification, without a dependency.
"""

from __future__ import annotations
