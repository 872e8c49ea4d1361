"""Robustness suite: attacks and faults against every transport, with measured figures.

Each module covers one attack class; figures (memory growth, latencies,
delays, crash outcomes) are printed (``pytest -s``) and recorded with
``record_property`` so they show in a JUnit XML report.
"""

from __future__ import annotations
