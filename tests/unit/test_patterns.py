"""cloneaware/patterns.py: gitignore-style patterns for --exclude and
--include, on hand-made paths."""
from __future__ import annotations

import pytest

from cloneaware.errors import UsageError
from cloneaware.patterns import Patterns


@pytest.mark.parametrize("pattern, path, is_dir, want", [
    ("cache", b"tree/a/cache", True, True),
    ("cache", b"tree/a/cache", False, True),
    ("cache", b"tree/cache2", False, False),
    ("*.tmp", b"tree/x.tmp", False, True),
    ("*.tmp", b"tree/x.tmpl", False, False),
    ("*.tmp", b"x.tmp", False, True),
    ("tree/vm/*.img", b"tree/vm/a.img", False, True),
    ("tree/vm/*.img", b"tree/vm/sub/a.img", False, False),
    ("tree/vm/*.img", b"other/tree/vm/a.img", False, False),
    ("logs/", b"tree/logs", False, False),
    ("logs/", b"tree/logs", True, True),
    ("**/cache", b"tree/a/b/cache", True, True),
    ("tree/**/b", b"tree/b", True, True),
    ("tree/**/b", b"tree/x/y/b", True, True),
    ("tree/logs/**", b"tree/logs/a/b", False, True),
    ("a[bc]d", b"x/acd", False, True),
    ("a[!bc]d", b"x/acd", False, False),
    ("a?c", b"x/a/c", False, False),
    ("bad\udcff", b"t/bad\xff", False, True),
])
def test_matches(pattern, path, is_dir, want):
    assert Patterns([pattern]).match(path, None, is_dir) is want


def test_absolute_patterns_name_the_host_path():
    p = Patterns(["/srv/data/tmp"])
    assert p.match(b"data/tmp", b"/srv/data/tmp", True)
    assert not p.match(b"data/tmp", b"/srv/data/tmp2", True)
    assert not p.match(b"srv/data/tmp", None, True)


@pytest.mark.parametrize("bad", ["", "/", "[abc"])
def test_bad_patterns_are_usage_errors(bad):
    with pytest.raises(UsageError):
        Patterns([bad])
