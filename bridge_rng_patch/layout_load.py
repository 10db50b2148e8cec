"""Stored-layout load: the RNG load request follows the layout the checkpoint stores, and the entry a rank restores
is checked before any RNG source is set.

A checkpoint's stored layout, not the running configuration, decides which RNG state a rank can read back. The
patch wraps the stack's torch_dist load (``torch_dist_load``) and, where the stack writes fsdp_dtensor entries by
(pp, tp), its fsdp_dtensor load (``fsdp_dtensor_load``); both hand the restore what ``restorable`` checks.
"""

from __future__ import annotations

from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.fsdp_dtensor_load import LayoutAwareFsdpLoad
from bridge_rng_patch.loops import LAYOUT_LOAD
from bridge_rng_patch.probe import InstalledStack, decide_by_release, describe_signature
from bridge_rng_patch.resume_context import ResumeContext
from bridge_rng_patch.torch_dist_load import LayoutAwareDistLoad


def plan(stack: InstalledStack, context: ResumeContext) -> Plan:
    load = stack.loop.dist_load
    lacks = stack.lacks(load.path, *(() if load.checkpoint is not None else ("get_checkpoint_name",)))
    if lacks:
        return Plan.refuse(lacks)
    # Is the fix already there? Asked first, from the code: no release number says so.
    follows = stack.load_follows_stored_rng_layout
    if follows:
        return Plan.not_needed("upstream's load already asks for the RNG layout the checkpoint stores")
    unbound = stack.unbound(load, (load.request, *load.named_by))
    if unbound:
        return Plan.refuse(unbound)
    if follows is None:
        decision = decide_by_release(stack.loop, LAYOUT_LOAD, "the load's source")
    else:
        shown = describe_signature(stack.function(load.path))
        reason = f"{load.path}{shown} asks for RNG state in the running job's layout only"
        if stack.loads_fsdp_dtensor and stack.fsdp_load_ignores_rng_after_model_parallel_change:
            reason += "; its fsdp_dtensor load already ignores RNG state after a TP or PP change"
        elif stack.loads_fsdp_dtensor:
            reason += "; its fsdp_dtensor load restores RNG state after a TP or PP change"
        decision = Decision.apply(reason)
    wrappings = [Wrapping(load.path, LayoutAwareDistLoad(stack, context))]
    if stack.loads_fsdp_dtensor:
        wrappings.append(Wrapping(stack.loop.fsdp_load.path, LayoutAwareFsdpLoad(stack, context)))
    return Plan(decision, tuple(wrappings))
