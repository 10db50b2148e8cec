"""What every patch module needs, below the patches and the patcher that applies them: the plan a patch returns,
the one-line log, the job's rank and the environment switches."""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

LOGGER_NAME = "bridge_rng_patch"

PENDING, APPLIED, NOT_NEEDED = "pending", "applied", "not needed"
DISABLED, REFUSED, UNDONE = "disabled", "refused", "undone"


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


class Wrapping(NamedTuple):
    """A wrapper on a path of the stack's checkpointing module, or of another of its modules (``module``)."""

    path: str
    wrapper: Any
    module: str | None = None


class Plan(NamedTuple):
    """A patch's decision for one stack, its wrappers, and whether they act on what the resume watch notes."""

    decision: Decision
    wrappings: tuple[Wrapping, ...] = ()
    watched: bool = False

    @classmethod
    def refuse(cls, reason: str) -> Plan:
        return cls(Decision.refuse(reason))

    @classmethod
    def not_needed(cls, reason: str) -> Plan:
        return cls(Decision.not_needed(reason))


def report(message: str, level: int | None = None, every_rank: bool = False) -> None:
    """Log ``message`` once per job: on rank 0 (by torch.distributed, or $RANK before it is initialised)."""
    import logging

    if every_rank or global_rank() == 0:
        logging.getLogger(LOGGER_NAME).log(logging.INFO if level is None else level, message)


def global_rank() -> int:
    """This process's rank in the job: torch.distributed's once initialised, else $RANK (0 without one)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


DISABLE_ENV = "BRIDGE_RNG_PATCH_DISABLE"
AUDIT_ENV = "BRIDGE_RNG_PATCH_AUDIT"
_OFF, _ON = ("", "0", "false", "no", "off"), ("1", "true", "yes", "on", "all")


def switched_off(variable: str) -> bool:
    """Whether ``variable`` says off (0, false, no, off), as every switch of the package reads it."""
    value = os.environ.get(variable)
    return value is not None and value.strip().lower() in _OFF[1:]


def disabled_patches(names: tuple[str, ...]) -> frozenset[str]:
    """The patches ``BRIDGE_RNG_PATCH_DISABLE`` switches off: all for 1 (true, yes, on, all), or those it names."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in _OFF:
        return frozenset()
    if value in _ON:
        return frozenset(names)
    return frozenset(name.strip() for name in value.split(",") if name.strip())
