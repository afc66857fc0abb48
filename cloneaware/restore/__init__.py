"""Restore an archive into DEST, re-creating its sharing with reflinks.

``restore(archive, dest)`` is the Python API; ``Restore`` (restore/run.py)
opens the archive and makes the checks that come first; the receiver
(restore/receiver.py) decides, an output (restore/directory.py, or
restore/dryrun.py for a dry run) makes.
"""
from __future__ import annotations

from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.run import Restore, restore

__all__ = ["Restore", "RestoreSummary", "restore"]
