"""The chaos soak's checker (tests/test_chaos.py): how many attempts of one execution key
may run at once is its limit, and what a crowded stretch is called."""

from __future__ import annotations

from collections import defaultdict

from tests.test_chaos import Attempt, find_overlaps, key_limit


def attempt(job: str, ek: str, start: float, end: float, pgid: int = 1) -> Attempt:
    return Attempt(id=f"{job}:1", job=job, ek=ek, pid=pgid, pgid=pgid, start=start, end=end)


def kinds(attempts, freezes=None):
    found = find_overlaps(attempts, freezes or defaultdict(list), 0.0)
    return [(o["ek"], o["kind"], o["jobs"]) for o in found]


def test_a_key_of_limit_one_allows_one_at_a_time():
    assert key_limit("ek-01") == 1
    assert kinds([attempt("a", "ek-01", 0, 1), attempt("b", "ek-01", 1, 2)]) == []
    assert kinds([attempt("a", "ek-01", 0, 1), attempt("b", "ek-01", 0.5, 2)]) == \
        [("ek-01", "overlap", ["a", "b"])]


def test_a_key_of_limit_three_allows_three_at_once_not_four():
    assert key_limit("ek-05") == 3
    three = [attempt(j, "ek-05", 0, 2) for j in "abc"]
    assert kinds(three) == []
    assert kinds([*three, attempt("d", "ek-05", 1, 3)]) == [("ek-05", "overlap", list("abcd"))]


def test_a_worker_frozen_past_its_lease_is_told_apart():
    freezes = defaultdict(list, {1: [{"from": 0.5, "to": 6.0, "seconds": 5.5}]})
    frozen = attempt("a", "ek-01", 0, 7, pgid=1)
    # While a is frozen, b holds the key; a goes on when it resumes, beside b.
    taker = attempt("b", "ek-01", 5.0, 6.5, pgid=2)
    assert kinds([frozen, taker], freezes) == [("ek-01", "after-freeze", ["a", "b"])]
