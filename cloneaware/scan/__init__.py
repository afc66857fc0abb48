"""``cloneaware scan``: what trees occupy and how much of it is shared,
from the extent maps alone (scan/report.py), and ``scan --save-map``, the
sharing plan written as a sharing map (scan/sharemap.py)."""
from __future__ import annotations

from cloneaware.scan.report import ScanResult, scan

__all__ = ["ScanResult", "scan"]
