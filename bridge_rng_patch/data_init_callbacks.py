"""Data-init callbacks: Megatron-Bridge 0.5.0 to 0.6.2 fire ``on_data_init_start`` after the load, and a callback
that draws moves every source; as upstream's #5255 (no release), every source is kept over that event's callbacks.
"""

from __future__ import annotations

from typing import Any

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.probe import InstalledStack, module_source
from bridge_rng_patch.resume import ResumeWatch

DATA_INIT_EVENT = "on_data_init_start"


def keeping_rng_over_data_init(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    event = kwargs.get("event_name", args[0] if args else None)
    if event != DATA_INIT_EVENT:
        return wrapped(*args, **kwargs)
    with rng_sources.every_source_kept():
        return wrapped(*args, **kwargs)


def plan(stack: InstalledStack, watch: ResumeWatch) -> Plan:
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
