"""Restore an archive into DEST, re-creating its sharing with reflinks.

``restore(archive, dest)`` is the Python API; ``Restore`` the receiver
(restore/receive.py) with one method per event type.
"""
from __future__ import annotations

from cloneaware.restore.receive import Restore, RestoreSummary, restore

__all__ = ["Restore", "RestoreSummary", "restore"]
