"""How the benchmarks run the sides they compare: in a balanced order, beside an A/A control, each job on a
settled machine.

Run back to back, a job that follows another one can run slower than the one before it (a reported run:
unpatched / patched / unpatched again, saves of 3.18 s / 3.49 s / 3.75 s), and a fixed order puts that on one
side every time. A balanced order spreads it over every side alike; the A/A control, the reference side run
twice under two names, shows how far two identical sides differ on that machine that day. It is one draw;
the no-difference band is many: the ratios the sides' jobs give when their labels are shuffled among them.
A ratio of the side under test inside that band shows no difference from the reference.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
from collections.abc import Iterator, Mapping, Sequence
from itertools import cycle, islice
from pathlib import Path
from typing import TypeVar

Side = TypeVar("Side")

# The reference side, the same side run again under another name (the A/A control), and the side under test.
REFERENCE, CONTROL, TESTED = "A", "A'", "B"


def balanced_orders(sides: Sequence[Side]) -> list[tuple[Side, ...]]:
    """Orders in which every side runs in every position, and right after every other side, equally often: a
    Williams design. Its first order takes the sides as first, second, last, third, last but one, ...; the
    others shift that by one side each; an odd number of sides needs their mirror images too. For two sides:
    AB, BA (ABBA); for three, six orders."""
    count = len(sides)
    first = [0]
    for step in range(1, count):
        first.append((step + 1) // 2 if step % 2 else count - step // 2)
    orders = [tuple(sides[(index + shift) % count] for index in first) for shift in range(count)]
    return orders if count % 2 == 0 else orders + [order[::-1] for order in orders]


def balanced_rounds(sides: Sequence[Side], rounds: int) -> Iterator[tuple[Side, ...]]:
    """``rounds`` orders, cycling through :func:`balanced_orders`; balanced whenever ``rounds`` is a multiple
    of their number."""
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


def compare(samples: Mapping[str, Sequence[float]]) -> dict:
    """Each side's spread; the control's and the tested side's ratios to the reference (A/A, A/B); the band."""
    return {
        **{side: spread(side_samples) for side, side_samples in samples.items()},
        "A/A": ratio(samples[CONTROL], samples[REFERENCE]),
        "A/B": ratio(samples[TESTED], samples[REFERENCE]),
        "no-difference band": no_difference_band(samples),
    }


def no_difference_band(samples: Mapping[str, Sequence[float]], draws: int = 4000) -> list[float]:
    """The middle 95% of the ratios of two sides' medians when the jobs of all ``samples``' sides (as many per
    side) are dealt out among them at random: how far from 1 such a ratio strays when no side differs at all."""
    pool = [sample for side in samples.values() for sample in side]
    size = len(pool) // len(samples)
    dealer = random.Random(0)  # the same band for the same samples
    ratios = []
    for _ in range(draws):
        dealer.shuffle(pool)
        ratios.append(statistics.median(pool[:size]) / statistics.median(pool[size : 2 * size]))
    ratios.sort()
    return [ratios[int(0.025 * draws)], ratios[int(0.975 * draws)]]
