"""Data-init callbacks: the RNG state is the same after a stack's ``on_data_init_start`` callbacks as before them.

Megatron-Bridge 0.5.0 to 0.6.2 fire ``on_data_init_start`` in ``setup()`` after the checkpoint was loaded, for JIT
warm-up with mock data and the like, and such a callback draws from every RNG source: a resumed run then starts its
first step from a state the uninterrupted run never held. Upstream keeps the state over them (#5255,
``setup._preserve_rng_state``, in no release up to 0.6.2); the same is done here, around the callbacks of that event
alone, with or without a resume, as upstream does.
"""

from __future__ import annotations

from typing import Any

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.probe import InstalledStack, module_source
from bridge_rng_patch.resume_context import ResumeContext

DATA_INIT_EVENT = "on_data_init_start"


def keeping_rng_over_data_init(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """The wrapper of the callback manager's ``fire(event_name, context)``."""
    event = kwargs.get("event_name", args[0] if args else None)
    if event != DATA_INIT_EVENT:
        return wrapped(*args, **kwargs)
    with rng_sources.every_source_kept():
        return wrapped(*args, **kwargs)


def plan(stack: InstalledStack, context: ResumeContext) -> Plan:
    before = stack.loop.before_first_step
    if before.data_init_callbacks is None or before.callbacks_fired_in is None:
        return Plan.not_needed(f"{stack.loop.name} fires no data-init callbacks")
    # Is the fix already there? Asked of the set-up's code, read without importing it (it may be importing us).
    setup = module_source(before.callbacks_fired_in)
    if setup is None:
        return Plan.not_needed(f"{before.callbacks_fired_in} is not there to fire data-init callbacks")
    if before.preserves_callbacks and before.preserves_callbacks in setup:
        return Plan.not_needed(f"{before.callbacks_fired_in} already keeps the RNG state over its data-init callbacks")
    if DATA_INIT_EVENT not in setup:
        return Plan.not_needed(f"{before.callbacks_fired_in} fires no {DATA_INIT_EVENT} callbacks in this release")
    target = before.data_init_callbacks
    decision = Decision.apply(
        f"{before.callbacks_fired_in} fires {DATA_INIT_EVENT} after the load without keeping the RNG state; "
        f"{target.path} keeps every source over them (upstream #5255)"
    )
    return Plan(decision, (Wrapping(target.path, keeping_rng_over_data_init, module=target.module),))
