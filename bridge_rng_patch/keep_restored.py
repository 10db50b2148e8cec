"""Keep the restored RNG state over what a loop runs between its restore and its first training step: its data
iterators' builders (a ``DataLoader`` draws its base seed from torch's generator, Megatron-Bridge #5257) and ms-swift's
re-seeds (#9935) run as they would, and every source is then put back as the restore left it.
"""

from __future__ import annotations

from typing import Any

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.resume import ResumeWatch


class KeepingRestored:
    """Puts every source back after the function, between a restore and the first step; else goes through."""

    def __init__(self, watch: ResumeWatch) -> None:
        self._watch = watch

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not self._watch.before_first_step:
            return wrapped(*args, **kwargs)
        with rng_sources.every_source_kept():
            return wrapped(*args, **kwargs)


class MarkingFirstStep:
    """The training step's wrapper: its first call ends the span in which the builders keep the restored state."""

    def __init__(self, watch: ResumeWatch) -> None:
        self._watch = watch

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if self._watch.before_first_step:
            self._watch.note_first_step()
        return wrapped(*args, **kwargs)


def plan(stack: InstalledStack, watch: ResumeWatch) -> Plan:
    before = stack.loop.before_first_step
    if not before.keeps_restored:
        return Plan.not_needed(f"{stack.loop.name} runs nothing known to draw between its restore and first step")
    names = ", ".join(f"{target.module}.{target.path}" for target in before.keeps_restored)
    decision = Decision.apply(f"after a resume that restored RNG state, every source is put back after {names}")
    keeping = KeepingRestored(watch)
    wrappings = [Wrapping(target.path, keeping, module=target.module) for target in before.keeps_restored]
    if before.first_step is not None:
        wrappings.append(Wrapping(before.first_step.path, MarkingFirstStep(watch), module=before.first_step.module))
    return Plan(decision, tuple(wrappings), watched=True)
