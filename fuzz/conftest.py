"""Hypothesis profiles for the fuzz suite, picked with ``HYPOTHESIS_PROFILE`` (default "ci").

* ``ci``: fast enough for every push (the whole directory in well under
  90 seconds on one core).
* ``deep``: a long local or nightly run (about 6 minutes on one core: the
  session machine takes ~0.16 s per 100-step example).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "ci",
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=False,
    suppress_health_check=_QUIET_CHECKS,
)
settings.register_profile(
    "deep",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    derandomize=False,
    suppress_health_check=_QUIET_CHECKS,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
