"""How cloneaware shows what it stores, to a person and to a program.

Names are bytes, not necessarily UTF-8 (issue 21, defect 11).  ``show`` gives
a form that cannot be misread and maps back to the bytes: printable
characters of valid UTF-8 as they are; a backslash as ``\\\\``; newline, tab
and carriage return as ``\\n``, ``\\t``, ``\\r``; any other character that is
not printable as ``\\uXXXX`` (or ``\\UXXXXXXXX``); and each byte that is not
valid UTF-8 as ``\\xHH``.  ``--json`` gives that form as ``path`` and the
bytes themselves, base64, as ``path_b64``."""
from __future__ import annotations

import base64
import datetime

_NAMED = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def show(name: bytes) -> str:
    """``name`` in the escaped form above."""
    out = []
    for ch in name.decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch in _NAMED:
            out.append(_NAMED[ch])
        elif ch.isprintable():
            out.append(ch)
        elif o <= 0xFFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


def b64(name: bytes) -> str:
    return base64.b64encode(name).decode()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(ns: int) -> str:
    """A time as ls -l shows it, in UTC."""
    try:
        dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"@{ns // 1_000_000_000}"
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def when_rfc3339(ns: int) -> str:
    try:
        dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(ns)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"
