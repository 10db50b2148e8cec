"""What one stack's patches learn during a resume, handed in the open from the wrappers that see the load to those
that act after it.

The patcher makes one context per stack and passes it to every patch's plan: the load wrappers note what they see
in it (each load, whether it asked for RNG state, what a rank's restore was handed), and the restore's audit reads
it. Nothing heavy is imported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Handed:
    """What the stored-layout load handed this rank's restore: whose state (``rng_layout.OWN``, ``SHARED`` or
    ``FRESH``), the entry itself (fingerprinted by the audit after the restore, so that a resume without the audit
    pays nothing for it), and whether the run gathers its states over DP (``data_parallel_random_init``, which seeds
    every stream per DP rank)."""

    kind: str
    entry: Mapping[str, Any]
    data_parallel_random_init: bool


@dataclass
class ResumeContext:
    """One stack's resume under way, as this rank's package saw it: the loads of a checkpoint, whether one asked for
    RNG state, where from, what the restore was handed (None where the package's load did not hand it), how many
    resume functions are running, what the rank held after the restore until its first step compares with it, and
    whether a restore handed RNG state and training has not started since (what runs then must leave it as it is:
    a later resume that restores none, a reference model's, does not end that). The same on every rank but
    ``handed`` and ``held_after_restore``."""

    loads: int = 0
    rng_requested: bool = False
    checkpoint_dir: str | None = None
    handed: Handed | None = None
    loads_under_way: int = 0
    held_after_restore: dict[str, str] | None = None
    before_first_step: bool = False

    def begin(self) -> None:
        """A resume starts: nothing of an earlier one counts."""
        self.loads, self.rng_requested, self.checkpoint_dir, self.handed = 0, False, None, None

    def note_load(self, rng_requested: bool, checkpoint_dir: str | None) -> None:
        """A load of a checkpoint (every rank makes it), and whether it asked for RNG state."""
        self.loads += 1
        self.rng_requested = self.rng_requested or rng_requested
        if checkpoint_dir is not None:
            self.checkpoint_dir = checkpoint_dir

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """While a resume function runs: ``get_rng_state`` then builds a load request, not a save."""
        self.loads_under_way += 1
        try:
            yield
        finally:
            self.loads_under_way -= 1

    def note_handed(self, kind: str, entry: Mapping[str, Any], data_parallel_random_init: bool) -> None:
        self.handed = Handed(kind, entry, data_parallel_random_init)
        self.before_first_step = True

    def note_first_step(self) -> None:
        """Training has started: from here on, what the loop draws is what the uninterrupted run draws too."""
        self.before_first_step = False

    def note_restored(self, digests: dict[str, str]) -> None:
        """What this rank held right after a resume restored RNG state (empty: it could not be read), for the check
        at the first training step; set on every rank, so that every rank joins that check."""
        self.held_after_restore = digests

    def take_restored(self) -> dict[str, str] | None:
        """What the first step compares with, once: every later step finds None and pays nothing."""
        held, self.held_after_restore = self.held_after_restore, None
        return held
