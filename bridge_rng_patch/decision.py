"""What every patch module needs and nothing else: the decision a probe reaches, and the one-line log of it.

It sits below the patches and the registry that imports them (``patcher``), so that dependencies point down.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

LOGGER_NAME = "bridge_rng_patch"

PENDING = "pending"
APPLIED = "applied"
NOT_NEEDED = "not needed"
DISABLED = "disabled"
REFUSED = "refused"
UNDONE = "undone"


class Decision(NamedTuple):
    """What a patch's probe concluded about the installed code."""

    state: str
    reason: str

    @classmethod
    def apply(cls, reason: str) -> Decision:
        return cls(APPLIED, reason)

    @classmethod
    def not_needed(cls, reason: str) -> Decision:
        return cls(NOT_NEEDED, reason)

    @classmethod
    def refuse(cls, reason: str) -> Decision:
        return cls(REFUSED, reason)


def report(message: str, level: int | None = None, every_rank: bool = False) -> None:
    """Log ``message`` once per job: on rank 0 (by torch.distributed, or $RANK before it is initialised)."""
    import logging

    if every_rank or _is_rank_zero():
        logging.getLogger(LOGGER_NAME).log(logging.INFO if level is None else level, message)


def _is_rank_zero() -> bool:
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
