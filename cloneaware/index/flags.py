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

#: Flags whose physical address does not locate the file's bytes.
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
