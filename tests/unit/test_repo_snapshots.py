"""Choosing snapshots (repo/snapshots.py): by whole id, unique prefix or
'latest', for one host or any; the errors a user sees when the choice is
empty, ambiguous or not an id; and Repository.find choosing among the
snapshots a repository holds."""
from __future__ import annotations

import re

import pytest

from cloneaware.errors import UsageError
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Filter, Snapshot, find, now_rfc3339, of_host


def snap(sid: str, host: str, t: int) -> Snapshot:
    return Snapshot(sid.ljust(64, "0"), {"time_ns": t, "hostname": host})


SNAPS = [snap("aa11", "a", 1), snap("ab22", "b", 2), snap("cc33", "a", 3), snap("dd44", "b", 4)]


def test_find_by_whole_id_and_by_unique_prefix():
    assert find(SNAPS, SNAPS[2].id) is SNAPS[2]
    assert find(SNAPS, "cc") is SNAPS[2]
    assert find(SNAPS, "ab2") is SNAPS[1]


def test_latest_is_the_last_one_of_the_host_asked_for():
    assert find(SNAPS, "latest") is SNAPS[3]
    assert find(SNAPS, "latest", host="a") is SNAPS[2]
    assert find(SNAPS, "latest", host="b") is SNAPS[3]


def test_the_host_filter_applies_to_ids_too():
    assert find(SNAPS, "a", host="b") is SNAPS[1]  # "a" is ambiguous, but only ab22 is b's
    with pytest.raises(UsageError, match="R: no snapshot cc"):
        find(SNAPS, "cc", host="b", where="R")
    assert of_host(SNAPS, "a") == [SNAPS[0], SNAPS[2]]
    assert of_host(SNAPS, None) == SNAPS


def test_an_ambiguous_prefix_is_refused_with_the_count():
    with pytest.raises(UsageError, match="R: a names 2 snapshots; give more digits"):
        find(SNAPS, "a", where="R")


@pytest.mark.parametrize("spec", ["", "LATEST", "cc-", "xyz", "Cc33"])
def test_what_is_not_an_id_is_refused(spec):
    with pytest.raises(UsageError, match="is not a snapshot id"):
        find(SNAPS, spec)


def test_no_snapshot_at_all_or_none_of_that_host():
    with pytest.raises(UsageError, match=r"\AR: no snapshot yet\Z"):
        find([], "latest", where="R")
    with pytest.raises(UsageError, match=r"\AR: no snapshot yet \(host z\)\Z"):
        find(SNAPS, "latest", host="z", where="R")
    with pytest.raises(UsageError, match="R: no snapshot ee"):
        find(SNAPS, "ee", where="R")


def test_now_rfc3339_keeps_the_nanoseconds():
    assert now_rfc3339(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", now_rfc3339())


def snapshot_data(host: str, t: int) -> dict:
    return {"time": now_rfc3339(t), "time_ns": t, "hostname": host, "username": "u",
            "paths": ["/src"], "tags": [], "manifest": [], "manifest_bytes": 0,
            "parent": None, "program": "test", "summary": {}}


def test_repository_lists_oldest_first_and_finds_among_them(tmp_path):
    repo = Repository.init(LocalBackend(str(tmp_path / "repo")))
    saved = [repo.save_snapshot(snapshot_data(h, t)) for h, t in (("b", 30), ("a", 10),
                                                                   ("a", 20))]
    listed = repo.snapshots()
    assert [s.time_ns for s in listed] == [10, 20, 30]
    assert {s.id for s in listed} == {s.id for s in saved}
    assert repo.find("latest").hostname == "b"
    assert repo.find("latest", host="a").time_ns == 20
    assert repo.find(saved[1].id[:12]).id == saved[1].id
    assert repo.find("latest", snaps=listed[:1]).time_ns == 10  # among those given
    # several, each once, in the order first named (restore -r)
    assert repo.find_all([listed[2].id[:12], "latest", listed[0].id, listed[2].id]) == \
        [listed[2], listed[0]]
    assert repo.find_all(["latest"], snaps=listed[:2]) == [listed[1]]
    with pytest.raises(UsageError, match=re.escape(f"{repo.where}: no snapshot ee")):
        repo.find_all(["latest", "ee"])
    with pytest.raises(UsageError, match=re.escape(f"{repo.where}: no snapshot yet (host c)")):
        repo.find("latest", host="c")
    repo.close()


def test_filter_rules():
    """--path without its trailing slash; --tag a,b both, repeated either."""
    f = Filter.of("h", ["/a/", "/b"], ["x,y", "z"])
    assert f.paths == ("/a", "/b") and str(f) == "host h, path /a, path /b, tag x,y, tag z"
    assert not Filter.of() and Filter.of(tags=["t"])
