"""FIEMAP extent flags (<linux/fiemap.h>) and the numpy view of an extent
map, defined once.  docs/KERNEL.md says what each flag means for sharing."""
from __future__ import annotations

import numpy as np

FE_LAST = 0x1
FE_UNKNOWN = 0x2
FE_DELALLOC = 0x4
FE_ENCODED = 0x8
FE_DATA_ENCRYPTED = 0x80
FE_NOT_ALIGNED = 0x100
FE_DATA_INLINE = 0x200
FE_DATA_TAIL = 0x400
FE_UNWRITTEN = 0x800
FE_MERGED = 0x1000
FE_SHARED = 0x2000

#: cloneaware's own flag, never set by the kernel (its flags stop at
#: 0x2000): an ENCODED range whose ``physical`` was replaced by an exact
#: address taken from Btrfs's file extent item (source/mapping.py
#: ``refine_encoded``): ``disk_bytenr * 32 + offset``, the place of its bytes
#: inside the uncompressed extent.  Such a range is swept like a plain one,
#: in an address space of its own (docs/KERNEL.md F23-F25).
CA_EXACT = 0x80000000

#: Flags whose physical address does not locate the file's bytes (unless
#: CA_EXACT says it was replaced by one that does).
OWN_FLAGS = (FE_UNKNOWN | FE_DELALLOC | FE_ENCODED | FE_DATA_ENCRYPTED
             | FE_NOT_ALIGNED | FE_DATA_INLINE | FE_DATA_TAIL)

#: Flags that keep an encoded range from being a candidate: its bytes are
#: not in a compressed extent on disk yet, or not as the file reads them.
NOT_CANDIDATE = (FE_UNKNOWN | FE_DELALLOC | FE_DATA_ENCRYPTED | FE_DATA_INLINE
                 | FE_DATA_TAIL)

#: One extent, as cloneaware.native.fiemap packs it (32 bytes).
EXTENT_DTYPE = np.dtype(
    [("logical", "<u8"), ("physical", "<u8"), ("length", "<u8"),
     ("flags", "<u4"), ("reserved", "<u4")]
)

#: One Btrfs file extent item, as cloneaware.native.btrfs_file_extents packs
#: it (64 bytes; struct btrfs_file_extent_item and its key offset).
FILE_EXTENT_DTYPE = np.dtype(
    [("logical", "<u8"), ("disk_bytenr", "<u8"), ("disk_num_bytes", "<u8"),
     ("offset", "<u8"), ("num_bytes", "<u8"), ("ram_bytes", "<u8"),
     ("generation", "<u8"), ("compression", "u1"), ("type", "u1"),
     ("encryption", "u1"), ("reserved0", "u1"), ("reserved", "<u4")]
)
#: btrfs_file_extent_item.type (<linux/btrfs_tree.h>)
BTRFS_FILE_EXTENT_INLINE, BTRFS_FILE_EXTENT_REG, BTRFS_FILE_EXTENT_PREALLOC = 0, 1, 2
#: btrfs_file_extent_item.compression (fs/btrfs/compression.h)
BTRFS_COMPRESS_NONE, BTRFS_COMPRESS_ZLIB, BTRFS_COMPRESS_LZO, BTRFS_COMPRESS_ZSTD = 0, 1, 2, 3
#: The most file data one compressed extent holds (BTRFS_MAX_UNCOMPRESSED).
BTRFS_MAX_UNCOMPRESSED = 128 << 10
#: An exact address is disk_bytenr << EXACT_SHIFT >> 12 plus the offset:
#: extents start on 4 KiB sectors or coarser and hold at most 128 KiB, so
#: the address ranges of two extents never meet.
EXACT_SHIFT = 5

#: a physical range (start, length) of a file's blocks: what the files cache
#: keeps of each file to find new sharing with it (repo/filescache.py)
PHYS = np.dtype([("start", "<u8"), ("length", "<u8")])
