"""How the benchmarks run the sides they compare: in a balanced order, beside an A/A control, each job on a
settled machine.

Run back to back, a job that follows another one can run slower than the one before it (a reported run:
unpatched / patched / unpatched again, saves of 3.18 s / 3.49 s / 3.75 s), and a fixed order puts that on one
side every time. A balanced order spreads it over every side alike; the A/A control, the reference side run
twice under two names, shows how far two identical sides differ on that machine that day, which is the
distance from 1 that a ratio of the side under test must beat before it says anything.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Iterator, Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import TypeVar

Side = TypeVar("Side")


def balanced_orders(sides: Sequence[Side]) -> list[tuple[Side, ...]]:
    """Orders in which every side runs in every position, and right after every other side, equally often: a
    cyclic Latin square and its mirror image (a Williams design; for two sides, ABBA)."""
    count = len(sides)
    square = [tuple(sides[(first + step) % count] for step in range(count)) for first in range(count)]
    return square + [order[::-1] for order in square]


def balanced_rounds(sides: Sequence[Side], rounds: int) -> Iterator[tuple[Side, ...]]:
    """``rounds`` orders, cycling through :func:`balanced_orders`; balanced whenever ``rounds`` is a multiple
    of ``2 * len(sides)``."""
    return islice(cycle(balanced_orders(sides)), rounds)


def settle(work: Path) -> None:
    """Delete the previous jobs' checkpoints under ``work`` and let every write reach the disk before the next
    job starts, so that their write-back does not land in its timed save or load."""
    for leftover in work.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
    os.sync()


def spread(samples: Sequence[float]) -> dict:
    """The median and the range of one side's samples, and the samples in the order they ran."""
    return {"median": statistics.median(samples), "range": [min(samples), max(samples)], "samples": list(samples)}


def ratio(side: Sequence[float], reference: Sequence[float]) -> float:
    """The ratio of the two sides' medians."""
    return statistics.median(side) / statistics.median(reference)
