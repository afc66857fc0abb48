"""``cloneaware reshare``: give a tree copied by a tool that lost its sharing
(rsync, tar, restic, Borg, ``btrfs receive`` past its limits) the sharing
back, with FIDEDUPERANGE.

The input says which places share: the REF records of an archive or a
sharing map ("these bytes of B are those of A", docs/FORMAT.md), or, in a
repository snapshot's manifest, the BLOB ranges that name blob bytes seen
earlier in it (``archive/blobs.py`` Coverage, the rule a repository
restore clones by).  For each such place, the owner's range in DEST is deduped into
the place's range in DEST.  The kernel compares the bytes and shares them
only if they are identical (docs/KERNEL.md D1), so a file edited since the
copy keeps its edit and is counted as differing.

Nothing in DEST is written.  Every file is opened read-only beneath DEST,
one component at a time without following symlinks, and must be a regular
file of the size the input gives; any other is skipped and listed, and
the run goes on.  A read-only descriptor is all dedupe needs wherever it is
allowed at all (root, the owner, or a user who may write the file: D6);
where it is refused, that file is listed.  Times are compared when a file
is closed with those it had when it was opened, and set back if they moved
(no kernel moved them, D8; a ctime cannot be set back).

Batching and memory: each reference is cut into pieces on a grid of
``CHUNK`` bytes of the source's offsets.  Pieces are collected in a window
of at most ``WINDOW`` pieces and ``FILES`` open files, then deduped sorted
by source: pieces that name the same source range go in one call, with up
to ``MAX_DESTS`` destinations (the kernel takes 127, D7).  A piece that
differs is split in halves down to ``MIN_SPLIT`` bytes, so that an edited
byte costs at most that much sharing.  A range whose blocks the destination
already shares with the source (FIEMAP: the same physical addresses) is
counted as already shared and not asked again, so a second run is quick.
The kernel reads the pages it compares one at a time, so the pages of the
pieces to come are asked for ahead (POSIX_FADV_WILLNEED, up to
``READAHEAD`` bytes); that makes a cold copy 3 to 4 times faster.
Memory is the window, the reader's list of entries, and the lists of files
reported; not the references.
"""

from __future__ import annotations

from cloneaware.reshare.files import ReshareSummary
from cloneaware.reshare.run import Reshare

__all__ = ["Reshare", "ReshareSummary"]
