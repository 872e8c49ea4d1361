"""Shared fixtures.  Core fixtures first; other suites may append theirs below."""

from __future__ import annotations

import pytest
from helpers import greeted, logged_in

from pop3proto import Connection


@pytest.fixture
def conn() -> Connection:
    """A Connection with the default Config, greeted, in AUTHORIZATION (output drained)."""
    return greeted()


@pytest.fixture
def txn() -> Connection:
    """A Connection in TRANSACTION on RFC 1939's two-message maildrop (output drained)."""
    return logged_in()
