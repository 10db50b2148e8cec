"""Keep the restored RNG state over what a loop does between its restore and its first training step.

Every loop builds its data iterators after the load (Megatron-Bridge's ``setup()``, Megatron-LM's ``pretrain()``,
ms-swift's ``train()``), and ``iter()`` of a ``DataLoader`` built without a ``generator`` draws its base seed from the
global torch generator: a resumed run starts its first step that many draws past the state it saved (upstream
Megatron-Bridge #5257, measured there on 0.5.0). ms-swift's GRPO and GKD set their resampling iterator up between a
re-seed to ``seed + 1`` and one to ``seed``, which replaces the restored state with the run's initial one (ms-swift
#9935). After a resume that restored RNG state, these functions run as they would, drawing what they draw (the
iterators, their order and their workers' seeds are theirs), and every source is then put back as the restore left
it, so that the first step starts where the uninterrupted run's did. A run that restored nothing is left alone.
"""

from __future__ import annotations

from typing import Any

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.resume_context import ResumeContext


class KeepingRestored:
    """The wrapper of a function that runs between the restore and the first step: after a restore that handed this
    rank an entry, and until training starts, every source is put back as it was when the function was called (once
    training has started, the uninterrupted run draws there too)."""

    def __init__(self, context: ResumeContext) -> None:
        self._context = context

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not self._context.before_first_step:
            return wrapped(*args, **kwargs)
        with rng_sources.every_source_kept():
            return wrapped(*args, **kwargs)


class MarkingFirstStep:
    """The training step's wrapper: its first call ends the span in which the builders keep the restored state."""

    def __init__(self, context: ResumeContext) -> None:
        self._context = context

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if self._context.before_first_step:
            self._context.note_first_step()
        return wrapped(*args, **kwargs)


def plan(stack: InstalledStack, context: ResumeContext) -> Plan:
    loop = stack.loop
    # What a restore was handed, which this patch acts on, is noted by the package's load inside the resume.
    lacks = stack.lacks(loop.resume_function, loop.dist_load.path)
    if lacks:
        return Plan.refuse(lacks)
    targets = loop.before_first_step.keeps_restored
    if not targets:
        return Plan.not_needed(f"{stack.loop.name} runs nothing known to draw between its restore and first step")
    names = ", ".join(f"{target.module}.{target.path}" for target in targets)
    decision = Decision.apply(f"after a resume that restored RNG state, every source is put back after {names}")
    keeping = KeepingRestored(context)
    wrappings = [Wrapping(target.path, keeping, module=target.module) for target in targets]
    first_step = loop.before_first_step.first_step
    if first_step is not None:
        wrappings.append(Wrapping(first_step.path, MarkingFirstStep(context), module=first_step.module))
    return Plan(decision, tuple(wrappings))
