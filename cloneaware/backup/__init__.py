"""Backup: walk -> map -> index -> write into a sink.

``backup(paths, output)`` is the Python API for an archive file (or '-');
``Backup(paths, sink)`` takes any sink of backup/sinks.py.
"""
from __future__ import annotations

from cloneaware.backup.run import Backup, Summary
from cloneaware.backup.sinks import ArchiveSink, SparseSink, file_output

__all__ = ["Backup", "Summary", "ArchiveSink", "SparseSink", "backup"]


def backup(paths: list, output: str, force: bool = False, **kw) -> Summary:
    """Back up ``paths`` into the archive file ``output`` ('-': standard output)."""
    sink = ArchiveSink(file_output(output, force),
                       "standard output" if output == "-" else output)
    return Backup(paths, sink, **kw).run()
