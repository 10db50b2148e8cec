"""The benchmarks' run order (benchmarks/sides.py): what a job leaves behind for the next one must weigh on every
side alike, so the orders must be balanced, not merely mixed."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest

from benchmarks import sides

SIDE_COUNTS = [["A", "B"], ["A", "A'", "B"], list("ABCD"), list("ABCDE")]


@pytest.mark.parametrize("compared", SIDE_COUNTS)
def test_every_side_runs_in_every_position_equally_often(compared: list[str]) -> None:
    orders = sides.balanced_orders(compared)
    for position in range(len(compared)):
        runs_there = Counter(order[position] for order in orders)
        assert set(runs_there) == set(compared)
        assert len(set(runs_there.values())) == 1


@pytest.mark.parametrize("compared", SIDE_COUNTS)
def test_every_side_follows_every_other_side_equally_often(compared: list[str]) -> None:
    followers = Counter(pair for order in sides.balanced_orders(compared) for pair in pairwise(order))
    assert len(set(followers.values())) == 1
    assert set(followers) == {(first, then) for first in compared for then in compared if first != then}


def test_two_sides_run_as_abba() -> None:
    assert list(sides.balanced_rounds(["A", "B"], 4)) == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]


def test_rounds_cycle_through_the_balanced_orders() -> None:
    rounds = list(sides.balanced_rounds(["A", "A'", "B"], 8))
    assert rounds[:6] == sides.balanced_orders(["A", "A'", "B"])
    assert rounds[6:] == rounds[:2]


def test_settling_deletes_earlier_checkpoints_and_keeps_the_reports(tmp_path) -> None:
    (tmp_path / "unpatched-300-0" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "unpatched-300-0.json").write_text("[]")
    sides.settle(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["unpatched-300-0.json"]


UNPATCHED = [1.00, 1.01, 0.99, 1.02, 0.98, 1.00]
UNPATCHED_AGAIN = [1.01, 0.99, 1.00, 1.00, 1.02, 0.98]


def test_a_side_that_differs_by_more_than_the_jobs_spread_falls_outside_the_no_difference_band() -> None:
    slower = [sample * 1.10 for sample in UNPATCHED]
    low, high = sides.no_difference_band({"A": UNPATCHED, "A'": UNPATCHED_AGAIN, "B": slower})
    assert not low <= sides.ratio(slower, UNPATCHED) <= high


def test_sides_that_do_not_differ_give_a_band_around_1_as_wide_as_their_spread() -> None:
    low, high = sides.no_difference_band({"A": UNPATCHED, "A'": UNPATCHED_AGAIN, "B": list(reversed(UNPATCHED))})
    assert 0.97 < low < sides.ratio(UNPATCHED_AGAIN, UNPATCHED) < high < 1.03
