"""``mount``: a repository's snapshots as a read-only filesystem.  ``tree``
is the filesystem itself (inodes, attributes, listings, reads) over a
Repository, with no FUSE in it; ``fuse`` serves it with pyfuse3, an
optional dependency imported only there."""
