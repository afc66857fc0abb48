"""cloneaware: clone-aware backup and restore for reflink filesystems."""
from cloneaware._version import __version__

__all__ = ["__version__"]
