"""cffi builder for cloneaware._native (API mode, out of line).

Declarations live in cloneaware.cdef, the C in cloneaware.c; the package
version is compiled in so that a stale shared object is caught at import.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "..", "cloneaware", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef(_read("cloneaware.cdef"))
ffibuilder.set_source(
    "cloneaware._native",
    '#include "cloneaware.h"\n#include <fcntl.h>\n#include <linux/fiemap.h>\n'
    '#include <linux/btrfs.h>\n#include <linux/btrfs_tree.h>\n',
    sources=[os.path.relpath(os.path.join(HERE, "cloneaware.c"))],
    include_dirs=[os.path.relpath(HERE)],
    define_macros=[("CA_VERSION", f'"{_version()}"')],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
