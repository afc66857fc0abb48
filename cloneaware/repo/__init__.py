"""Repositories of snapshots (docs/REPOSITORY.md)."""
