"""mount/tree.py served read-only through FUSE with pyfuse3 (libfuse 3's
low-level API, asynchronous on trio): the filesystem's calls run on
threads (trio.to_thread), so a reader waiting for a blob does not hold up
the others.  pyfuse3 is optional (Debian: python3-pyfuse3): imported only
here, and only by ``mount``."""
from __future__ import annotations

import errno
import itertools
import os
import signal
from collections.abc import Callable

from cloneaware.errors import UsageError
from cloneaware.mount.tree import Attr, FileData, Tree

#: the kernel may keep names and attributes this long: nothing here changes
TIMEOUT = 3600.0
#: entries (with their attributes) made per thread call of readdir
BATCH = 512


def available() -> None:
    """Raise a one-line UsageError if mount cannot work here."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        raise UsageError(f"mount needs pyfuse3 ({e.name} cannot be imported): install "
                         "python3-pyfuse3 (Debian), or pip install pyfuse3") from None
    if not os.path.exists("/dev/fuse"):
        raise UsageError("mount needs FUSE: /dev/fuse is missing (modprobe fuse)")


def serve(tree: Tree, mountpoint: str, allow_other: bool, log: Callable[[str], None]) -> None:
    """Mount ``tree`` on ``mountpoint`` and serve it until it is unmounted
    (fusermount3 -u, umount) or SIGINT, SIGTERM or SIGHUP comes; then
    unmount (a signal) and return."""
    import pyfuse3
    import trio

    ops = _Ops(tree, log)
    opts = set(pyfuse3.default_options) | {"ro", "fsname=cloneaware", "subtype=cloneaware"}
    if allow_other:
        opts.add("allow_other")
    pyfuse3.init(ops, mountpoint, opts)
    unmount = True
    try:
        async def run() -> None:
            nonlocal unmount
            async with trio.open_nursery() as nursery:
                async def main() -> None:
                    nonlocal unmount
                    await pyfuse3.main()
                    unmount = False  # unmounted from outside: nothing to undo
                    nursery.cancel_scope.cancel()

                nursery.start_soon(main)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                               signal.SIGHUP) as signals:
                    async for s in signals:
                        log(f"{signal.Signals(s).name}: unmounting {mountpoint}")
                        nursery.cancel_scope.cancel()
                        break

        trio.run(run)
    finally:
        pyfuse3.close(unmount=unmount)


def _attributes(a: Attr):
    import pyfuse3

    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.generation = 0
    e.entry_timeout = e.attr_timeout = TIMEOUT
    e.st_mode, e.st_nlink, e.st_uid, e.st_gid = a.mode, a.nlink, a.uid, a.gid
    e.st_rdev, e.st_size, e.st_blocks, e.st_blksize = a.rdev, a.size, a.blocks, 1 << 17
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = a.atime_ns, a.mtime_ns, a.ctime_ns
    return e


def _make_ops_class():
    import pyfuse3
    import trio

    async def call(fn, *args, inline: bool = False):
        """``fn(*args)`` on a thread, or here when it cannot wait on I/O
        (``inline``: a thread's start costs more than decoding a record)."""
        try:
            if inline:
                return fn(*args)
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    class Ops(pyfuse3.Operations):
        enable_writeback_cache = False

        def __init__(self, tree: Tree, log: Callable[[str], None]):
            super().__init__()
            self.tree = tree
            self.log = log
            self.files: dict[int, FileData] = {}
            self.dirs: dict[int, list] = {}
            self.fhs = itertools.count(1)

        async def lookup(self, parent_inode, name, ctx=None):
            t, now = self.tree, self.tree.ready(parent_inode)
            if name == b".":
                return _attributes(await call(t.attr, parent_inode, inline=now))
            if name == b"..":
                up = await call(t.up, parent_inode, inline=now)
                return _attributes(await call(t.attr, up, inline=t.ready(up)))
            return _attributes(await call(t.lookup, parent_inode, name, inline=now))

        async def getattr(self, inode, ctx=None):
            return _attributes(await call(self.tree.attr, inode, inline=self.tree.ready(inode)))

        async def readlink(self, inode, ctx):
            return await call(self.tree.readlink, inode, inline=self.tree.ready(inode))

        async def opendir(self, inode, ctx):
            names = await call(self.tree.listdir, inode, inline=self.tree.ready(inode))
            fh = next(self.fhs)
            self.dirs[fh] = [names, []]  # the names, and the attributes made so far
            return fh

        async def readdir(self, fh, start_id, token):
            names, attrs = self.dirs[fh]
            i = start_id
            while i < len(names):
                if i >= len(attrs):  # the next batch (a reply takes a few dozen)
                    part = names[len(attrs):len(attrs) + BATCH]
                    attrs += await call(self._attrs, part,
                                        inline=self.tree.ready(part[0][1]))
                if not pyfuse3.readdir_reply(token, names[i][0], _attributes(attrs[i]), i + 1):
                    return
                i += 1

        def _attrs(self, part: list) -> list[Attr]:
            return [self.tree.attr(ino) for _, ino in part]

        async def releasedir(self, fh):
            self.dirs.pop(fh, None)

        async def open(self, inode, flags, ctx):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            f = await call(self.tree.open, inode)
            fh = next(self.fhs)
            self.files[fh] = f
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

        async def read(self, fh, off, size):
            return await call(self.files[fh].read, off, size)

        async def release(self, fh):
            self.files.pop(fh, None)

        async def getxattr(self, inode, name, ctx):
            for n, v in await call(self.tree.xattrs, inode, inline=self.tree.ready(inode)):
                if n == name:
                    return v
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

        async def listxattr(self, inode, ctx):
            return [n for n, _ in await call(self.tree.xattrs, inode,
                                             inline=self.tree.ready(inode))]

        async def access(self, inode, mode, ctx):
            if mode & os.W_OK:
                raise pyfuse3.FUSEError(errno.EROFS)
            return True

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 512
            s.f_namemax = 255
            return s

    return Ops


def _Ops(tree: Tree, log: Callable[[str], None]):
    return _make_ops_class()(tree, log)
