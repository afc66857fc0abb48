"""Clone or copy: put a range of bytes that already exist somewhere on this
host (a file restored earlier, the thin base, the sparse file) into the file
being restored, with FICLONERANGE where the kernel allows it, and with
copies, counted with their reason, where it does not."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from cloneaware import native
from cloneaware.errors import ArchiveError
from cloneaware.fsinfo import errno_reason


@dataclass
class Counts:
    written_bytes: int = 0
    reflinked_bytes: int = 0
    copied_bytes: int = 0
    copy_reasons: dict[str, int] = field(default_factory=dict)
    #: stored bytes cloned from the copy already in DEST and read back equal
    reused_bytes: int = 0
    #: stored bytes cloned from files beside the restore (restore/beside.py)
    #: and read back equal
    beside_bytes: int = 0

    def filled(self) -> int:
        return self.written_bytes + self.reflinked_bytes + self.copied_bytes \
            + self.reused_bytes + self.beside_bytes


class Cloner:
    """Writes into one destination file at a time (``fd``, named ``where``
    in errors)."""

    def __init__(self, counts: Counts):
        self.c = counts
        self.block = 4096  # DEST's block size, set once DEST is open
        #: source channel ("archive", "base", "sparse") -> why it cannot clone
        self.no_reflink: dict[str, str] = {}
        #: the channels a clone was seen to work from
        self.reflinks: set[str] = set()

    def pwrite(self, fd: int, data, off: int, where: str) -> None:
        mv = memoryview(data)
        while mv:
            try:
                n = os.pwrite(fd, mv, off)
            except OSError as e:
                raise OSError(e.errno, e.strerror, where) from None
            mv = mv[n:]
            off += n

    def write(self, fd: int, data, off: int, where: str) -> None:
        """Write stored bytes."""
        self.pwrite(fd, data, off, where)
        self.c.written_bytes += len(data)

    def copy(self, fd: int, sfd: int, soff: int, length: int, off: int, reason: str,
             where: str) -> None:
        """Copy bytes the kernel would not clone (copy_file_range, else read/write)."""
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(sfd, fd, length - done, soff + done, off + done)
            except OSError as ex:
                if ex.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    n = 0
                else:
                    raise OSError(ex.errno, ex.strerror, where) from None
            if n == 0:
                b = os.pread(sfd, min(length - done, 4 << 20), soff + done)
                if not b:
                    raise ArchiveError(f"reference reads past the end of its source for "
                                       f"{where}")
                self.pwrite(fd, b, off + done, where)
                n = len(b)
            done += n
        self.copied(length, reason)

    def copied(self, length: int, reason: str) -> None:
        """Count ``length`` bytes copied because ``reason``."""
        self.c.copied_bytes += length
        self.c.copy_reasons[reason] = self.c.copy_reasons.get(reason, 0) + length

    def refused(self, err: int, channel: str) -> str:
        """The kernel would not clone from ``channel``'s source (errno
        ``err``): why, and no more tries from it where the refusal is the
        filesystem's, not the range's."""
        reason = errno_reason(err)
        if err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV):
            self.no_reflink[channel] = reason  # stop trying for this source
        return reason

    def clone_or_copy(self, fd: int, sfd: int, soff: int, length: int, off: int,
                      src_size: int, dst_size: int, where: str, channel: str) -> None:
        """Clone [soff, soff+length) of sfd to off in fd; copy what cannot be
        cloned: unaligned heads and tails, and everything when the source
        cannot be cloned from (``channel`` names the source, so that a base on
        another filesystem does not stop clones from the archive's own files)."""
        bs = self.block
        why = self.no_reflink.get(channel)
        if why is not None:
            self.copy(fd, sfd, soff, length, off, why, where)
            return
        if soff % bs != off % bs:
            self.copy(fd, sfd, soff, length, off, "offsets not block-aligned alike", where)
            return
        head = min((-off) % bs, length)
        if head:
            self.copy(fd, sfd, soff, head, off, "unaligned head", where)
        a, sa, rem = off + head, soff + head, length - head
        at_eof = sa + rem == src_size and a + rem == dst_size
        tail = 0 if at_eof else rem % bs
        n = rem - tail
        if n > 0:
            try:
                native.ficlonerange(fd, sfd, sa, n, a, where)
                self.c.reflinked_bytes += n
                self.reflinks.add(channel)
            except OSError as ex:
                if ex.errno not in native.NOT_SUPPORTED:
                    raise OSError(ex.errno, ex.strerror, where) from None
                self.copy(fd, sfd, sa, n, a, self.refused(ex.errno, channel), where)
        if tail:
            self.copy(fd, sfd, sa + n, tail, a + n, "unaligned tail", where)
